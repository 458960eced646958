"""Who may do what: permissions, capabilities, roles and the decision. Pure, no I/O.

A principal's capabilities are its role's capabilities plus its grants. A capability is a
room/channel pattern (``ROOM:CHANNEL``, each part a name or ``*``) and a set of permissions.
Grants are strings ``ROOM:CHANNEL:perm1,perm2`` (or ``ROOM:CHANNEL:*`` for every permission),
e.g. ``science:*:publish`` or ``*:alerts:subscribe,history``. Everything is scoped to the
principal's tenant: a pattern never reaches another tenant.

Roles:

============  ==============================================================================
role          capabilities
============  ==============================================================================
owner         every permission, including ``admin``, on ``*:*``
admin         every permission, including ``admin``, on ``*:*`` (of the tenant)
member        publish, subscribe, history, presence, command, handle on ``*:*``
read-only     subscribe, history, presence on ``*:*``
============  ==============================================================================

An unknown role denies everything, whatever its grants; so does a principal with a grant that
does not parse (fail closed; authenticators should reject such credentials at the handshake
with :func:`parse_grants`).

What each client action needs (``shared/commands.py``, ``gateway/ws/session.py``):

=============================================  ==============  ==========================
client action                                  permission      answered ``forbidden`` as
=============================================  ==============  ==========================
``event`` (publish)                            ``publish``     ``error``
``join_channel``                               ``subscribe``   ``command_response``
``history``                                    ``history``     ``command_response``
``leave_channel``                              none            (never forbidden)
``register_handler`` / ``unregister_handler``  ``handle``      ``command_response``
a service command (any other command name)     ``command``     ``command_response``
``command_response`` (a handler's answer)      none            (the delivery it answers
                                                               needed ``handle``)
=============================================  ==============  ==========================

``presence`` has no command yet (reserved for a presence command); ``admin`` is reserved for
tenant administration commands. Both are part of the grant syntax already.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from arqonbus_server.shared.errors import InvalidInput
from arqonbus_server.shared.subjects import is_valid_name

WILDCARD = "*"


class Permission(StrEnum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    HISTORY = "history"
    PRESENCE = "presence"
    COMMAND = "command"
    HANDLE = "handle"
    ADMIN = "admin"


ALL_PERMISSIONS: frozenset[Permission] = frozenset(Permission)
_PERMISSION_NAMES = ", ".join(p.value for p in Permission)

# Client actions (built-in command names and "event") and the permission each needs; None:
# no permission needed. Any other command name is a service command and needs COMMAND.
ACTION_PERMISSIONS: dict[str, Permission | None] = {
    "event": Permission.PUBLISH,
    "join_channel": Permission.SUBSCRIBE,
    "leave_channel": None,
    "history": Permission.HISTORY,
    "register_handler": Permission.HANDLE,
    "unregister_handler": Permission.HANDLE,
    "register_agent": Permission.ADMIN,  # agent identity (gateway/auth/agent.py)
    "refresh_token": None,  # the new credential must be the same principal's
    "limits": None,  # rate limits and usage (gateway/state/limits.py)
    # private rooms, bans, mutes (gateway/state/rooms.py): admin on the envelope's room/channel
    "room_configure": Permission.ADMIN,
    "room_invite": Permission.ADMIN,
    "room_uninvite": Permission.ADMIN,
    "room_ban": Permission.ADMIN,
    "room_unban": Permission.ADMIN,
    "room_mute": Permission.ADMIN,
    "room_unmute": Permission.ADMIN,
    "room_info": Permission.ADMIN,
    # presence (gateway/state/presence.py): reading it needs `presence`; entering it comes
    # with join_channel (subscribe); set_presence changes only the connection's own entries
    "presence": Permission.PRESENCE,
    "occupancy": Permission.PRESENCE,
    "set_presence": None,
    # built-in admin commands (gateway/state/admin.py); shared/commands.py says on which
    # room and channel each is checked (the tenant's "*", the room's "*", or the envelope's)
    "ping": None,
    "status": Permission.ADMIN,
    "list_rooms": Permission.ADMIN,
    "list_channels": Permission.ADMIN,
    "channel_info": Permission.ADMIN,
    "create_room": Permission.ADMIN,
    "configure_room": Permission.ADMIN,
    "delete_room": Permission.ADMIN,
    "kick": Permission.ADMIN,
}


def permission_for_command(name: str) -> Permission | None:
    """The permission a command needs: its built-in entry, else ``command`` (a service call)."""
    return ACTION_PERMISSIONS.get(name, Permission.COMMAND)


class GrantError(InvalidInput):
    """A grant string does not parse. ``problem`` says what is wrong, ``fix`` what to do."""

    def __init__(self, grant: str, problem: str, fix: str) -> None:
        self.grant = grant
        self.problem = problem
        self.fix = fix
        super().__init__(f"invalid grant {grant[:200]!r}: {problem}. {fix}")


@dataclass(frozen=True, slots=True)
class Capability:
    """Permissions on the channels matching ``room``:``channel`` (each a name or ``*``)."""

    room: str
    channel: str
    permissions: frozenset[Permission]

    def matches(self, room: str, channel: str) -> bool:
        return (self.room == WILDCARD or self.room == room) and (
            self.channel == WILDCARD or self.channel == channel
        )

    @property
    def pattern(self) -> str:
        return f"{self.room}:{self.channel}"


_GRANT_FORMAT = (
    "Write ROOM:CHANNEL:PERMS, where ROOM and CHANNEL are names (1-64 characters of "
    f"A-Z a-z 0-9 _ -) or '*', and PERMS is '*' or a comma-separated list of: {_PERMISSION_NAMES}"
)


@functools.lru_cache(maxsize=4096)
def parse_grant(grant: str) -> Capability:
    """``ROOM:CHANNEL:perm1,perm2`` (or ``...:*``) -> :class:`Capability`; :class:`GrantError`."""
    if not isinstance(grant, str):
        raise GrantError(repr(grant), "a grant must be a string", _GRANT_FORMAT)
    parts = grant.strip().split(":")
    if len(parts) != 3:
        raise GrantError(
            grant, f"expected 3 parts separated by ':', found {len(parts)}", _GRANT_FORMAT
        )
    room, channel, perms = parts
    for label, value in (("room", room), ("channel", channel)):
        if value != WILDCARD and not is_valid_name(value):
            raise GrantError(
                grant,
                f"{label} {value[:64]!r} is neither a name nor '*' (partial wildcards such as "
                "'sci*' are not supported)",
                _GRANT_FORMAT,
            )
    if perms.strip() == WILDCARD:
        return Capability(room, channel, ALL_PERMISSIONS)
    permissions: set[Permission] = set()
    for raw in perms.split(","):
        name = raw.strip()
        if not name:
            raise GrantError(grant, "the permission list has an empty entry", _GRANT_FORMAT)
        try:
            permissions.add(Permission(name))
        except ValueError:
            raise GrantError(
                grant,
                f"unknown permission {name[:64]!r}",
                f"Use '*' or any of: {_PERMISSION_NAMES}",
            ) from None
    return Capability(room, channel, frozenset(permissions))


def parse_grants(grants: Iterable[str]) -> tuple[Capability, ...]:
    """Every grant parsed; the first bad one raises :class:`GrantError`."""
    return tuple(parse_grant(grant) for grant in grants)


_EVERYTHING = (Capability(WILDCARD, WILDCARD, ALL_PERMISSIONS),)
ROLES: dict[str, tuple[Capability, ...]] = {
    "owner": _EVERYTHING,
    "admin": _EVERYTHING,
    "member": (Capability(WILDCARD, WILDCARD, ALL_PERMISSIONS - {Permission.ADMIN}),),
    "read-only": (
        Capability(
            WILDCARD,
            WILDCARD,
            frozenset({Permission.SUBSCRIBE, Permission.HISTORY, Permission.PRESENCE}),
        ),
    ),
    # read-only without presence: a viewer that must not see who else is there
    "viewer": (
        Capability(WILDCARD, WILDCARD, frozenset({Permission.SUBSCRIBE, Permission.HISTORY})),
    ),
}
ROLE_NAMES = ", ".join(ROLES)


def is_known_role(role: str) -> bool:
    return role in ROLES


# Roles by rank: a principal may give out (to an agent it registers) its own role or lower.
_ROLE_RANK = {"viewer": -1, "read-only": 0, "member": 1, "admin": 2, "owner": 3}


def may_give_role(giver_role: str, role: str) -> bool:
    """Whether a principal with ``giver_role`` may give ``role`` to another principal."""
    return _ROLE_RANK.get(role, 99) <= _ROLE_RANK.get(giver_role, -1)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


class Policy:
    """A principal's capabilities, compiled once: role capabilities, then grants."""

    __slots__ = ("_capabilities", "_denial", "_sources", "role")

    def __init__(self, role: str, grants: tuple[str, ...]) -> None:
        self.role = role
        self._denial: str | None = None
        self._capabilities: tuple[Capability, ...] = ()
        self._sources: tuple[str, ...] = ()
        if role not in ROLES:
            self._denial = (
                f"unknown role {role[:64]!r} denies every action (known roles: {ROLE_NAMES})"
            )
            return
        try:
            granted = parse_grants(grants)
        except GrantError as exc:
            self._denial = f"the credential has an invalid grant, so every action is denied: {exc}"
            return
        role_caps = ROLES[role]
        self._capabilities = role_caps + granted
        self._sources = tuple(f"role {role!r}" for _ in role_caps) + tuple(
            f"grant {grant.strip()!r}" for grant in grants
        )

    def decide(self, permission: Permission | None, room: str, channel: str) -> Decision:
        """Denial reasons name the permission, the room and the channel, and why."""
        what = (
            "any action"
            if permission is None
            else f"permission {permission.value!r} on room {room!r}, channel {channel!r}"
        )
        if self._denial is not None:
            return Decision(False, f"{what} denied: {self._denial}")
        if permission is None:
            return Decision(True, "no permission needed")
        for capability, source in zip(self._capabilities, self._sources, strict=True):
            if permission in capability.permissions and capability.matches(room, channel):
                return Decision(True, f"{source} allows {permission.value} on {capability.pattern}")
        return Decision(
            False,
            f"{what} denied: role {self.role!r} and its grants do not include it (a grant "
            f"such as '{room}:{channel}:{permission.value}' would)",
        )


