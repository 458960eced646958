"""How the gateway and the CLIs authenticate to NATS: credentials, TLS, and the one broker factory.

Settings (``ARQONBUS_NATS_*``, see shared/settings.py) name at most one credential:

- ``nats_user`` + ``nats_password``   (server: ``authorization { users = [{user, password}] }``)
- ``nats_token``                       (server: ``authorization { token: ... }``)
- ``nats_nkey_seed_file``              (server: ``authorization { users = [{nkey: U...}] }``)
- ``nats_creds_file``                  (decentralized JWT auth: operator/account/user)

and optionally TLS: ``nats_tls_ca`` (verify the servers), ``nats_tls_cert`` + ``nats_tls_key``
(client certificate for mutual TLS), ``nats_tls_handshake_first``.

:func:`connect_options` turns them into nats-py ``connect()`` keyword arguments;
:func:`broker_from_settings` builds a :class:`~mesh.jetstream.JetStreamBroker` with them: every
place that connects to NATS on behalf of a gateway or a CLI should use it, so a production NATS
is never reached without the configured credentials.

Secrets (password, token, seeds) never appear in a message here, and URLs with credentials in
them (``nats://user:pass@host``) are refused: they would end up in logs.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

from arqonbus_server.shared.settings import NATS_FILES, ConfigError, Settings, redact_url


def check_files(settings: Settings) -> None:
    """Raise ValueError (naming the variable and the fix, never a secret) if a file the NATS
    settings name cannot be read or does not hold what it should. The other rules are pure
    and checked when the settings are built (shared/settings.py)."""
    for field, env in NATS_FILES:
        path = getattr(settings, field)
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ValueError(f"{env}={path} is not a readable file: fix the path or unset it")
    if settings.nats_nkey_seed_file:
        _check_seed_file(settings.nats_nkey_seed_file)
    if settings.nats_creds_file:
        text = Path(settings.nats_creds_file).read_text(errors="replace")
        if "BEGIN NATS USER JWT" not in text or "BEGIN USER NKEY SEED" not in text:
            raise ValueError(
                f"ARQONBUS_NATS_CREDS_FILE={settings.nats_creds_file} is not a NATS .creds file "
                "(a user JWT and its nkey seed, as `nsc generate creds` writes)"
            )


def _check_seed_file(path: str) -> None:
    seed = Path(path).read_bytes().strip()
    if not seed.startswith(b"SU"):
        raise ValueError(
            f"ARQONBUS_NATS_NKEY_SEED_FILE={path} does not hold a user nkey seed (one line "
            "starting with SU, as `nk -gen user` writes)"
        )
    try:
        import nkeys
    except ImportError:  # a dependency of ours; checked at connect time anyway
        return
    try:
        nkeys.from_seed(bytearray(seed)).wipe()
    except Exception:  # nkeys raises several error types; never echo the seed
        raise ValueError(
            f"ARQONBUS_NATS_NKEY_SEED_FILE={path} holds an invalid nkey seed (bad encoding or "
            "checksum): generate a new one with `nk -gen user`"
        ) from None


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The client TLS context for NATS, or None when no NATS TLS setting is given.

    Raises ConfigError naming the setting when a PEM file cannot be loaded.
    """
    if not (settings.nats_tls_ca or settings.nats_tls_cert or settings.nats_tls_handshake_first):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.nats_tls_ca:
        try:
            context.load_verify_locations(cafile=settings.nats_tls_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"invalid setting ARQONBUS_NATS_TLS_CA: cannot load {settings.nats_tls_ca} "
                f"as PEM CA certificates ({_reason(exc)})"
            ) from None
    if settings.nats_tls_cert:
        try:
            context.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                "invalid setting ARQONBUS_NATS_TLS_CERT/ARQONBUS_NATS_TLS_KEY: cannot load "
                f"{settings.nats_tls_cert} with key {settings.nats_tls_key} ({_reason(exc)}); "
                "both must be PEM and belong together"
            ) from None
    return context


def connect_failure(exc: BaseException) -> str:
    """Why connecting to NATS failed, with what to check; never a secret."""
    text = str(exc)
    if "authorization" in text.lower():  # nats-py: "nats: 'Authorization Violation'"
        return (
            "NATS refused the credentials (authorization violation): check ARQONBUS_NATS_USER "
            "and ARQONBUS_NATS_PASSWORD, ARQONBUS_NATS_TOKEN, ARQONBUS_NATS_NKEY_SEED_FILE or "
            "ARQONBUS_NATS_CREDS_FILE against the server's authorization block"
        )
    if isinstance(exc, ssl.SSLError):
        return (
            f"TLS to NATS failed ({_reason(exc)}): check ARQONBUS_NATS_TLS_CA (the CA that "
            "signed the servers' certificates) and, for mutual TLS, ARQONBUS_NATS_TLS_CERT/_KEY"
        )
    if "secure connection required" in text.lower() or "tls" in text.lower():
        return f"{text}: the server and the gateway disagree on TLS; see ARQONBUS_NATS_TLS_CA"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__


def connect_options(settings: Settings) -> dict[str, Any]:
    """nats-py ``connect()`` keyword arguments for the configured credentials and TLS."""
    options: dict[str, Any] = {}
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password.get_secret_value()
    elif settings.nats_token.get_secret_value():
        options["token"] = settings.nats_token.get_secret_value()
    elif settings.nats_nkey_seed_file:
        options["nkeys_seed"] = settings.nats_nkey_seed_file
    elif settings.nats_creds_file:
        options["user_credentials"] = settings.nats_creds_file
    context = tls_context(settings)
    if context is not None:
        options["tls"] = context
        if settings.nats_tls_handshake_first:
            options["tls_handshake_first"] = True
    return options


def describe_options(options: dict[str, Any]) -> str:
    """What ``options`` authenticate with, for a log line: never the secrets themselves."""
    if "user" in options:
        method = f"user {options['user']}"
    elif "token" in options:
        method = "a token"
    elif "nkeys_seed" in options:
        method = "an nkey"
    elif "user_credentials" in options:
        method = "a creds file"
    else:
        method = "no credentials"
    return method + (" over TLS" if "tls" in options else "")


__all__ = [
    "check_files",
    "connect_failure",
    "connect_options",
    "describe_options",
    "redact_url",
    "tls_context",
]
