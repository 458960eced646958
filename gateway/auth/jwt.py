"""JWT bearer tokens (``ARQONBUS_AUTH=jwt``), verified with PyJWT.

Security choices, in one place:

- Algorithms come from an explicit allowlist (``ARQONBUS_JWT_ALGORITHMS``); ``none`` is
  never accepted. HMAC (``HS*``) is allowed only with a shared secret, and then nothing
  else is: a deployment never mixes symmetric and public keys, so a token signed with
  HS256 using a public key as the "secret" (key confusion) finds no key to match.
- Each key is bound to the algorithms of its type (RSA: RS*/PS*, EC: ES* of its curve,
  Ed25519: EdDSA); the token's ``alg`` must be one of them.
- Exactly one key source: a shared secret (value or file), a PEM public key file, a JWKS
  file or a JWKS URL. With a key set the token's ``kid`` must name a known key; with one
  configured key a well-formed ``kid`` is ignored. A malformed or path-like ``kid`` is
  always refused and never triggers a key fetch.
- ``exp`` and ``sub`` are required; ``nbf``/``iat`` are checked when present; ``aud`` and
  ``iss`` are required and checked when configured. Leeway applies to all time checks.
- No message or log line contains the token or the secret.

JWKS URL: ``authenticate`` is synchronous and runs on the event loop, so it never touches
the network. The key set is fetched once at start (bounded by FETCH_TIMEOUT_S), then by a
background thread every ``ARQONBUS_JWT_JWKS_REFRESH_S`` seconds and, when a token names an
unknown ``kid``, at most once per MIN_REFETCH_S. The token that named the unknown key is
refused at once ("retry shortly"); a retry after the fetch succeeds. If the URL fails, the
last good key set stays in use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from arqonbus_server.gateway.auth.base import AuthError, Credentials, Principal
from arqonbus_server.shared import authz
from arqonbus_server.shared.subjects import is_valid_name

if TYPE_CHECKING:
    from arqonbus_server.shared.settings import Settings

log = logging.getLogger("arqonbus.gateway.auth.jwt")

DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
SUPPORTED_ALGORITHMS = HMAC_ALGORITHMS | _RSA_ALGORITHMS | set(_EC_ALGORITHMS.values()) | {"EdDSA"}
DEFAULT_ROLE = "member"

MAX_TOKEN_CHARS = 16 * 1024  # longer is refused before any parsing
MAX_GRANTS = 1000
MIN_SECRET_BYTES = 32  # RFC 7518 section 3.2: at least the hash size for HS256
FETCH_TIMEOUT_S = 5.0
MAX_JWKS_BYTES = 1024 * 1024
MIN_REFETCH_S = 10.0  # unknown kids trigger at most one JWKS fetch per this interval

# A kid is an opaque string; these characters cover key ids issuers use (thumbprints,
# base64, UUIDs). Anything else, or a path-like value, is refused without a lookup.
_KID = re.compile(r"[A-Za-z0-9._~+/=:-]{1,256}")


def parse_algorithms(value: str | Iterable[str]) -> tuple[str, ...]:
    """The allowlist from ``RS256,ES256`` (or a sequence); ValueError names the fix."""
    items = value.split(",") if isinstance(value, str) else list(value)
    algorithms = tuple(dict.fromkeys(a.strip() for a in items if a.strip()))
    if not algorithms:
        raise ValueError("no JWT algorithm listed: set e.g. RS256,ES256,EdDSA")
    for alg in algorithms:
        if alg.lower() == "none":
            raise ValueError("'none' is never an accepted JWT algorithm: remove it")
        if alg not in SUPPORTED_ALGORITHMS:
            raise ValueError(
                f"unknown JWT algorithm {alg!r}: use some of {', '.join(sorted(SUPPORTED_ALGORITHMS))}"
            )
    return algorithms


def is_path_like(kid: str) -> bool:
    return ".." in kid or kid.startswith(("/", ".", "~")) or "\\" in kid


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """One key and the algorithms it may verify."""

    kid: str | None
    algorithms: frozenset[str]
    key: Any  # a cryptography public key, or the HMAC secret as bytes


def _algorithms_for(public_key: Any) -> frozenset[str]:
    if isinstance(public_key, rsa.RSAPublicKey):
        return _RSA_ALGORITHMS
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGORITHMS.get(public_key.curve.name)
        return frozenset({alg}) if alg else frozenset()
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


def keys_from_jwks(document: Any, allowed: frozenset[str], source: str) -> dict[str, VerifyKey]:
    """The usable keys of a JWKS document by kid (asymmetric, signing, allowed algorithm)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError(f'{source} is not a JWKS document: expected {{"keys": [...]}}')
    keys: dict[str, VerifyKey] = {}
    for index, jwk in enumerate(document["keys"]):
        if not isinstance(jwk, dict):
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not _KID.fullmatch(kid) or is_path_like(kid):
            log.warning("%s: key #%d skipped: it has no valid kid", source, index)
            continue
        if jwk.get("kty") == "oct" or jwk.get("use", "sig") != "sig":
            log.warning("%s: key %s skipped: not an asymmetric signing key", source, kid)
            continue
        try:
            parsed = jwt.PyJWK(jwk)
        except jwt.PyJWTError as exc:
            log.warning("%s: key %s skipped: %s", source, kid, exc)
            continue
        algorithms = _algorithms_for(parsed.key) & {parsed.algorithm_name} & allowed
        if not algorithms:
            log.warning(
                "%s: key %s skipped: its algorithm %s is not in ARQONBUS_JWT_ALGORITHMS",
                source,
                kid,
                parsed.algorithm_name,
            )
            continue
        keys[kid] = VerifyKey(kid, frozenset(algorithms), parsed.key)
    return keys


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