@functools.lru_cache(maxsize=1024)
def policy_for(role: str, grants: tuple[str, ...] = ()) -> Policy:
    """The compiled policy of a (role, grants) pair, shared by every session that has it."""
    return Policy(role, grants)


def _resolve(action: Permission | str | None) -> Permission | None:
    if action is None or isinstance(action, Permission):
        return action
    if action in ACTION_PERMISSIONS:
        return ACTION_PERMISSIONS[action]
    try:
        return Permission(action)
    except ValueError:
        raise ValueError(
            f"unknown action {action[:64]!r}: pass a permission ({_PERMISSION_NAMES}) or a "
            f"client action ({', '.join(ACTION_PERMISSIONS)}); a service command needs "
            "'command' (see permission_for_command)"
        ) from None


def decide(
    role: str,
    grants: Iterable[str],
    action: Permission | str | None,
    room: str,
    channel: str,
) -> Decision:
    """May a principal with ``role`` and ``grants`` do ``action`` on ``room``/``channel``?

    ``action`` is a :class:`Permission`, a permission name, or a client action name from
    :data:`ACTION_PERMISSIONS` (``event``, ``join_channel``, ...); ``None`` needs nothing.
    """
    return policy_for(role, tuple(grants)).decide(_resolve(action), room, channel)
