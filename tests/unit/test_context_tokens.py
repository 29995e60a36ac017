"""Context tokens: minting and verification (pure), and the pipeline that verifies, mints and exchanges them.

Real keys and certificates from the mesh CA's own functions (operator/domain/ca.py) and the agent's
(domain/certificate.py); the clock is injected. Attack vectors are named after what they attack.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from meshward.operator.domain.ca import CertificateAuthority, check_csr, generate_root, issue_leaf, random_serial
from meshward.sidecar.domain.certificate import WorkloadCert, accept, build_csr, new_key
from meshward.sidecar.domain.context import (
    MAX_TTL_S,
    WIRE_HEADER,
    ContextError,
    MintingKey,
    act_chain,
    act_claim,
    minimized,
    mint,
    roots_of,
    verify_context,
    x5c_of,
)
from meshward.sidecar.domain.decision import Outcome
from meshward.sidecar.domain.jwt import JwtError, parse, verify
from meshward.sidecar.domain.request import CheckInput
from meshward.sidecar.engines.context import ContextKeys, ContextService
from meshward.sidecar.engines.pipeline import Pipeline
from meshward.sidecar.engines.token_cache import TokenCache
from tests.support.idp import SigningKey
from tests.support.sidecar import ISSUER, Clock, config, harness, issuer, policy, request

NOW = 1_800_000_000.0
TD = "spiffe://cluster.local/ns/shop/sa"
FRONTEND, ORDERS, PAYMENTS = f"{TD}/frontend", f"{TD}/orders", f"{TD}/payments"
USER = {"sub": "alice", "tenant": "acme", "email": "alice@example.com", "scope": "orders:read"}


def workload(ca: CertificateAuthority, spiffe: str, now: float = NOW, ttl_s: float = 3600) -> WorkloadCert:
    """A workload certificate as the agent holds it: its own key, the CA's signature, the bundle."""
    key = new_key()
    at = dt.datetime.fromtimestamp(now, dt.UTC)
    leaf = issue_leaf(ca, check_csr(build_csr(key, spiffe), spiffe), spiffe, dt.timedelta(seconds=ttl_s), at,
                      random_serial(os.urandom))
    return accept(spiffe, leaf.public_bytes(Encoding.PEM), ca.cert_pem(), key, at)


def minting_key(cert: WorkloadCert) -> MintingKey:
    key = ContextKeys(lambda: cert).minting()
    assert key is not None
    return key


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return generate_root("cluster.local", dt.datetime.fromtimestamp(NOW - 3600, dt.UTC))


@pytest.fixture(scope="module")
def frontend(ca: CertificateAuthority) -> WorkloadCert:
    return workload(ca, FRONTEND)


@pytest.fixture(scope="module")
def orders(ca: CertificateAuthority) -> WorkloadCert:
    return workload(ca, ORDERS)


def minted(cert: WorkloadCert, audience: str = ORDERS, *, claims: dict[str, Any] | None = None,
           act: tuple[str, ...] = (FRONTEND,), now: float = NOW, ttl: float = 30) -> str:
    token, _ = mint(minting_key(cert), audience, ISSUER, claims if claims is not None else {"sub": "alice"}, act,
                    "d-1", now, ttl)
    return token