class RemoteKeySet:
    """A JWKS URL, fetched in a background thread; reads never block.

    ``keys`` is replaced whole on each successful fetch (an atomic reference swap).
    """

    def __init__(
        self,
        url: str,
        allowed: frozenset[str],
        refresh_s: float,
        min_refetch_s: float = MIN_REFETCH_S,
    ) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in ("https", "http"):
            raise ValueError(f"ARQONBUS_JWT_JWKS_URL must be an http(s) URL, not {scheme!r}")
        self.url = url
        self.source = _redact_url(url)
        self.allowed = allowed
        self.refresh_s = refresh_s
        self.min_refetch_s = min(min_refetch_s, refresh_s)
        self.keys: dict[str, VerifyKey] = {}
        self.loaded = False
        self.fetches = 0
        self._last_fetch = float("-inf")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._fetched = threading.Condition()
        self.fetch()  # once at start, bounded by FETCH_TIMEOUT_S
        self._thread = threading.Thread(target=self._run, name="arqonbus-jwks", daemon=True)
        self._thread.start()

    def fetch(self) -> bool:
        """Fetch and swap in the key set; on failure keep the last good one."""
        self._last_fetch = time.monotonic()
        try:
            request = urllib.request.Request(self.url, headers={"Accept": "application/json"})
            with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
                body = response.read(MAX_JWKS_BYTES + 1)
            if len(body) > MAX_JWKS_BYTES:
                raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
            keys = keys_from_jwks(json.loads(body), self.allowed, self.source)
        except Exception as exc:
            log.error(
                "JWKS %s could not be loaded (%s); %s", self.source, exc,
                "keeping the previous keys" if self.loaded else "every token is refused until it loads",
            )  # fmt: skip
            self._count_fetch()
            return False
        changed = set(keys) != set(self.keys)
        self.keys = keys
        self.loaded = True
        if changed:
            log.info(
                "JWKS %s: %d signing key(s): %s", self.source, len(keys), ", ".join(sorted(keys))
            )
        self._count_fetch()
        return True

    def _count_fetch(self) -> None:
        with self._fetched:
            self.fetches += 1
            self._fetched.notify_all()

    def wait_for_fetches(self, count: int, timeout: float) -> bool:
        """Block until ``count`` fetches have finished (tests, tools); False on timeout."""
        with self._fetched:
            return self._fetched.wait_for(lambda: self.fetches >= count, timeout)

    @property
    def refresh_requested(self) -> bool:
        """A fetch was asked for (:meth:`request_refresh`) and the thread has not begun it."""
        return self._wake.is_set()

    def request_refresh(self) -> None:
        """Ask for a fetch soon (an unknown kid); at most one per ``min_refetch_s``."""
        if time.monotonic() - self._last_fetch >= self.min_refetch_s:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.refresh_s if self.loaded else self.min_refetch_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            if time.monotonic() - self._last_fetch >= self.min_refetch_s:
                self.fetch()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(FETCH_TIMEOUT_S + 1)


