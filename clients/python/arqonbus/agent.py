"""Ed25519 agent identity for the SDK: sign in with a key pair, never a shared secret.

Register the agent's public key with its tenant first (``arqonbus agents register`` or the
``register_agent`` command); then::

    agent = AgentCredentials.from_pem_file(agent_id, "agent.pem")
    async with Client(urls, agent=agent) as client: ...

On every connect (and reconnect) the client opens the connection without a token, takes
the single-use nonce of the gateway's ``auth_required`` frame, signs it with the current
time, and answers with an ``auth`` frame. A signed token is good for one sign-in only.

Needs the ``cryptography`` package (``pip install arqonbus[agent]``).
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

TOKEN_PREFIX = "ed25519:"
CONTEXT = b"arqonbus-agent-auth-v1\n"


def _load(pem: bytes) -> Ed25519PrivateKey:
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "agent identity needs the 'cryptography' package: pip install arqonbus[agent]"
        ) from exc
    key = load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the key is not an Ed25519 private key")
    return key


class AgentCredentials:
    """An agent id and its Ed25519 private key; signs a gateway's nonce on each sign-in."""

    def __init__(self, agent_id: str, private_key: Ed25519PrivateKey) -> None:
        if not agent_id:
            raise ValueError("agent_id is empty: use the id that registration printed")
        self.agent_id = agent_id
        self._key = private_key

    @classmethod
    def from_pem(cls, agent_id: str, pem: bytes | str) -> AgentCredentials:
        return cls(agent_id, _load(pem.encode() if isinstance(pem, str) else pem))

    @classmethod
    def from_pem_file(cls, agent_id: str, path: str | Path) -> AgentCredentials:
        return cls.from_pem(agent_id, Path(path).read_bytes())

    def token(self, nonce: str, timestamp: int | None = None) -> str:
        """The one-time token for ``nonce``: ``ed25519:<agent>:<nonce>:<time>:<signature>``."""
        stamp = int(time.time()) if timestamp is None else timestamp
        message = CONTEXT + f"{self.agent_id}\n{nonce}\n{stamp}".encode()
        signature = base64.urlsafe_b64encode(self._key.sign(message)).rstrip(b"=").decode()
        return f"{TOKEN_PREFIX}{self.agent_id}:{nonce}:{stamp}:{signature}"

    def __repr__(self) -> str:  # never the key
        return f"AgentCredentials(agent_id={self.agent_id!r})"
