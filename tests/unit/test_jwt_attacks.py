"""JWT attack vectors against the identity phase, each named after what it attacks.

Every token below must be denied with 401 (gRPC UNAUTHENTICATED) by the real
pipeline with real keys; none may reach authorization. The response body never
echoes the token.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from meshward.sidecar.domain.decision import Decision, Outcome
from tests.support.idp import SigningKey
from tests.support.sidecar import ISSUER, Clock, config, harness, issuer, pipeline, policy, request

OTHER = "https://other-idp.example.com"
KEY = SigningKey("RS256", kid="k1")
EC_KEY = SigningKey("ES256", kid="e1")
OTHER_KEY = SigningKey("RS256", kid="o1")
ATTACKER = SigningKey("RS256", kid="k1")  # same kid as the real key, different key material
NOW = 1_800_000_000


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(**over: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"iss": ISSUER, "aud": "orders", "sub": "alice", "iat": NOW, "exp": NOW + 300,
                         "jti": "j-1", "sid": "s-1"}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def sign(key: SigningKey = KEY, headers: dict[str, Any] | None = None, **over: Any) -> str:
    return jwt.encode(claims(**over), key.private, algorithm=key.alg, headers={"kid": key.kid, **(headers or {})})


def raw(header: str, payload: str, signature: str = "c2ln") -> str:
    return f"{header}.{payload}.{signature}"


def hs256_with_public_key_pem() -> str:
    """CVE-2015-9235 / CVE-2016-10555: sign with HS256 using the RSA public key as the HMAC secret."""
    import hashlib
    import hmac

    pem = KEY.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'kid': 'k1', 'typ': 'JWT'}))}.{b64(json.dumps(claims()))}"
    sig = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def attacker_with(header_extra: dict[str, Any]) -> str:
    """Signed by the attacker's key, pointing the verifier at attacker-controlled key material."""
    return sign(ATTACKER, header_extra)


def duplicated_header_alg() -> str:
    good = sign()
    _, p, s = good.split(".")
    header = b64('{"alg":"RS256","kid":"k1","alg":"none"}')
    return f"{header}.{p}.{s}"


def rs256_raw(header_json: str, payload_json: str) -> str:
    """A correctly RS256-signed token whose JSON text is exactly as given (PyJWT would refuse to build it)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    signing_input = f"{b64(header_json)}.{b64(payload_json)}"
    sig = KEY.private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(sig)}"


def duplicated_payload_sub() -> str:
    return rs256_raw(json.dumps({"alg": "RS256", "kid": "k1"}), json.dumps(claims())[:-1] + ', "sub": "admin"}')


def es256_der_signature() -> str:
    """An ES256 signature in DER instead of the JWS r||s form (RFC 7518 §3.4)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    header = b64(json.dumps({"alg": "ES256", "kid": "e1"}))
    signing_input = f"{header}.{b64(json.dumps(claims(iss=OTHER)))}"
    der = EC_KEY.private.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    return f"{signing_input}.{b64(der)}"


def modify_signature(token: str, fn: Callable[[str], str]) -> str:
    h, p, s = token.split(".")
    return f"{h}.{p}.{fn(s)}"


VALID_HEADER = b64(json.dumps({"alg": "RS256", "kid": "k1"}))
VALID_PAYLOAD = b64(json.dumps(claims()))

