"""The KV-backed state every gateway watches (keys, agents, rooms, policies, tenant limits), rate limits and the audit log."""
