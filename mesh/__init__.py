"""Everything that talks NATS."""