class JwtAuthenticator:
    """Verifies a JWT and maps its claims to a :class:`Principal`."""

    name = "jwt"

    def __init__(
        self,
        *,
        algorithms: Iterable[str] = DEFAULT_ALGORITHMS,
        secret: bytes | None = None,
        public_key_pem: bytes | None = None,
        jwks: Mapping[str, Any] | None = None,
        jwks_url: str | None = None,
        jwks_refresh_s: float = 300.0,
        jwks_min_refetch_s: float = MIN_REFETCH_S,
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: float = 30.0,
        tenant_claim: str = "tenant",
    ) -> None:
        self.algorithms = parse_algorithms(algorithms)
        allowed = frozenset(self.algorithms)
        sources = [s for s in (secret, public_key_pem, jwks, jwks_url) if s is not None]
        if len(sources) != 1:
            raise ValueError(
                "JWT mode needs exactly one key source: set one of ARQONBUS_JWT_SECRET_FILE (or "
                "ARQONBUS_JWT_SECRET), ARQONBUS_JWT_PUBLIC_KEY_FILE, ARQONBUS_JWT_JWKS_FILE, "
                f"ARQONBUS_JWT_JWKS_URL ({len(sources)} set)"
            )
        hmac = allowed & HMAC_ALGORITHMS
        if secret is not None:
            if allowed - HMAC_ALGORITHMS:
                raise ValueError(
                    "with a shared secret only HS256/HS384/HS512 may be allowed: set "
                    "ARQONBUS_JWT_ALGORITHMS=HS256"
                )
            if len(secret) < MIN_SECRET_BYTES:
                raise ValueError(
                    f"the JWT shared secret must be at least {MIN_SECRET_BYTES} bytes (random)"
                )
        elif hmac:
            raise ValueError(
                f"{', '.join(sorted(hmac))} need a shared secret (ARQONBUS_JWT_SECRET_FILE); with "
                "public keys remove them from ARQONBUS_JWT_ALGORITHMS"
            )
        self.audience = audience or None
        self.issuer = issuer or None
        self.leeway_s = leeway_s
        self.tenant_claim = tenant_claim
        self._single: VerifyKey | None = None
        self._static: dict[str, VerifyKey] | None = None
        self._remote: RemoteKeySet | None = None
        if secret is not None:
            self._single = VerifyKey(None, frozenset(allowed), secret)
        elif public_key_pem is not None:
            try:
                public_key = load_pem_public_key(public_key_pem)
            except ValueError:
                raise ValueError(
                    "ARQONBUS_JWT_PUBLIC_KEY_FILE is not a PEM public key "
                    "(-----BEGIN PUBLIC KEY-----)"
                ) from None
            algs = _algorithms_for(public_key) & allowed
            if not algs:
                raise ValueError(
                    "the public key's type allows none of ARQONBUS_JWT_ALGORITHMS "
                    "(RSA: RS256.., EC P-256: ES256, Ed25519: EdDSA)"
                )
            self._single = VerifyKey(None, frozenset(algs), public_key)
        elif jwks is not None:
            self._static = keys_from_jwks(jwks, allowed, "ARQONBUS_JWT_JWKS_FILE")
            if not self._static:
                raise ValueError("ARQONBUS_JWT_JWKS_FILE holds no usable signing key")
        elif jwks_url is not None:
            self._remote = RemoteKeySet(jwks_url, allowed, jwks_refresh_s, jwks_min_refetch_s)
        self._required = ["exp", "sub"]
        if self.audience:
            self._required.append("aud")
        if self.issuer:
            self._required.append("iss")

    @classmethod
    def from_settings(cls, settings: Settings) -> JwtAuthenticator:
        secret: bytes | None = None
        if settings.jwt_secret_file:
            secret = _read_file(settings.jwt_secret_file, "ARQONBUS_JWT_SECRET_FILE").strip()
        elif settings.jwt_secret.get_secret_value():
            secret = settings.jwt_secret.get_secret_value().encode()
        pem = (
            _read_file(settings.jwt_public_key_file, "ARQONBUS_JWT_PUBLIC_KEY_FILE")
            if settings.jwt_public_key_file
            else None
        )
        jwks = None
        if settings.jwt_jwks_file:
            raw = _read_file(settings.jwt_jwks_file, "ARQONBUS_JWT_JWKS_FILE")
            try:
                jwks = json.loads(raw)
            except ValueError:
                raise ValueError("ARQONBUS_JWT_JWKS_FILE is not JSON") from None
        return cls(
            algorithms=settings.jwt_algorithms,
            secret=secret,
            public_key_pem=pem,
            jwks=jwks,
            jwks_url=settings.jwt_jwks_url or None,
            jwks_refresh_s=settings.jwt_jwks_refresh_s,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway_s=settings.jwt_leeway_s,
            tenant_claim=settings.jwt_tenant_claim,
        )

    @property
    def key_set(self) -> RemoteKeySet | None:
        """The key set fetched from ``jwks_url``; None with any other key source."""
        return self._remote

    def close(self) -> None:
        """Stop the JWKS refresh thread (if any)."""
        if self._remote is not None:
            self._remote.close()

    # -- verification -------------------------------------------------------------------

    def authenticate(self, credentials: Credentials) -> Principal:
        claims = self._verify(credentials.token)
        # The session is closed (4004) once the token has expired, leeway included.
        expires_at = float(claims["exp"]) + self.leeway_s
        return dataclasses.replace(self._principal(claims), expires_at=expires_at)

    def _key_for(self, header: Mapping[str, Any]) -> VerifyKey:
        kid = header.get("kid")
        if kid is not None and (
            not isinstance(kid, str) or not _KID.fullmatch(kid) or is_path_like(kid)
        ):
            raise AuthError("invalid token: malformed key id (kid) header")
        if self._single is not None:
            return self._single
        keys = self._static if self._static is not None else self._keys_remote()
        if kid is None:
            raise AuthError("invalid token: no key id (kid) header; the issuer must set one")
        key = keys.get(kid)
        if key is None:
            if self._remote is not None:
                self._remote.request_refresh()
                raise AuthError(
                    "unknown signing key (kid): if the issuer just rotated keys, retry in a few "
                    "seconds"
                )
            raise AuthError("unknown signing key (kid)")
        return key

    def _keys_remote(self) -> dict[str, VerifyKey]:
        assert self._remote is not None
        if not self._remote.loaded:
            self._remote.request_refresh()
            raise AuthError("signing keys not loaded yet (the JWKS URL has not answered): retry")
        return self._remote.keys

    def _signed_failure(self, message: str, token: str, key: VerifyKey, alg: str) -> AuthError:
        """A refusal after the signature verified: it names the token's tenant and jti, so
        the failure goes to that tenant's audit stream. (A token whose signature fails names
        no tenant: its claims are anyone's.)"""
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.PyJWTError:
            return AuthError(message)
        tenant = claims.get(self.tenant_claim)
        jti = claims.get("jti")
        return AuthError(
            message,
            tenant=tenant if isinstance(tenant, str) and is_valid_name(tenant) else "",
            credential_id=jti[:128] if isinstance(jti, str) else "",
        )

    def _verify(self, token: str | None) -> dict[str, Any]:
        if not token:
            raise AuthError(
                "missing token: send 'Authorization: Bearer <JWT>', the subprotocol "
                "'arqonbus.bearer.<JWT>' or ?token=<JWT>"
            )
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError(f"token too long (over {MAX_TOKEN_CHARS} characters)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed token: expected a JWT (three base64url parts)") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AuthError(
                f"token algorithm not accepted: this gateway accepts {', '.join(self.algorithms)}"
            )
        key = self._key_for(header)
        if alg not in key.algorithms:
            raise AuthError("token algorithm does not match its signing key")
        try:
            return jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={
                    "require": self._required,
                    "verify_aud": self.audience is not None,
                    "verify_iss": self.issuer is not None,
                    "verify_sub": False,  # checked as a name in _principal
                },
            )
        except jwt.ExpiredSignatureError:
            raise self._signed_failure("token expired: get a new token", token, key, alg) from None
        except jwt.ImmatureSignatureError:
            raise self._signed_failure(
                "token not yet valid (nbf/iat in the future): check clocks", token, key, alg
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the required '{exc.claim}' claim") from None
        except jwt.InvalidAudienceError:
            raise self._signed_failure(
                "token audience (aud) is not this gateway's", token, key, alg
            ) from None
        except jwt.InvalidIssuerError:
            raise self._signed_failure(
                "token issuer (iss) is not accepted", token, key, alg
            ) from None
        except jwt.InvalidSignatureError:
            raise AuthError("invalid token: bad signature") from None
        except jwt.PyJWTError:
            raise AuthError("invalid token: it could not be verified") from None

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        tenant = claims.get(self.tenant_claim)
        if not isinstance(tenant, str) or not is_valid_name(tenant):
            raise AuthError(
                f"token claim '{self.tenant_claim}' must be a tenant name: 1-64 characters of "
                "A-Z a-z 0-9 _ -"
            )
        sub = claims.get("sub")
        if not isinstance(sub, str) or not is_valid_name(sub):
            raise AuthError("token claim 'sub' must be 1-64 characters of A-Z a-z 0-9 _ -")
        role = claims.get("role", DEFAULT_ROLE)
        if not isinstance(role, str) or not authz.is_known_role(role):
            raise AuthError(f"token claim 'role' must be one of: {authz.ROLE_NAMES}")
        grants = claims.get("grants", [])
        if (
            not isinstance(grants, list)
            or len(grants) > MAX_GRANTS
            or not all(isinstance(g, str) for g in grants)
        ):
            raise AuthError(
                f"token claim 'grants' must be a list of at most {MAX_GRANTS} "
                "'ROOM:CHANNEL:perms' strings"
            )
        try:
            authz.parse_grants(grants)
        except authz.GrantError as exc:
            raise AuthError(f"token claim 'grants': {exc}") from None
        jti = claims.get("jti")
        credential_id = jti[:128] if isinstance(jti, str) else ""
        return Principal(
            tenant, sub, role, tuple(grants), method="jwt", credential_id=credential_id
        )


def _read_file(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{setting}: cannot read {path}: {exc.strerror}") from None
