"""JWT bearer tokens: the attack matrix, claims -> Principal, key sources, credentials."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from arqonbus_server.gateway.auth.base import AuthError, Credentials, Principal
from arqonbus_server.gateway.auth.chain import make_authenticator
from arqonbus_server.gateway.auth.jwt import JwtAuthenticator
from arqonbus_server.gateway.config import load_settings
from arqonbus_server.shared.settings import ConfigError
from tests.jwks import JwksServer
from tests.timeouts import SEC

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SECRET = b"0123456789abcdef0123456789abcdef-shared"

KEYS: dict[str, tuple[Any, str]] = {  # kid -> (private key, algorithm)
    "rsa1": (RSA_KEY, "RS256"),
    "ec1": (EC_KEY, "ES256"),
    "ed1": (ED_KEY, "EdDSA"),
}


def public_jwk(private_key: Any, kid: str) -> dict[str, Any]:
    pub = private_key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(pub, as_dict=True)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(pub, as_dict=True)
    else:
        jwk = jwt.algorithms.OKPAlgorithm.to_jwk(pub, as_dict=True)
    return {**jwk, "kid": kid, "use": "sig"}


def jwks(**keys: Any) -> dict[str, Any]:
    return {"keys": [public_jwk(key, kid) for kid, key in keys.items()]}


def pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "alice", "tenant": "acme", "exp": now + 600, "iat": now}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(payload: dict[str, Any], kid: str | None = "rsa1", key: Any = None, alg: str = "") -> str:
    if key is None:
        key, default_alg = KEYS[kid or "rsa1"]
        alg = alg or default_alg
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(payload, key, algorithm=alg or "RS256", headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A token built by hand: for algorithms PyJWT refuses to sign with (attacks)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b""
    if secret is not None:
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


@pytest.fixture(scope="module")
def auth() -> JwtAuthenticator:
    return JwtAuthenticator(
        jwks=jwks(rsa1=RSA_KEY, ec1=EC_KEY, ed1=ED_KEY),
        audience="arqonbus",
        issuer="https://idp.test",
    )


def good(**overrides: Any) -> dict[str, Any]:
    return claims(**{"aud": "arqonbus", "iss": "https://idp.test", **overrides})


def refused(authenticator: JwtAuthenticator, token: str, match: str) -> None:
    with pytest.raises(AuthError, match=match) as info:
        authenticator.authenticate(Credentials(token))
    assert token not in str(info.value)
    signature = token.rsplit(".", 1)[-1]
    assert len(signature) < 16 or signature not in str(info.value)


# -- accepted -----------------------------------------------------------------------------


@pytest.mark.parametrize("kid", ["rsa1", "ec1", "ed1"])
def test_good_tokens_of_each_algorithm_give_the_principal(auth: JwtAuthenticator, kid: str) -> None:
    payload = good(role="admin", grants=["science:*:publish,subscribe"])
    principal = auth.authenticate(Credentials(sign(payload, kid)))
    # The session closes (4004) once exp plus the leeway has passed.
    assert principal.expires_at == payload["exp"] + auth.leeway_s
    assert replace(principal, expires_at=None) == Principal(
        "acme", "alice", "admin", ("science:*:publish,subscribe",), method="jwt"
    )


def test_role_defaults_to_member_and_grants_to_none(auth: JwtAuthenticator) -> None:
    principal = auth.authenticate(Credentials(sign(good())))
    assert replace(principal, expires_at=None) == Principal(
        "acme", "alice", "member", (), method="jwt"
    )


def test_expires_at_is_the_verified_exp(auth: JwtAuthenticator) -> None:
    payload = good()
    principal = auth.authenticate(Credentials(sign(payload)))
    assert principal.expires_at == payload["exp"] + auth.leeway_s
    with pytest.raises(AuthError, match="expired"):
        auth.authenticate(Credentials(sign(good(exp=int(time.time()) - 3600))))


def test_tenant_claim_is_configurable() -> None:
    authenticator = JwtAuthenticator(jwks=jwks(rsa1=RSA_KEY), tenant_claim="org")
    token = sign(claims(tenant=None, org="globex"))
    assert authenticator.authenticate(Credentials(token)).tenant == "globex"
    refused(authenticator, sign(claims()), "claim 'org' must be a tenant name")


# -- the attack matrix -------------------------------------------------------------------


def test_alg_none_is_refused(auth: JwtAuthenticator) -> None:
    token = handmade({"alg": "none", "kid": "rsa1", "typ": "JWT"}, good(), None)
    refused(auth, token, "algorithm not accepted")


def test_alg_none_is_refused_even_if_listed() -> None:
    with pytest.raises(ValueError, match="'none' is never"):
        JwtAuthenticator(algorithms=["RS256", "none"], jwks=jwks(rsa1=RSA_KEY))
    with pytest.raises(ConfigError, match="never allowed"):
        load_settings(auth="jwt", jwt_algorithms="RS256,None")


def test_hs256_signed_with_the_public_key_is_refused(auth: JwtAuthenticator) -> None:
    """Key confusion: HMAC keyed with the RSA public key (PEM or its JWK) as the secret."""
    for secret in (pem(RSA_KEY), json.dumps(public_jwk(RSA_KEY, "rsa1")).encode()):
        token = handmade({"alg": "HS256", "kid": "rsa1", "typ": "JWT"}, good(), secret)
        refused(auth, token, "algorithm not accepted")
    # With a single PEM key configured (the classic vulnerable setup), and HS256 even
    # allowed by mistake, a public key can never act as an HMAC secret.
    single = JwtAuthenticator(public_key_pem=pem(RSA_KEY))
    token = handmade({"alg": "HS256", "typ": "JWT"}, claims(), pem(RSA_KEY))
    refused(single, token, "algorithm not accepted")
    with pytest.raises(ValueError, match="need a shared secret"):
        JwtAuthenticator(algorithms=["RS256", "HS256"], public_key_pem=pem(RSA_KEY))


def test_algorithm_must_match_the_key(auth: JwtAuthenticator) -> None:
    # An ES256 token naming the RSA key's kid.
    refused(
        auth, sign(good(), kid="rsa1", key=EC_KEY, alg="ES256"), "does not match its signing key"
    )


def test_unknown_kid_is_refused(auth: JwtAuthenticator) -> None:
    refused(auth, sign(good(), kid="rsa2", key=OTHER_RSA_KEY, alg="RS256"), "unknown signing key")


@pytest.mark.parametrize(
    "kid", ["../../etc/passwd", "/etc/passwd", "..", "a\\b", "kid with space", "", "x" * 300]
)
def test_path_like_or_malformed_kid_is_refused(auth: JwtAuthenticator, kid: str) -> None:
    refused(auth, sign(good(), kid=kid, key=RSA_KEY, alg="RS256"), "malformed key id")


def test_non_string_kid_is_refused(auth: JwtAuthenticator) -> None:
    token = handmade({"alg": "RS256", "kid": 7}, good(), b"x")
    refused(auth, token, "malformed")


def test_missing_kid_is_refused_with_a_key_set(auth: JwtAuthenticator) -> None:
    refused(auth, sign(good(), kid=None, key=RSA_KEY, alg="RS256"), "no key id")


def test_signature_by_another_key_is_refused(auth: JwtAuthenticator) -> None:
    refused(auth, sign(good(), kid="rsa1", key=OTHER_RSA_KEY, alg="RS256"), "bad signature")


def test_tampered_payload_is_refused(auth: JwtAuthenticator) -> None:
    header, _, signature = sign(good()).split(".")
    forged = b64(json.dumps(good(tenant="victim")).encode())
    refused(auth, f"{header}.{forged}.{signature}", "bad signature")


def test_expired_token_is_refused(auth: JwtAuthenticator) -> None:
    refused(auth, sign(good(exp=int(time.time()) - 3600)), "expired")


def test_not_yet_valid_token_is_refused(auth: JwtAuthenticator) -> None:
    refused(auth, sign(good(nbf=int(time.time()) + 3600)), "not yet valid")


def test_token_without_exp_is_refused(auth: JwtAuthenticator) -> None:
    refused(auth, sign(good(exp=None)), "required 'exp'")


@pytest.mark.parametrize("aud", ["other", ["other", "more"]])
def test_wrong_audience_is_refused(auth: JwtAuthenticator, aud: Any) -> None:
    refused(auth, sign(good(aud=aud)), "audience")


def test_missing_audience_is_refused_when_configured(auth: JwtAuthenticator) -> None:
    refused(auth, sign(claims(iss="https://idp.test")), "required 'aud'")


def test_wrong_or_missing_issuer_is_refused(auth: JwtAuthenticator) -> None:
    refused(auth, sign(good(iss="https://evil.test")), "issuer")
    refused(auth, sign(claims(aud="arqonbus")), "required 'iss'")


def test_audience_and_issuer_unchecked_when_not_configured() -> None:
    authenticator = JwtAuthenticator(jwks=jwks(rsa1=RSA_KEY))
    token = sign(claims(aud="anything", iss="anyone"))
    assert authenticator.authenticate(Credentials(token)).id == "alice"


def test_missing_sub_is_refused(auth: JwtAuthenticator) -> None:
    refused(auth, sign(good(sub=None)), "required 'sub'")


@pytest.mark.parametrize("sub", ["a.b", "../x", "", "x" * 65, 42])
def test_bad_sub_is_refused(auth: JwtAuthenticator, sub: Any) -> None:
    refused(auth, sign(good(sub=sub)), "sub")


@pytest.mark.parametrize("tenant", ["a.b", "acme>", "*", "", "x" * 65, 7, ["acme"], None])
def test_bad_or_missing_tenant_is_refused(auth: JwtAuthenticator, tenant: Any) -> None:
    payload = good()
    payload["tenant"] = tenant
    if tenant is None:
        del payload["tenant"]
    refused(auth, sign(payload), "claim 'tenant' must be a tenant name")


@pytest.mark.parametrize("role", ["root", "", 1, ["owner"]])
def test_unknown_role_is_refused(auth: JwtAuthenticator, role: Any) -> None:
    refused(auth, sign(good(role=role)), "claim 'role'")


@pytest.mark.parametrize(
    "grants", ["science:*:publish", ["science:*"], [{"a": 1}], ["sci*:x:publish"], ["a:b:fly"]]
)
def test_bad_grants_are_refused(auth: JwtAuthenticator, grants: Any) -> None:
    refused(auth, sign(good(grants=grants)), "claim 'grants'")


def test_garbage_and_oversized_tokens_are_refused(auth: JwtAuthenticator) -> None:
    refused(auth, "not-a-jwt", "malformed token")
    refused(auth, "a.b.c", "malformed token")
    refused(auth, "x" * 20_000, "too long")
    with pytest.raises(AuthError, match="missing token"):
        auth.authenticate(Credentials(None))


# -- leeway ------------------------------------------------------------------------------


def test_leeway_is_honoured() -> None:
    now = int(time.time())
    lenient = JwtAuthenticator(jwks=jwks(rsa1=RSA_KEY))  # default 30 s
    strict = JwtAuthenticator(jwks=jwks(rsa1=RSA_KEY), leeway_s=0)
    just_expired = sign(claims(exp=now - 10))
    almost_valid = sign(claims(nbf=now + 10))
    for token in (just_expired, almost_valid):
        assert lenient.authenticate(Credentials(token)).id == "alice"
    refused(strict, just_expired, "expired")
    refused(strict, almost_valid, "not yet valid")
    refused(lenient, sign(claims(exp=now - 60)), "expired")


# -- key sources and configuration -------------------------------------------------------


def test_pem_public_key(tmp_path: Path) -> None:
    single = JwtAuthenticator(algorithms=["EdDSA"], public_key_pem=pem(ED_KEY))
    token = sign(claims(), kid="whatever-the-idp-calls-it", key=ED_KEY, alg="EdDSA")
    assert single.authenticate(Credentials(token)).tenant == "acme"
    refused(single, sign(claims(), kid="../k", key=ED_KEY, alg="EdDSA"), "malformed key id")
    refused(single, sign(claims(), kid=None, key=OTHER_RSA_KEY, alg="RS256"), "not accepted")
    with pytest.raises(ValueError, match="allows none"):
        JwtAuthenticator(algorithms=["ES256"], public_key_pem=pem(RSA_KEY))


def test_shared_secret_hs256(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    settings = load_settings(auth="jwt", jwt_algorithms="HS256", jwt_secret_file=str(secret_file))
    authenticator = make_authenticator("jwt", settings)
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert authenticator.authenticate(Credentials(token)).id == "alice"
    forged = jwt.encode(claims(), b"another-secret-another-secret-32b", algorithm="HS256")
    with pytest.raises(AuthError, match="bad signature") as info:
        authenticator.authenticate(Credentials(forged))
    assert SECRET.decode() not in str(info.value)
    with pytest.raises(ValueError, match="only HS256"):
        JwtAuthenticator(secret=SECRET)  # default RS256,ES256,EdDSA with a secret
    with pytest.raises(ValueError, match="at least 32 bytes"):
        JwtAuthenticator(algorithms=["HS256"], secret=b"short")


def test_exactly_one_key_source() -> None:
    with pytest.raises(ValueError, match="exactly one key source"):
        JwtAuthenticator()
    with pytest.raises(ValueError, match="exactly one key source"):
        JwtAuthenticator(jwks=jwks(rsa1=RSA_KEY), public_key_pem=pem(RSA_KEY))
    with pytest.raises(ValueError, match="exactly one key source"):
        make_authenticator("jwt", load_settings(auth="jwt"))


def test_jwks_file_via_settings(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    document = jwks(rsa1=RSA_KEY)
    document["keys"].append({"kty": "oct", "kid": "sym", "k": b64(SECRET)})  # skipped
    path.write_text(json.dumps(document))
    authenticator = make_authenticator("jwt", load_settings(auth="jwt", jwt_jwks_file=str(path)))
    assert authenticator.authenticate(Credentials(sign(claims()))).id == "alice"
    token = handmade({"alg": "HS256", "kid": "sym"}, claims(), SECRET)
    with pytest.raises(AuthError, match="not accepted"):
        authenticator.authenticate(Credentials(token))
    with pytest.raises(ValueError, match="no usable signing key"):
        JwtAuthenticator(jwks={"keys": [{"kty": "oct", "kid": "sym", "k": b64(SECRET)}]})


def test_jwks_keys_outside_the_allowlist_are_skipped() -> None:
    authenticator = JwtAuthenticator(algorithms=["EdDSA"], jwks=jwks(rsa1=RSA_KEY, ed1=ED_KEY))
    assert authenticator.authenticate(Credentials(sign(claims(), "ed1"))).id == "alice"
    refused(authenticator, sign(claims(), "rsa1"), "not accepted")


# -- JWKS URL ----------------------------------------------------------------------------


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer(jwks(rsa1=RSA_KEY))
    yield server
    server.close()


def test_jwks_url_rotation_fetches_on_unknown_kid(jwks_server: JwksServer) -> None:
    authenticator = JwtAuthenticator(jwks_url=jwks_server.url, jwks_min_refetch_s=0)
    try:
        remote = authenticator.key_set
        assert remote is not None and remote.fetches == 1
        assert authenticator.authenticate(Credentials(sign(claims()))).id == "alice"
        # The issuer rotates to a new key: the first token is refused without waiting...
        jwks_server.document = jwks(rsa1=RSA_KEY, ec1=EC_KEY)
        refused(authenticator, sign(claims(), "ec1"), "retry in a few seconds")
        # ...and triggers a background fetch, after which the new key works.
        assert remote.wait_for_fetches(2, timeout=10 * SEC)
        assert authenticator.authenticate(Credentials(sign(claims(), "ec1"))).id == "alice"
    finally:
        authenticator.close()


def test_jwks_url_unknown_kids_refetch_at_most_once_per_interval(jwks_server: JwksServer) -> None:
    authenticator = JwtAuthenticator(jwks_url=jwks_server.url, jwks_min_refetch_s=3600)
    try:
        remote = authenticator.key_set
        assert remote is not None
        for index in range(20):
            refused(authenticator, sign(claims(), f"k{index}", EC_KEY, "ES256"), "unknown")
        assert not remote.refresh_requested
        assert remote.fetches == 1 and jwks_server.hits == 1
    finally:
        authenticator.close()


def test_jwks_url_down_at_start_refuses_then_recovers(jwks_server: JwksServer) -> None:
    port = jwks_server.httpd.server_address[1]
    jwks_server.close()  # nothing listens there now
    authenticator = JwtAuthenticator(
        jwks_url=f"http://127.0.0.1:{port}/jwks.json", jwks_min_refetch_s=0
    )
    try:
        remote = authenticator.key_set
        assert remote is not None and not remote.loaded
        refused(authenticator, sign(claims()), "not loaded yet")
    finally:
        authenticator.close()
    with pytest.raises(ValueError, match="http"):
        JwtAuthenticator(jwks_url="file:///etc/passwd")


# -- credentials -------------------------------------------------------------------------


def test_credentials_sources_and_precedence() -> None:
    assert Credentials.from_request("/ws?token=q", {}).token == "q"
    assert Credentials.from_request("/ws?token=q", {"Authorization": "Bearer h"}).token == "h"
    assert Credentials.from_request("/ws", {"authorization": "bearer h"}).token == "h"
    offered = {"Sec-WebSocket-Protocol": "arqonbus.bearer, arqonbus.bearer.abc.def.ghi"}
    assert Credentials.from_request("/ws?token=q", offered).token == "abc.def.ghi"
    assert Credentials.from_request("/ws", {**offered, "Authorization": "Bearer h"}).token == "h"
    assert (
        Credentials.from_request("/ws", {"Sec-WebSocket-Protocol": "arqonbus.bearer"}).token is None
    )
    assert Credentials.from_request("/ws", {"Authorization": "Basic x"}).token is None


def test_credentials_from_websockets_headers_with_repeated_fields() -> None:
    from websockets.datastructures import Headers

    headers = Headers()
    headers["Sec-WebSocket-Protocol"] = "chat"
    headers["Sec-WebSocket-Protocol"] = "arqonbus.bearer, arqonbus.bearer.t0k"
    assert Credentials.from_request("/ws", headers).token == "t0k"
    assert Credentials.offered_subprotocols(headers) == [
        "chat",
        "arqonbus.bearer",
        "arqonbus.bearer.t0k",
    ]


def test_select_subprotocol_never_echoes_the_token() -> None:
    assert (
        Credentials.select_subprotocol(["arqonbus.bearer", "arqonbus.bearer.t"])
        == "arqonbus.bearer"
    )
    assert Credentials.select_subprotocol(["arqonbus.bearer.t"]) is None
    assert Credentials.select_subprotocol([]) is None


def test_a_refusal_names_the_tenant_only_once_the_signature_verified(
    auth: JwtAuthenticator,
) -> None:
    # Verified signature, failed claim check: the failure belongs to the token's tenant
    # (it goes to that tenant's audit stream).
    expired = sign(good(exp=int(time.time()) - 3600, jti="tok-1"))
    with pytest.raises(AuthError) as info:
        auth.authenticate(Credentials(expired))
    assert (info.value.tenant, info.value.credential_id) == ("acme", "tok-1")
    with pytest.raises(AuthError) as info:
        auth.authenticate(Credentials(sign(good(aud="elsewhere"))))
    assert info.value.tenant == "acme"
    # Signed by someone else: its claims are anyone's, so no tenant is named.
    forged = sign(good(exp=int(time.time()) - 3600), kid="rsa1", key=OTHER_RSA_KEY, alg="RS256")
    with pytest.raises(AuthError) as info:
        auth.authenticate(Credentials(forged))
    assert (info.value.tenant, info.value.credential_id) == ("", "")