# (case id, token factory, substring of the reason)
ATTACKS: list[tuple[str, Callable[[], str], str]] = [
    ("rfc8725-2.1-alg-none", lambda: raw(b64('{"alg":"none"}'), VALID_PAYLOAD, ""), "not base64url"),
    ("rfc8725-2.1-alg-none-with-signature", lambda: raw(b64('{"alg":"none","kid":"k1"}'), VALID_PAYLOAD),
     "algorithm not allowed"),
    ("alg-None-capitalised", lambda: raw(b64('{"alg":"None","kid":"k1"}'), VALID_PAYLOAD), "algorithm not allowed"),
    ("cve-2015-9235-rs-to-hs-key-confusion", hs256_with_public_key_pem, "algorithm not allowed"),
    ("alg-not-allowed-for-issuer-es256", lambda: sign(EC_KEY), "algorithm not allowed"),
    ("kid-path-traversal", lambda: sign(headers={"kid": "../../../../../dev/null"}), "signing key not found"),
    ("kid-sql-injection", lambda: sign(headers={"kid": "x' OR '1'='1"}), "signing key not found"),
    ("kid-unknown", lambda: sign(headers={"kid": "no-such-key"}), "signing key not found"),
    ("kid-not-a-string", lambda: rs256_raw('{"alg":"RS256","kid":7}', json.dumps(claims())), "malformed key id"),
    ("kid-oversized", lambda: sign(headers={"kid": "k" * 300}), "malformed key id"),
    ("rfc7515-4.1.2-jku-injection", lambda: attacker_with({"jku": "https://evil.example/jwks.json"}),
     "invalid signature"),
    ("rfc7515-4.1.5-x5u-injection", lambda: attacker_with({"x5u": "https://evil.example/cert.pem"}),
     "invalid signature"),
    ("cve-2018-0114-embedded-jwk", lambda: attacker_with({"jwk": ATTACKER.jwk}), "invalid signature"),
    ("rfc7515-4.1.6-x5c-injection", lambda: attacker_with({"x5c": ["MIIBattacker"]}), "invalid signature"),
    ("rfc7515-4.1.11-crit-header", lambda: sign(headers={"crit": ["exp"]}), "critical header"),
    ("rfc7519-4.1.4-expired", lambda: sign(exp=NOW - 3600, iat=NOW - 7200), "expired"),
    ("rfc7519-4.1.4-expired-just-beyond-skew", lambda: sign(exp=NOW - 31, iat=NOW - 600), "expired"),
    ("rfc7519-4.1.5-not-yet-valid", lambda: sign(nbf=NOW + 120), "not yet valid"),
    ("rfc7519-4.1.6-iat-in-future", lambda: sign(iat=NOW + 120, exp=NOW + 600), "issued in the future"),
    ("lifetime-too-long", lambda: sign(exp=NOW + 86400 * 30), "lifetime too long"),
    ("missing-exp", lambda: sign(exp=None), "no expiry"),
    ("exp-not-a-number", lambda: sign(exp="tomorrow"), "not a number"),
    ("exp-boolean", lambda: sign(exp=True), "not a number"),
    ("rfc7519-4.1.1-wrong-issuer", lambda: sign(iss="https://evil.example"), "issuer not trusted"),
    ("missing-issuer", lambda: sign(iss=None), "issuer not trusted"),
    ("issuer-prefix-lookalike", lambda: sign(iss=ISSUER + ".evil.example"), "issuer not trusted"),
    ("rfc7519-4.1.3-audience-missing", lambda: sign(aud=None), "no audience"),
    ("rfc7519-4.1.3-audience-wrong", lambda: sign(aud="payments"), "audience not accepted"),
    ("audience-empty-array", lambda: sign(aud=[]), "no audience"),
    ("audience-array-of-numbers", lambda: sign(aud=[1, 2]), "audience not accepted"),
    ("audience-array-without-ours", lambda: sign(aud=["payments", "billing"]), "audience not accepted"),
    ("audience-case-variant", lambda: sign(aud="Orders"), "audience not accepted"),
    ("oversized-token", lambda: sign(pad="x" * 9000), "token too large"),
    ("bad-base64-header", lambda: raw("e30*", VALID_PAYLOAD), "header is not base64url"),
    ("bad-base64-payload", lambda: raw(VALID_HEADER, "eyJ!"), "payload is not base64url"),
    ("bad-base64-signature", lambda: raw(VALID_HEADER, VALID_PAYLOAD, "c2ln=="), "signature is not base64url"),
    ("bad-json-header", lambda: raw(b64("{alg:RS256"), VALID_PAYLOAD), "header is not JSON"),
    ("bad-json-payload", lambda: raw(VALID_HEADER, b64("{'sub':1")), "payload is not JSON"),
    ("payload-not-an-object", lambda: raw(VALID_HEADER, b64("[1,2]")), "not a JSON object"),
    ("header-invalid-utf8", lambda: raw(b64(b"\xff\xfe"), VALID_PAYLOAD), "header is not JSON"),
    ("signature-stripped", lambda: modify_signature(sign(), lambda s: ""), "signature is not base64url"),
    ("signature-truncated", lambda: modify_signature(sign(), lambda s: s[:-10]), "invalid signature"),
    ("signature-bit-flipped", lambda: modify_signature(sign(), lambda s: ("A" if s[5] != "A" else "B").join(
        [s[:5], s[6:]])), "invalid signature"),
    ("two-segments", lambda: ".".join(sign().split(".")[:2]), "three segments"),
    ("four-segments", lambda: sign() + ".extra", "three segments"),
    ("signed-by-another-trusted-issuers-key", lambda: sign(OTHER_KEY), "signing key not found"),
    ("other-issuers-token-with-our-kid", lambda: sign(ATTACKER, iss=OTHER), "signing key not found"),
    ("other-issuers-kid-with-forged-key", lambda: sign(ATTACKER, {"kid": "o1"}, iss=OTHER), "invalid signature"),
    ("duplicated-header-parameter", duplicated_header_alg, "duplicate member"),
    ("duplicated-payload-claim", duplicated_payload_sub, "duplicate member"),
    ("rfc7518-3.4-es256-der-signature", es256_der_signature, "invalid signature"),
    ("non-ascii-segment", lambda: raw(VALID_HEADER + "é", VALID_PAYLOAD), "header is not base64url"),
    # RFC 8725 §3.11 (explicit typing): a JWT made for another purpose, signed by the trusted IdP.
    ("rfc8725-3.11-logout-token-as-access-token", lambda: sign(headers={"typ": "logout+jwt"}), "token type"),
    ("rfc8725-3.11-security-event-token", lambda: sign(headers={"typ": "secevent+jwt"}), "token type"),
    ("rfc8725-3.11-dpop-proof-as-access-token", lambda: sign(headers={"typ": "dpop+jwt"}), "token type"),
    ("rfc8725-3.11-media-type-spelling", lambda: sign(headers={"typ": "application/logout+jwt"}), "token type"),
    ("typ-not-a-string", lambda: sign(headers={"typ": ["at+jwt"]}), "token type"),
]


