"""Built-in commands: which are allowed, which port each needs, and what is answered."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from arqonbus_server.shared import authz
from arqonbus_server.shared import commands as builtin
from arqonbus_server.shared import presence as presence_rules
from arqonbus_server.shared.core import rooms as room_rules
from arqonbus_server.shared.core.effects import (
    ArmExpiry,
    Audit,
    CheckCredential,
    Effect,
    Join,
    Leave,
    ReadHistory,
    RegisterAgent,
    ReportLimits,
    RoomAdmin,
    RunCommand,
    Serve,
    Unserve,
    VerifyRoomKey,
)
from arqonbus_server.shared.core.state import (
    AUDIT_ADMIN_ACTION,
    AUDIT_AGENT_REGISTERED,
    ConnectionState,
    Failure,
    Identity,
    Pending,
    failure_error,
)
from arqonbus_server.shared.envelope import ClientCommand
from arqonbus_server.shared.errors import (
    FORBIDDEN,
    INVALID_PARAMETERS,
    LIMIT_EXCEEDED,
    NOT_JOINED,
    NOT_REGISTERED,
    UNAVAILABLE,
    ArqonError,
)
from arqonbus_server.shared.subjects import ChannelRef

_ROOM_KEY_MAX_CHARS = 256
# The action named in a refusal to enter a room, per command that enters one.
_ENTER_ACTIONS = {
    builtin.JOIN_CHANNEL: "join",
    builtin.HISTORY: "read history",
    builtin.REGISTER_HANDLER: "handle commands",
}


# Commands that change or read the room's record in the ROOMS bucket (gateway/state/rooms.py).
_ROOM_RECORD_COMMANDS = frozenset(
    {*builtin.ROOM_ADMIN_COMMANDS, builtin.CREATE_ROOM, builtin.CONFIGURE_ROOM, builtin.KICK}
)
# Commands a gateway port answers (gateway/state/admin.py): presence and the admin commands.
_GATEWAY_COMMANDS = frozenset(
    {*builtin.PRESENCE_COMMANDS, *builtin.GATEWAY_ADMIN_COMMANDS} - _ROOM_RECORD_COMMANDS
)


def permission_scope(command: ClientCommand) -> tuple[str, str]:
    """The room and channel a command's permission is checked on (shared/commands.py)."""
    if command.command in builtin.TENANT_SCOPED:
        return authz.WILDCARD, authz.WILDCARD
    if command.command in builtin.ROOM_SCOPED:
        return command.room, authz.WILDCARD
    return command.room, command.channel


def checked_parameters(command: ClientCommand) -> Any:
    """A gateway command's parameters, checked here so bad input costs no I/O."""
    name, parameters = command.command, command.parameters
    if name in (builtin.LIST_ROOMS, builtin.LIST_CHANNELS):
        return builtin.list_params(parameters)
    if name == builtin.DELETE_ROOM:
        builtin.delete_room_params(parameters, command.room)
        return None
    if name == builtin.PRESENCE:
        return presence_rules.query_params(parameters)
    if name == builtin.SET_PRESENCE:
        return presence_rules.set_presence_params(parameters)
    return None


def room_key_param(parameters: dict[str, Any], name: str = "room_key") -> str | None:
    """A room key given by a client (join, history, register_handler): None if absent."""
    value = parameters.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= _ROOM_KEY_MAX_CHARS:
        detail = f"parameter {name!r} must be a string of 1-{_ROOM_KEY_MAX_CHARS} characters"
        raise ArqonError(INVALID_PARAMETERS, detail)
    return value