def segments(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    h, p, s = token.split(".")
    return (json.loads(base64.urlsafe_b64decode(h + "==")), json.loads(base64.urlsafe_b64decode(p + "==")), s)


def b64(doc: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def resigned(cert: WorkloadCert, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A token with this header and claims, validly signed with `cert`'s key (what a compromised minter can do)."""
    signing_input = f"{b64(header)}.{b64(claims)}"
    r, s = decode_dss_signature(minting_key(cert).key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    sig = base64.urlsafe_b64encode(r.to_bytes(32, "big") + s.to_bytes(32, "big")).rstrip(b"=").decode()
    return f"{signing_input}.{sig}"


# ------------------------------------------------------------------------------------------ the token itself


def test_a_context_token_carries_every_claim_the_design_names(frontend: WorkloadCert, ca: CertificateAuthority
                                                              ) -> None:
    token = minted(frontend, claims={"sub": "alice", "tenant": "acme"}, act=(FRONTEND, "spiffe://x/edge"))
    header, claims, _ = segments(token)
    assert header["alg"] == "ES256" and header["typ"] == "meshward-context+jwt"
    assert header["x5c"] == list(x5c_of(frontend.chain_pem))
    assert claims == {"iss": FRONTEND, "aud": ORDERS, "sub": "alice", "user_iss": ISSUER, "tenant": "acme",
                      "jti": "d-1", "iat": int(NOW), "exp": int(NOW) + 30,
                      "act": {"sub": FRONTEND, "act": {"sub": "spiffe://x/edge"}}}
    ctx = verify_context(token, FRONTEND, ORDERS, roots_of(ca.cert_pem()), NOW + 1)
    assert (ctx.minter, ctx.audience, ctx.user_issuer, ctx.subject, ctx.jti) == (FRONTEND, ORDERS, ISSUER, "alice",
                                                                                  "d-1")
    assert dict(ctx.claims) == {"sub": "alice", "tenant": "acme"}
    assert ctx.act == (FRONTEND, "spiffe://x/edge")


def test_minimization_keeps_only_wanted_claims_and_never_a_reserved_one() -> None:
    user = {**USER, "iss": ISSUER, "aud": "shop", "exp": 1, "act": {"sub": "evil"}, "user_iss": "https://evil"}
    assert minimized(user, ["tenant", "aud", "act", "user_iss"]) == {"sub": "alice", "tenant": "acme"}
    assert minimized(user, []) == {"sub": "alice"}


@given(st.lists(st.text(min_size=1, max_size=20), max_size=10))
def test_act_chains_round_trip(chain: list[str]) -> None:
    """RFC 8693 §4.1: the current actor outermost, prior actors nested, in order."""
    assert act_chain(act_claim(chain)) == tuple(chain)


def test_a_token_lives_at_most_its_ttl_and_never_past_what_it_was_exchanged_from(frontend: WorkloadCert) -> None:
    key = minting_key(frontend)
    assert mint(key, ORDERS, ISSUER, {"sub": "a"}, (), "j", NOW, 30)[1] == NOW + 30
    assert mint(key, ORDERS, ISSUER, {"sub": "a"}, (), "j", NOW, 30, not_after=NOW + 7)[1] == NOW + 7
    with pytest.raises(ValueError, match="ttl"):
        mint(key, ORDERS, ISSUER, {"sub": "a"}, (), "j", NOW, MAX_TTL_S + 1)


def test_no_token_outlives_the_certificate_that_vouches_for_it(ca: CertificateAuthority) -> None:
    short = workload(ca, FRONTEND, ttl_s=10)
    assert mint(minting_key(short), ORDERS, ISSUER, {"sub": "a"}, (), "j", NOW, 30)[1] == NOW + 10


def test_expiry_follows_the_injected_clock(frontend: WorkloadCert, ca: CertificateAuthority) -> None:
    token, roots = minted(frontend, ttl=30), roots_of(ca.cert_pem())
    verify_context(token, FRONTEND, ORDERS, roots, NOW + 30)  # within the clock skew
    with pytest.raises(ContextError, match="expired"):
        verify_context(token, FRONTEND, ORDERS, roots, NOW + 36)


# ------------------------------------------------------------------------------------------ attack vectors


def check_refused(token: str, ca: CertificateAuthority, match: str, *, peer: str = FRONTEND, audience: str = ORDERS,
                  now: float = NOW + 1) -> None:
    with pytest.raises(ContextError, match=match):
        verify_context(token, peer, audience, roots_of(ca.cert_pem()), now)


def test_attack_replay_at_another_audience_rfc7519_4_1_3(frontend: WorkloadCert, ca: CertificateAuthority) -> None:
    """A token captured at hop 1 (for orders) presented by the same minter to payments."""
    check_refused(minted(frontend), ca, "audience", audience=PAYMENTS)


def test_attack_replay_from_another_peer_token_binding(frontend: WorkloadCert, ca: CertificateAuthority) -> None:
    """A token captured by any workload (or in a log) replayed over that workload's own mTLS connection."""
    check_refused(minted(frontend), ca, "not minted by the peer", peer=PAYMENTS)
    check_refused(minted(frontend), ca, "not minted by the peer", peer="")


def test_attack_expired_token_replay(frontend: WorkloadCert, ca: CertificateAuthority) -> None:
    check_refused(minted(frontend), ca, "expired", now=NOW + 120)


def test_attack_lifetime_stretched_by_a_compromised_minter(frontend: WorkloadCert, ca: CertificateAuthority) -> None:
    header, claims, _ = segments(minted(frontend))
    check_refused(resigned(frontend, header, {**claims, "exp": int(NOW) + 3600}), ca, "lifetime too long")


def test_attack_chain_to_a_foreign_ca(frontend: WorkloadCert) -> None:
    """A token minted with a certificate of another mesh (or a self-made CA) naming our SPIFFE ID."""
    foreign = generate_root("cluster.local", dt.datetime.fromtimestamp(NOW - 3600, dt.UTC))
    forged = workload(foreign, FRONTEND)
    ours = generate_root("cluster.local", dt.datetime.fromtimestamp(NOW - 3600, dt.UTC))
    with pytest.raises(ContextError, match="does not chain"):
        verify_context(minted(forged), FRONTEND, ORDERS, roots_of(ours.cert_pem()), NOW + 1)


def test_attack_x5c_swapped_for_another_workloads_certificate(frontend: WorkloadCert, orders: WorkloadCert,
                                                               ca: CertificateAuthority) -> None:
    """orders signs as frontend: a genuine frontend certificate in x5c, orders' key behind the signature."""
    header, claims, _ = segments(minted(orders))
    forged = resigned(orders, {**header, "x5c": list(x5c_of(frontend.chain_pem))}, {**claims, "iss": FRONTEND})
    check_refused(forged, ca, "invalid signature")


def test_attack_own_certificate_claiming_another_identity(orders: WorkloadCert, ca: CertificateAuthority) -> None:
    """orders puts its own (valid) certificate in x5c but names frontend as issuer, and connects as frontend."""
    header, claims, _ = segments(minted(orders))
    check_refused(resigned(orders, header, {**claims, "iss": FRONTEND}), ca, "another workload")


def test_attack_the_ca_certificate_as_a_minting_certificate(ca: CertificateAuthority, frontend: WorkloadCert) -> None:
    """A CA certificate in x5c (its key would be the CA's): only workload certificates mint."""
    header, claims, _ = segments(minted(frontend))
    der = base64.b64encode(ca.cert.public_bytes(Encoding.DER)).decode()
    check_refused(resigned(frontend, {**header, "x5c": [der]}, claims), ca, "not a current workload certificate")


@pytest.mark.parametrize("alg", ["none", "HS256", "ES384", "RS256", "EdDSA"])
def test_attack_alg_confusion(alg: str, frontend: WorkloadCert, ca: CertificateAuthority) -> None:
    """CVE-2015-9235 style: any algorithm but ES256 is refused before a key is looked at, `none` included."""
    header, claims, sig = segments(minted(frontend))
    check_refused(f"{b64({**header, 'alg': alg})}.{b64(claims)}.{sig}", ca, "algorithm not allowed")


def test_attack_hs256_keyed_with_the_public_key(frontend: WorkloadCert, ca: CertificateAuthority) -> None:
    """CVE-2016-10555: an HMAC over the token keyed with the minter's public key (from x5c)."""
    header, claims, _ = segments(minted(frontend))
    public = minting_key(frontend).key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    signing_input = f"{b64({**header, 'alg': 'HS256'})}.{b64(claims)}"
    mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    check_refused(f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}", ca,
                  "algorithm not allowed")


@pytest.mark.parametrize("change", [{"tenant": "evil-corp"}, {"sub": "root"}, {"aud": PAYMENTS},
                                    {"act": {"sub": "spiffe://cluster.local/ns/shop/sa/admin"}}])
def test_attack_claims_added_or_changed_after_signing(change: dict[str, Any], frontend: WorkloadCert,
                                                      ca: CertificateAuthority) -> None:
    header, claims, sig = segments(minted(frontend))
    audience = change.get("aud", ORDERS)
    check_refused(f"{b64(header)}.{b64({**claims, **change})}.{sig}", ca, "invalid signature", audience=audience)


def test_attack_crit_header_and_oversized_x5c(frontend: WorkloadCert, ca: CertificateAuthority) -> None:
    header, claims, _ = segments(minted(frontend))
    check_refused(resigned(frontend, {**header, "crit": ["exp"]}, claims), ca, "critical")
    check_refused(resigned(frontend, {**header, "x5c": header["x5c"] * 5}, claims), ca, "x5c")


def test_attack_a_context_token_presented_as_an_end_user_jwt(frontend: WorkloadCert) -> None:
    """Even an issuer configured with the minter's SPIFFE ID and every token type cannot take a context token."""
    parsed = parse(minted(frontend), 16384)
    from meshward.sidecar.config.schema import Issuer

    lax = Issuer(issuer=FRONTEND, audiences=(ORDERS,), algorithms=frozenset({"ES256"}), jwks_uri=None,
                 sources=(), token_types=frozenset({"meshward-context+jwt", "jwt"}))
    with pytest.raises(JwtError, match="not an end-user token"):
        verify(parsed, {FRONTEND: lax}, lambda i, k: [], NOW)


def test_attack_an_end_user_jwt_presented_as_a_context_token(ca: CertificateAuthority) -> None:
    idp = SigningKey("ES256")
    token = jwt.encode({"iss": FRONTEND, "aud": ORDERS, "sub": "alice", "iat": int(NOW), "exp": int(NOW) + 30,
                        "user_iss": ISSUER, "jti": "x"}, idp.private, algorithm="ES256", headers={"kid": idp.kid})
    check_refused(token, ca, "wrong token type")


# ------------------------------------------------------------------------------------------ the pipeline

ANYONE = [{"name": "anyone"}]
PAYMENTS_POLICY = policy("payments", jwt=[issuer()], rules=[{
    "name": "acme-only", "from": {"requestPrincipals": [f"{ISSUER}/alice"]}, "when": ["claims.tenant == 'acme'"]}])


def agent(cert: WorkloadCert, policy_doc: dict[str, Any], clock: Clock, **context: Any) -> tuple[Pipeline, Any]:
    """A real pipeline with a minting key, and its audit stream."""
    cfg = config(policy_doc, context={"ttlSeconds": 30, **context})
    h = harness(cfg, {ISSUER: [IDP.jwk]} if policy_doc.get("jwt") else None, clock, context=ContextService(ContextKeys(lambda: cert), clock))
    return h.pipeline, h.audit


IDP = SigningKey("RS256", kid="k1")


def user_jwt(**claims: Any) -> str:
    return jwt.encode({"iss": ISSUER, "aud": "orders", "iat": int(NOW), "exp": int(NOW) + 300, **USER, **claims},
                      IDP.private, algorithm="RS256", headers={"kid": IDP.kid})


def set_headers(d: Any) -> dict[str, str]:
    return dict(d.headers_to_set)


def test_three_hops_each_sees_only_what_its_policies_use(ca: CertificateAuthority) -> None:
    """frontend takes the JWT, orders carries `tenant` (spec.context.claims), payments checks it."""
    clock = Clock(NOW)
    certs = {w: workload(ca, w) for w in (FRONTEND, ORDERS, PAYMENTS)}
    front, front_audit = agent(certs[FRONTEND], policy("frontend", jwt=[issuer()], rules=ANYONE), clock,
                               destinations={ORDERS: ["sub", "tenant"]})
    orders_, orders_audit = agent(certs[ORDERS], policy("orders", rules=ANYONE), clock, claims=["tenant"],
                                  destinations={PAYMENTS: ["sub", "tenant"]})
    pay, pay_audit = agent(certs[PAYMENTS], PAYMENTS_POLICY, clock, claims=["tenant"])

    d1 = front.decide_now(request(token=user_jwt(), peer=f"{TD}/client"), "http")
    assert d1.outcome is Outcome.ALLOW  # type: ignore[union-attr]
    app_token = set_headers(d1)[WIRE_HEADER]
    assert "authorization" in d1.headers_to_remove  # type: ignore[union-attr]
    app = verify_context(app_token, FRONTEND, FRONTEND, roots_of(ca.cert_pem()), NOW)
    assert dict(app.claims) == {"sub": "alice"} and app.act == ()

    x1 = front.exchange(_outbound(app_token, ORDERS), "outbound")
    assert x1.outcome is Outcome.ALLOW
    wire1 = set_headers(x1)[WIRE_HEADER]
    to_orders = verify_context(wire1, FRONTEND, ORDERS, roots_of(ca.cert_pem()), NOW)
    # frontend's own token had only `sub` (frontend's policies use nothing else), so tenant cannot appear here.
    assert dict(to_orders.claims) == {"sub": "alice"} and to_orders.act == (FRONTEND,)
    assert to_orders.jti == x1.decision_id

    # With frontend's policy carrying tenant, it flows on.
    front, front_audit = agent(certs[FRONTEND], policy("frontend", jwt=[issuer()], rules=ANYONE), clock, claims=["tenant"],
                               destinations={ORDERS: ["sub", "tenant"]})
    d1 = front.decide_now(request(token=user_jwt(), peer=f"{TD}/client"), "http")
    app_token = set_headers(d1)[WIRE_HEADER]
    x1 = front.exchange(_outbound(app_token, ORDERS), "outbound")
    wire1 = set_headers(x1)[WIRE_HEADER]

    d2 = orders_.decide_now(request(peer=FRONTEND, **{WIRE_HEADER: wire1}), "http")
    assert d2.outcome is Outcome.ALLOW, d2  # type: ignore[union-attr]
    orders_app = set_headers(d2)[WIRE_HEADER]
    x2 = orders_.exchange(_outbound(orders_app, PAYMENTS), "outbound")
    wire2 = set_headers(x2)[WIRE_HEADER]
    to_payments = verify_context(wire2, ORDERS, PAYMENTS, roots_of(ca.cert_pem()), NOW)
    assert dict(to_payments.claims) == {"sub": "alice", "tenant": "acme"}
    assert to_payments.act == (ORDERS, FRONTEND)

    d3 = pay.decide_now(request(peer=ORDERS, **{WIRE_HEADER: wire2}), "http")
    assert d3.outcome is Outcome.ALLOW and d3.rule == "acme-only", d3  # type: ignore[union-attr]
    payments_app = verify_context(set_headers(d3)[WIRE_HEADER], PAYMENTS, PAYMENTS, roots_of(ca.cert_pem()), NOW)
    assert dict(payments_app.claims) == {"sub": "alice", "tenant": "acme"}  # never email or scope

    # The audit lines link up: each hop names the decision that minted what it received, and the chain.
    lines = {name: [json.loads(x) for x in audit.getvalue().splitlines()]
             for name, audit in (("front", front_audit), ("orders", orders_audit), ("pay", pay_audit))}
    pay_line = lines["pay"][-1]
    assert pay_line["parent"] == x2.decision_id and pay_line["act"] == f"{ORDERS},{FRONTEND}"
    exchange_line = next(x for x in lines["orders"] if x["decision_id"] == x2.decision_id)
    assert exchange_line["transport"] == "outbound" and exchange_line["destination"] == PAYMENTS
    assert exchange_line["parent"] == d2.decision_id  # type: ignore[union-attr]
    assert lines["orders"][0]["parent"] == x1.decision_id


def _outbound(token: str, destination: str, header: str = WIRE_HEADER) -> Any:
    inp = request(peer=None, **{header: token})
    inp.destination = destination
    return inp


def test_a_token_for_payments_is_refused_by_orders_and_from_any_other_peer(ca: CertificateAuthority) -> None:
    clock = Clock(NOW)
    orders_cert, pay_cert = workload(ca, ORDERS), workload(ca, PAYMENTS)
    orders_, _ = agent(orders_cert, policy("orders", rules=ANYONE), clock)
    pay, _ = agent(pay_cert, PAYMENTS_POLICY, clock)
    for_payments = minted(orders_cert, PAYMENTS, claims={"sub": "alice", "tenant": "acme"}, act=(ORDERS,))
    # Audience: hop 3's token presented at hop 2, by its own minter.
    d = orders_.decide_now(request(peer=ORDERS, **{WIRE_HEADER: for_payments}), "http")
    assert d.outcome is Outcome.UNAUTHENTICATED and "audience" in d.reason  # type: ignore[union-attr]
    # Binding: verified once from orders (cached), then replayed from frontend: the cache re-checks the peer.
    assert pay.decide_now(request(peer=ORDERS, **{WIRE_HEADER: for_payments}), "http").outcome is Outcome.ALLOW  # type: ignore[union-attr]
    d = pay.decide_now(request(peer=FRONTEND, **{WIRE_HEADER: for_payments}), "http")
    assert d.outcome is Outcome.UNAUTHENTICATED and "peer" in d.reason  # type: ignore[union-attr]
    # Expiry, through the cache too.
    clock.now = NOW + 31 + 5
    d = pay.decide_now(request(peer=ORDERS, **{WIRE_HEADER: for_payments}), "http")
    assert d.outcome is Outcome.UNAUTHENTICATED and "expired" in d.reason  # type: ignore[union-attr]


def test_hot_path_reuses_minted_tokens_for_half_their_life(ca: CertificateAuthority) -> None:
    clock = Clock(NOW)
    front, _ = agent(workload(ca, FRONTEND), policy("frontend", jwt=[issuer()], rules=ANYONE), clock)
    raw = user_jwt()
    first = set_headers(front.decide_now(request(token=raw), "http"))[WIRE_HEADER]
    assert set_headers(front.decide_now(request(token=raw), "http"))[WIRE_HEADER] == first
    ex1 = set_headers(front.exchange(_outbound(first, ORDERS), "outbound"))[WIRE_HEADER]
    assert set_headers(front.exchange(_outbound(first, ORDERS), "outbound"))[WIRE_HEADER] == ex1
    clock.now = NOW + 16
    assert set_headers(front.decide_now(request(token=raw), "http"))[WIRE_HEADER] != first
    assert set_headers(front.exchange(_outbound(first, ORDERS), "outbound"))[WIRE_HEADER] != ex1


def test_no_header_means_no_user_and_a_bad_one_is_refused_to_the_app(ca: CertificateAuthority) -> None:
    clock = Clock(NOW)
    cert = workload(ca, FRONTEND)
    front, _ = agent(cert, policy("frontend", rules=ANYONE), clock)
    no_user = front.exchange(CheckInput("GET", "/", destination=ORDERS), "outbound")
    assert no_user.outcome is Outcome.ALLOW and no_user.headers_to_set == []
    assert WIRE_HEADER in no_user.headers_to_remove
    # The app forwards a token that is not its own (orders' token for orders, say): refused with a reason.
    foreign = minted(workload(ca, ORDERS), ORDERS, act=())
    d = front.exchange(_outbound(foreign, PAYMENTS), "outbound")
    assert d.outcome is Outcome.UNAUTHENTICATED and "peer" in d.reason


def test_a_spoofed_context_header_never_reaches_the_app(ca: CertificateAuthority) -> None:
    """Without a user, the app's header (custom name here) and the wire header are removed upstream."""
    clock = Clock(NOW)
    front, _ = agent(workload(ca, FRONTEND), policy("frontend", rules=ANYONE), clock, header="x-user-context")
    d = front.decide_now(request(peer=ORDERS, x_user_context="forged"), "http")
    assert d.outcome is Outcome.ALLOW  # type: ignore[union-attr]
    assert {"x-user-context", WIRE_HEADER} <= set(d.headers_to_remove)  # type: ignore[union-attr]


def test_a_workload_that_names_its_idps_takes_users_only_from_them(ca: CertificateAuthority) -> None:
    clock = Clock(NOW)
    pay, _ = agent(workload(ca, PAYMENTS), PAYMENTS_POLICY, clock)
    token, _ = mint(minting_key(workload(ca, ORDERS)), PAYMENTS, "https://other-idp", {"sub": "alice"}, (),
                    "j", NOW, 30)
    d = pay.decide_now(request(peer=ORDERS, **{WIRE_HEADER: token}), "http")
    assert d.outcome is Outcome.UNAUTHENTICATED and "issuer" in d.reason  # type: ignore[union-attr]


def test_request_principals_match_a_context_user_without_any_idp_configured(ca: CertificateAuthority) -> None:
    """A workload behind the edge names users (`requestPrincipals`) without configuring their IdP: they arrive
    in context tokens. Without a user the same rule does not match."""
    clock = Clock(NOW)
    rule = {"name": "alice", "from": {"requestPrincipals": [f"{ISSUER}/alice"]}}
    pay, _ = agent(workload(ca, PAYMENTS), policy("payments", rules=[rule]), clock)
    token, _ = mint(minting_key(workload(ca, ORDERS)), PAYMENTS, ISSUER, {"sub": "alice"}, (), "j", NOW, 30)
    assert pay.decide_now(request(peer=ORDERS, **{WIRE_HEADER: token}), "http").outcome is Outcome.ALLOW  # type: ignore[union-attr]
    assert pay.decide_now(request(peer=ORDERS), "http").outcome is Outcome.FORBIDDEN  # type: ignore[union-attr]


def test_a_remembered_minting_chain_still_expires_with_its_certificate(ca: CertificateAuthority) -> None:
    """The chain of a known minter is checked once per bundle, but its leaf's validity at every use: a token
    signed (by a compromised minter) after its certificate expired is refused even with the chain cached."""
    clock = Clock(NOW)
    short = workload(ca, FRONTEND, ttl_s=10)
    service = ContextService(ContextKeys(lambda: short), clock)
    first = minted(short, FRONTEND, act=())
    service.verify(first, TokenCache.key(first), FRONTEND, FRONTEND)
    clock.now = NOW + 20
    header, claims, _ = segments(minted(short, FRONTEND, act=()))
    late = resigned(short, header, {**claims, "iat": int(NOW + 20), "exp": int(NOW + 40), "jti": "late"})
    with pytest.raises(ContextError, match="not a current workload certificate"):
        service.verify(late, TokenCache.key(late), FRONTEND, FRONTEND)


CLAIM_NAMES = st.sampled_from(("tenant", "email", "groups", "region", "plan"))


@given(used=st.sets(CLAIM_NAMES, max_size=4), listed=st.sets(CLAIM_NAMES, max_size=2),
       present=st.sets(CLAIM_NAMES, max_size=5))
def test_minimization_follows_the_compiled_policies(used: set[str], listed: set[str], present: set[str]) -> None:
    """Property: the token frontend mints for payments carries `sub` and exactly the user's claims that payments'
    policies reference (CEL `claims.x`, spec.context.claims), as the operator compiles them into frontend's
    config; nothing else the user has."""
    from meshward.operator.domain.compile import PolicyObject, Workload, workload_config

    when = [f"claims.{c} != ''" for c in sorted(used)]
    pay_policy = PolicyObject("shop", "payments", 1, "", {
        "selector": {"matchLabels": {"app": "payments"}}, "context": {"claims": sorted(listed)},
        "rules": [{"name": "users", **({"when": when} if when else {})}]})
    front_policy = PolicyObject("shop", "frontend", 1, "", {
        "selector": {"matchLabels": {"app": "frontend"}}, "rules": [{"name": "anyone"}]})
    pods = [Workload("shop", "frontend-1", "frontend", {"app": "frontend"}),
            Workload("shop", "payments-1", "payments", {"app": "payments"})]
    compiled = workload_config(pods[0], [pay_policy, front_policy], [], dt.datetime.now(dt.UTC), pods,
                               "cluster.local")
    clock = Clock(NOW)
    service = ContextService(ContextKeys(lambda: FRONTEND_CERT), clock)
    h = harness(compiled.document, None, clock, context=service)
    # The app's token as if frontend held every claim the user has (its own minimization is tested above).
    app, _ = mint(minting_key(FRONTEND_CERT), FRONTEND, ISSUER,
                  {"sub": "alice", **{c: f"{c}-value" for c in present}}, (), "edge", NOW, 30)
    wire = set_headers(h.pipeline.exchange(_outbound(app, PAYMENTS), "outbound"))[WIRE_HEADER]
    claims = verify_context(wire, FRONTEND, PAYMENTS, roots_of(FRONTEND_CA.cert_pem()), NOW).claims
    assert set(claims) == {"sub"} | ((used | listed) & present)


FRONTEND_CA = generate_root("cluster.local", dt.datetime.fromtimestamp(NOW - 3600, dt.UTC))
FRONTEND_CERT = workload(FRONTEND_CA, FRONTEND)


def test_the_app_gets_its_token_once_the_workload_has_a_certificate(ca: CertificateAuthority) -> None:
    """An agent still waiting for its certificate lets a JWT user through without a context token, and mints one
    for the same (cached) user as soon as the certificate arrives."""
    clock = Clock(NOW)
    holder: list[WorkloadCert] = []
    h = harness(config(policy("frontend", jwt=[issuer()], rules=ANYONE)), {ISSUER: [IDP.jwk]}, clock,
                context=ContextService(ContextKeys(lambda: holder[0] if holder else None), clock))
    raw = user_jwt()
    assert WIRE_HEADER not in set_headers(h.pipeline.decide_now(request(token=raw), "http"))
    holder.append(workload(ca, FRONTEND))
    assert WIRE_HEADER in set_headers(h.pipeline.decide_now(request(token=raw), "http"))


def test_policies_see_the_act_chain(ca: CertificateAuthority) -> None:
    """`source.act` in CEL: payments admits a user only when the call came through frontend."""
    clock = Clock(NOW)
    rule = {"name": "via-frontend", "when": [f"'{FRONTEND}' in source.act"]}
    pay, _ = agent(workload(ca, PAYMENTS), policy("payments", rules=[rule]), clock)
    orders_key = minting_key(workload(ca, ORDERS))
    for act, outcome in (((ORDERS, FRONTEND), Outcome.ALLOW), ((ORDERS,), Outcome.FORBIDDEN)):
        token, _ = mint(orders_key, PAYMENTS, ISSUER, {"sub": "alice"}, act, "j", NOW, 30)
        assert pay.decide_now(request(peer=ORDERS, **{WIRE_HEADER: token}), "http").outcome is outcome  # type: ignore[union-attr]