def make(**issuer_extra: Any) -> Any:
    cfg = config(policy(jwt=[issuer(maxLifetimeSeconds=86400, algorithms=["RS256"], **issuer_extra),
                             issuer(OTHER, algorithms=["RS256", "ES256"])],
                        rules=[{"name": "all", "to": {"paths": ["*"]}}]))
    # A refetch for unknown kids just happened, so attack tokens cannot trigger another one.
    h = harness(cfg, jwks={ISSUER: [KEY.jwk], OTHER: [OTHER_KEY.jwk, EC_KEY.jwk]}, clock=Clock(NOW),
                kids_just_refetched=True)
    return h.pipeline, h.audit


def decide(p: Any, token: str) -> Decision:
    d = p.decide_now(request(token=token), "http")
    assert isinstance(d, Decision), f"a rate-limited unknown kid must be decided at once, got {d!r}"
    return d


def test_the_baseline_token_is_accepted() -> None:
    p, _ = make()
    d = decide(p, sign())
    assert d.outcome is Outcome.ALLOW
    assert ("x-meshward-sub", "alice") in d.headers_to_set


@pytest.mark.parametrize(("factory", "reason"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_attack_is_denied_with_401(factory: Callable[[], str], reason: str) -> None:
    p, audit = make()
    token = factory()
    d = decide(p, token)
    assert d.outcome is Outcome.UNAUTHENTICATED, d
    assert (d.wire.http, d.wire.grpc) == (401, 16)
    assert reason in d.reason
    assert any(h == "www-authenticate" and 'error="invalid_token"' in v for h, v in d.deny_headers)
    assert token not in d.body().decode()
    assert token not in audit.getvalue()


def test_there_are_at_least_30_named_attacks() -> None:
    assert len({a[0] for a in ATTACKS}) == len(ATTACKS) >= 30


def test_expired_within_clock_skew_is_accepted() -> None:
    p, _ = make()
    assert decide(p, sign(exp=NOW - 20, iat=NOW - 600)).outcome is Outcome.ALLOW


@pytest.mark.parametrize("claim", ["jti", "sub", "sid"])
def test_revoked_token_is_denied_even_when_cached(claim: str) -> None:
    values = {"jti": "j-1", "sub": f"{ISSUER}/alice", "sid": "s-1"}
    cfg = config(policy(jwt=[issuer()], rules=[{"name": "all"}]), revocations={claim: [values[claim]]})
    p, _, _ = pipeline(cfg, jwks={ISSUER: [KEY.jwk]}, clock=Clock(NOW))
    d = decide(p, sign())
    assert d.outcome is Outcome.UNAUTHENTICATED
    assert d.reason == "token revoked"


def test_token_replayed_after_its_key_was_removed_is_denied() -> None:
    """The cached verification dies with the key: a JWKS without the key invalidates it."""
    import asyncio


    h = harness(config(policy(jwt=[issuer(maxLifetimeSeconds=86400, algorithms=["RS256"])],
                              rules=[{"name": "all", "to": {"paths": ["*"]}}])),
                jwks={ISSUER: [KEY.jwk]}, clock=Clock(NOW), kids_just_refetched=True)
    p, token = h.pipeline, sign()
    assert decide(p, token).outcome is Outcome.ALLOW
    h.fetcher.docs[f"{ISSUER}/jwks.json"] = json.dumps({"keys": [SigningKey("RS256", "k2").jwk]}).encode()
    assert asyncio.run(h.keys.refresh(ISSUER)) is True
    d = decide(p, token)
    assert d.outcome is Outcome.UNAUTHENTICATED
    assert d.reason == "signing key not found"


@pytest.mark.parametrize("typ", [None, "JWT", "jwt", "at+jwt", "application/at+jwt", "AT+JWT"])
def test_access_token_types_are_accepted(typ: str | None) -> None:
    p, _ = make()
    assert decide(p, sign(headers={"typ": typ} if typ else None)).outcome is Outcome.ALLOW


def test_an_issuer_may_accept_another_token_type() -> None:
    p, _ = make(tokenTypes=["application/custom+jwt"])
    assert decide(p, sign(headers={"typ": "custom+jwt"})).outcome is Outcome.ALLOW
    assert decide(p, sign(headers={"typ": "at+jwt"})).outcome is Outcome.UNAUTHENTICATED  # the list replaces


@pytest.mark.parametrize(("iat", "exp", "allowed"), [
    (NOW, NOW + 10 * 365 * 86400, False),   # a 10-year token, signed by the trusted IdP
    (None, NOW + 10 * 365 * 86400, False),  # the same without iat: measured from now
    (NOW - 60, NOW + 86400 - 120, True),    # just under a day
])
def test_rfc8725_long_lived_tokens_are_refused_by_default(iat: int | None, exp: int, allowed: bool) -> None:
    cfg = config(policy(jwt=[issuer(algorithms=["RS256"])], rules=[{"name": "all"}]))
    p, _, _ = pipeline(cfg, jwks={ISSUER: [KEY.jwk]}, clock=Clock(NOW))
    d = decide(p, sign(iat=iat, exp=exp))
    assert (d.outcome is Outcome.ALLOW) is allowed, d.reason
    if not allowed:
        assert d.reason == "token lifetime too long"


def test_max_lifetime_is_bounded_at_seven_days() -> None:
    from meshward.sidecar.config.schema import ConfigError, parse_config

    with pytest.raises(ConfigError, match="maxLifetimeSeconds: must be greater than 0 and at most 604800"):
        parse_config(config(policy(jwt=[issuer(maxLifetimeSeconds=8 * 86400)])))
    cfg = parse_config(config(policy(jwt=[issuer(maxLifetimeSeconds=7 * 86400)])))
    assert cfg.policies[0].issuers[0].max_lifetime_s == 7 * 86400