class CommandRules(ConnectionState):
    """The built-in commands' decisions (mixed into :class:`~shared.core.Connection`)."""

    def run_command(self, command: ClientCommand, now: float, wall: float) -> list[Effect]:
        ref = ChannelRef(self.principal.tenant, command.room, command.channel)
        permission = authz.permission_for_command(command.command)
        if permission is not None:
            room, channel = permission_scope(command)
            refusal = self.forbidden(permission, room, channel, command.id, now)
            if refusal is not None:
                error, audit = refusal
                return [*audit, *self.refuse(command, error)]
        try:
            return self._dispatch(command, ref, wall)
        except ArqonError as exc:
            return self.refuse(command, exc)

    def _dispatch(self, command: ClientCommand, ref: ChannelRef, wall: float) -> list[Effect]:
        name = command.command
        if name in _ROOM_RECORD_COMMANDS:
            return self._room_admin(command, ref)
        if name in _GATEWAY_COMMANDS:
            return self._run(command, ref)
        if name in _ENTER_ACTIONS:
            return self._enter(command, ref, wall)
        if name == builtin.LEAVE_CHANNEL:
            if ref not in self.joined:
                raise ArqonError(NOT_JOINED)
            del self.joined[ref]
            return [Leave(ref), self.reply(command, {})]
        if name == builtin.REFRESH_TOKEN:
            token = builtin.refresh_token_params(command.parameters)
            if not self.config.can_refresh:
                raise ArqonError(INVALID_PARAMETERS, "this gateway cannot check a new credential")
            return [CheckCredential(self.open_op(Pending("refresh", command)), token)]
        if name == builtin.REGISTER_AGENT:
            return self._register_agent(command)
        if name == builtin.LIMITS:
            return [ReportLimits(self.open_op(Pending("limits", command)), self.usage())]
        return self._unregister(command, ref)

    # -- entering a room: join, history, register_handler ------------------------------------

    def _enter(self, command: ClientCommand, ref: ChannelRef, wall: float) -> list[Effect]:
        """Check the command's parameters, then the room's rules, then act."""
        parameters = command.parameters
        if command.command == builtin.JOIN_CHANNEL:
            join = builtin.join_params(parameters)
            extra: dict[str, Any] = {
                "since_seq": join.since_seq,
                "since_epoch": join.since_epoch,
                "batch": join.batch,
                **self._presence_flags(join, command),
            }
        elif command.command == builtin.HISTORY:
            params = builtin.history_params(parameters)
            extra = {"since_seq": params.since_seq, "limit": params.limit}
        else:
            extra = {"name": builtin.handler_params(parameters)}
        key = room_key_param(parameters)
        pending = Pending("enter", command, ref=ref, extra=extra)
        settings = self.room_settings(command.room)
        decision = room_rules.enter_decision(
            settings,
            command.room,
            self.standing(command.room, command.channel),
            key,
            _ENTER_ACTIONS[command.command],
            wall,
        )
        if isinstance(decision, ArqonError):
            raise decision
        if isinstance(decision, room_rules.NeedsKey):
            op = self.open_op(pending)
            tenant, principal = self.principal.tenant, self.principal.id
            return [VerifyRoomKey(op, tenant, command.room, principal, decision.key)]
        return self._entered(pending)

    def _presence_flags(self, join: builtin.JoinParams, command: ClientCommand) -> dict[str, bool]:
        """Enter presence (default: the room's setting) and get its frames (default: the
        same); the frames need the ``presence`` permission."""
        settings = self.room_settings(command.room)
        presence = join.presence
        if presence is None:
            presence = bool(settings is not None and settings.presence)
        events = presence if join.presence_events is None else join.presence_events
        permission = authz.Permission.PRESENCE
        if events and not self.decide(permission, command.room, command.channel).allowed:
            raise ArqonError(
                FORBIDDEN,
                "presence_events needs the 'presence' permission on this channel: join with "
                "presence_events false, or ask the tenant's administrator for it",
            )
        return {"presence": presence, "presence_events": events}

    def room_key_checked(self, op: int, ok: bool) -> list[Effect]:
        """The outcome of :class:`VerifyRoomKey` (a rate_limited refusal: ``command_failed``)."""
        pending = self.pending.pop(op)
        assert pending.command is not None
        if not ok:
            return self.refuse(pending.command, room_rules.wrong_key(pending.command.room))
        try:
            return self._entered(pending)
        except ArqonError as exc:
            return self.refuse(pending.command, exc)

    def _entered(self, pending: Pending) -> list[Effect]:
        command, ref = pending.command, pending.ref
        assert command is not None and ref is not None
        if command.command == builtin.JOIN_CHANNEL:
            limit = self.config.max_channels
            if ref not in self.joined and len(self.joined) >= limit:
                raise ArqonError(LIMIT_EXCEEDED, f"this connection already has {limit} channels")
            op = self.open_op(Pending("join", command, ref=ref))
            extra = pending.extra
            return [
                Join(
                    op,
                    ref,
                    extra["since_seq"],
                    extra["since_epoch"],
                    extra["presence"],
                    extra["presence_events"],
                    extra["batch"],
                )
            ]
        if command.command == builtin.HISTORY:
            op = self.open_op(Pending("history", command, ref=ref))
            since, limit = pending.extra["since_seq"], pending.extra["limit"]
            return [ReadHistory(op, ref, since, limit, self.config.send_buffer_bytes // 2)]
        name = pending.extra["name"]
        if (ref, name) in self.handlers:
            return [self.reply(command, {"command": name})]
        limit = self.config.max_handlers
        if len(self.handlers) >= limit:
            raise ArqonError(LIMIT_EXCEEDED, f"this connection already has {limit} handlers")
        return [Serve(self.open_op(Pending("serve", command, ref=ref, name=name)), ref, name)]

    def joined_channel(self, op: int, result: dict[str, Any]) -> list[Effect]:
        """The hub joined (``result``: last_seq, gap...): the reply; then the shell goes live."""
        pending = self.pending.pop(op)
        assert pending.command is not None and pending.ref is not None
        self.joined[pending.ref] = None
        return [self.reply(pending.command, result)]

    def handler_served(self, op: int) -> list[Effect]:
        """NATS confirmed the queue group; refused if the connection ended or drains meanwhile."""
        pending = self.pending.pop(op)
        assert pending.command is not None and pending.ref is not None
        if self.closed or self.stopping:
            error = ArqonError(UNAVAILABLE, "the gateway is draining")
            return [Unserve(pending.ref, pending.name), *self.refuse(pending.command, error)]
        self.handlers[pending.ref, pending.name] = None
        return [self.reply(pending.command, {"command": pending.name})]

    def _unregister(self, command: ClientCommand, ref: ChannelRef) -> list[Effect]:
        name = builtin.handler_params(command.parameters)
        if (ref, name) not in self.handlers:
            raise ArqonError(NOT_REGISTERED, f"no handler for {name!r} on this channel")
        del self.handlers[ref, name]
        return [Unserve(ref, name), self.reply(command, {"command": name})]

    # -- outcomes shared by every command -----------------------------------------------------

    def command_done(self, op: int, result: dict[str, Any]) -> list[Effect]:
        """A port finished a command (history page, limits report): answer with ``result``."""
        pending = self.pending.pop(op)
        command = pending.command
        assert command is not None
        effects: list[Effect] = []
        if command.command in builtin.AUDITED_COMMANDS:
            details = {"action": command.command, "room": command.room, "target": ""}
            effects.append(
                Audit(self.principal.tenant, AUDIT_ADMIN_ACTION, self.principal.id, details)
            )
        return [*effects, self.reply(command, result)]

    def _run(self, command: ClientCommand, ref: ChannelRef) -> list[Effect]:
        """Presence and gateway admin commands: checked here, answered by a gateway port."""
        parameters = checked_parameters(command)
        if command.command == builtin.DELETE_ROOM and not self.config.has_security:
            raise ArqonError(UNAVAILABLE, "delete_room needs the gateway's NATS security state")
        op = self.open_op(Pending("run", command, ref=ref))
        return [
            RunCommand(
                op, command.command, ref, parameters, self.principal.id, self.config.session_id
            )
        ]

    def command_failed(self, op: int, failure: ArqonError | Failure) -> list[Effect]:
        """A port refused or failed a command: the error response."""
        pending = self.pending.pop(op)
        assert pending.command is not None
        if isinstance(failure, Failure):
            failure = failure_error(failure, pending.command.id)
        return self.refuse(pending.command, failure)

    # -- room administration, agents, credentials ------------------------------------------------

    def _room_admin(self, command: ClientCommand, ref: ChannelRef) -> list[Effect]:
        """room_configure, room_invite, ... (``admin`` was checked by the caller)."""
        if command.command == builtin.KICK:
            builtin.kick_params(command.parameters)
        if not self.config.has_security:
            raise ArqonError(UNAVAILABLE, "room settings need the gateway's NATS security state")
        op = self.open_op(Pending("room_admin", command, ref=ref))
        return [RoomAdmin(op, command.command, command.parameters, ref, self.principal.id)]

    def room_admin_done(self, op: int, result: dict[str, Any], target: str) -> list[Effect]:
        pending = self.pending.pop(op)
        command, ref = pending.command, pending.ref
        assert command is not None and ref is not None
        effects: list[Effect] = []
        if command.command != builtin.ROOM_INFO:
            details = {"action": command.command, "room": ref.room, "target": target}
            effects.append(Audit(ref.tenant, AUDIT_ADMIN_ACTION, self.principal.id, details))
        return [*effects, self.reply(command, result)]

    def _register_agent(self, command: ClientCommand) -> list[Effect]:
        # An agent acts on the whole tenant: admin of one room is not enough.
        if not self.policy.decide(authz.Permission.ADMIN, "*", "*").allowed:
            raise ArqonError(
                FORBIDDEN,
                "register_agent needs admin on the whole tenant (role owner or admin, or a "
                "*:*:admin grant)",
                command.id,
            )
        if not self.config.has_security:
            raise ArqonError(UNAVAILABLE, "agent registration needs the gateway's NATS state")
        op = self.open_op(Pending("agent", command))
        tenant, role = self.principal.tenant, self.principal.role
        return [RegisterAgent(op, tenant, role, command.parameters)]

    def agent_registered(self, op: int, record: Mapping[str, Any]) -> list[Effect]:
        pending = self.pending.pop(op)
        assert pending.command is not None
        details = {"agent_id": record["agent_id"], "role": record["role"]}
        audit = Audit(self.principal.tenant, AUDIT_AGENT_REGISTERED, self.principal.id, details)
        result = {key: record[key] for key in ("agent_id", "tenant", "name", "role")}
        return [audit, self.reply(pending.command, result)]

    def credential_checked(self, op: int, principal: Identity) -> list[Effect]:
        """refresh_token's new credential was valid: the same principal's, or refused."""
        pending = self.pending.pop(op)
        command = pending.command
        assert command is not None
        if principal.tenant != self.principal.tenant or principal.id != self.principal.id:
            error = ArqonError(
                FORBIDDEN,
                "the new credential is another tenant's or principal's: refresh_token renews "
                "this connection's own credential only (reconnect to change identity)",
            )
            return self.refuse(command, error)
        self.principal = principal
        self.policy = authz.policy_for(principal.role, tuple(principal.grants))
        self.decisions.clear()
        effects = self._drop_what_is_no_longer_allowed()
        effects.append(ArmExpiry(None if self.closed else principal.expires_at))
        result = {"expires_at": principal.expires_at, "role": principal.role}
        return [*effects, self.reply(command, result)]

    def _drop_what_is_no_longer_allowed(self) -> list[Effect]:
        """After refresh_token narrowed the rights: leave channels and handlers it denies."""
        subscribe, handle = authz.Permission.SUBSCRIBE, authz.Permission.HANDLE
        refs = [r for r in self.joined if not self.policy.decide(subscribe, r.room, r.channel)]
        handlers = [
            (r, n) for r, n in self.handlers if not self.policy.decide(handle, r.room, r.channel)
        ]
        if not refs and not handlers:
            return []
        dropped = sorted(
            {f"{ref.room}/{ref.channel}" for ref in refs}
            | {f"{ref.room}/{ref.channel}:{name}" for ref, name in handlers}
        )
        error = ArqonError(FORBIDDEN, "the refreshed credential no longer allows these")
        return [*self.drop(refs, handlers), self.error(error, {"dropped": dropped})]

    def drop(self, refs: list[ChannelRef], handlers: list[tuple[ChannelRef, str]]) -> list[Effect]:
        """Leave these channels and stop serving these handlers (the client is told apart)."""
        effects: list[Effect] = []
        for ref in refs:
            self.joined.pop(ref, None)
            effects.append(Leave(ref))
        for ref, name in handlers:
            self.handlers.pop((ref, name), None)
            effects.append(Unserve(ref, name, background=True))
        return effects
