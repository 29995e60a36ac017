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
    MAX_ACT_DEPTH,
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
    verify_proof,
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
           act: tuple[str, ...] = (), now: float = NOW, ttl: float = 30) -> str:
    """A token without hop proofs (the checks of the token itself); `hop` below mints whole paths."""
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
    """The first exchange (frontend passes alice to orders): the token, then `~` and frontend's hop proof."""
    token, proof = mint(minting_key(frontend), ORDERS, ISSUER, {"sub": "alice", "tenant": "acme"}, (FRONTEND,),
                        "d-1", NOW, 30)[0].split("~")
    header, claims, _ = segments(token)
    assert header["alg"] == "ES256" and header["typ"] == "meshward-context+jwt"
    assert header["x5c"] == list(x5c_of(frontend.chain_pem))
    prf = base64.urlsafe_b64encode(hashlib.sha256(proof.encode()).digest()).rstrip(b"=").decode()
    assert claims == {"iss": FRONTEND, "aud": ORDERS, "sub": "alice", "user_iss": ISSUER, "tenant": "acme",
                      "jti": "d-1", "iat": int(NOW), "exp": int(NOW) + 30, "act": {"sub": FRONTEND}, "prf": prf}
    proof_header, proof_claims, _ = segments(proof)
    assert proof_header == {**header, "typ": "meshward-hop+jwt"}
    assert proof_claims == {"iss": FRONTEND, "aud": ORDERS, "sub": "alice", "user_iss": ISSUER, "jti": "d-1",
                            "iat": int(NOW), "exp": int(NOW) + 30}
    ctx = verify_context(f"{token}~{proof}", FRONTEND, ORDERS, roots_of(ca.cert_pem()), NOW + 1)
    assert (ctx.minter, ctx.audience, ctx.user_issuer, ctx.subject, ctx.jti) == (FRONTEND, ORDERS, ISSUER, "alice",
                                                                                  "d-1")
    assert dict(ctx.claims) == {"sub": "alice", "tenant": "acme"}
    assert ctx.act == (FRONTEND,) and ctx.proofs == (proof,)


def test_minimization_keeps_only_wanted_claims_and_never_a_reserved_one() -> None:
    user = {**USER, "iss": ISSUER, "aud": "shop", "exp": 1, "act": {"sub": "evil"}, "user_iss": "https://evil"}
    assert minimized(user, ["tenant", "aud", "act", "user_iss"]) == {"sub": "alice", "tenant": "acme"}
    assert minimized(user, []) == {"sub": "alice"}


@given(st.lists(st.text(min_size=1, max_size=20), max_size=MAX_ACT_DEPTH))
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


# ------------------------------------------------------------------------------------------ act is a proven path
# Issue 18, item 5: a workload holding its own key (stolen, or the workload compromised) must not be able to claim
# the user came through a workload that never passed the user to it. Every attacker below is `orders` with its own
# genuine certificate, minting for payments, the receiver whose policies look at `source.act`.

GHOST = f"{TD}/ghost"


def hop(cert: WorkloadCert, audience: str, received: str | None = None, *, sub: str = "alice", now: float = NOW,
        jti: str = "d") -> str:
    """What `cert`'s agent sends to `audience`: a token exchanged from the presentation it `received` (verified
    here as its agent would), or, without one, the first hop's (from an end-user JWT)."""
    key = minting_key(cert)
    if received is None:
        return mint(key, audience, ISSUER, {"sub": sub}, (key.spiffe_id,), jti, now, 30)[0]
    ctx = verify_context(received, _issuer_of(received), key.spiffe_id, roots_of(CHAIN_CA.cert_pem()), now)
    return mint(key, audience, ISSUER, {"sub": ctx.subject}, (key.spiffe_id, *ctx.act), jti, now, 30,
                ctx.expires_at, ctx.proofs)[0]


def _issuer_of(presentation: str) -> str:
    return str(segments(presentation.split("~")[0])[1]["iss"])


CHAIN_CA = generate_root("cluster.local", dt.datetime.fromtimestamp(NOW - 3600, dt.UTC))
CHAIN_CERTS = {w: workload(CHAIN_CA, w) for w in (FRONTEND, ORDERS, PAYMENTS, f"{TD}/admin")}


def at_payments(presentation: str, peer: str = ORDERS, now: float = NOW + 1) -> Any:
    return verify_context(presentation, peer, PAYMENTS, roots_of(CHAIN_CA.cert_pem()), now)


def refused_at_payments(presentation: str, match: str, now: float = NOW + 1) -> None:
    with pytest.raises(ContextError, match=match):
        at_payments(presentation, now=now)


def forged(claims: dict[str, Any], proofs: list[str], header: dict[str, Any] | None = None,
           signer: str = ORDERS) -> str:
    """A presentation whose token orders signed itself, with whatever claims and proofs it likes."""
    genuine = hop(CHAIN_CERTS[signer], PAYMENTS, jti="forged").split("~")[0]
    h, c, _ = segments(genuine)
    return "~".join([resigned(CHAIN_CERTS[signer], header or h, {**c, **claims}), *proofs])


def forged_proof(claims: dict[str, Any], *, signer: str = ORDERS, header: dict[str, Any] | None = None) -> str:
    """A hop proof orders signs itself, claiming what it likes (by default: frontend passed alice to orders)."""
    h = segments(hop(CHAIN_CERTS[signer], PAYMENTS).split("~")[1])[0]  # the signer's own certificate in x5c
    c = segments(hop(CHAIN_CERTS[FRONTEND], ORDERS).split("~")[1])[1]
    return resigned(CHAIN_CERTS[signer], header or h, {**c, **claims})


def digest(proof: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(proof.encode()).digest()).rstrip(b"=").decode()


def test_a_genuine_path_is_proven_hop_by_hop_and_its_proofs_carry_no_user_claims() -> None:
    """frontend -> orders -> payments: payments sees act = (orders, frontend), each entry proven by a proof signed
    by that workload, and the proofs (which every later hop and app receives) name the user but none of their
    claims: minimization holds past the hop that needed a claim."""
    key = minting_key(CHAIN_CERTS[FRONTEND])
    t1 = mint(key, ORDERS, ISSUER, {"sub": "alice", "email": "alice@example.com"}, (FRONTEND,), "d1", NOW, 30)[0]
    ctx1 = verify_context(t1, FRONTEND, ORDERS, roots_of(CHAIN_CA.cert_pem()), NOW)
    t2 = mint(minting_key(CHAIN_CERTS[ORDERS]), PAYMENTS, ISSUER, {"sub": "alice"}, (ORDERS, *ctx1.act), "d2", NOW,
              30, ctx1.expires_at, ctx1.proofs)[0]
    ctx = at_payments(t2)
    assert ctx.act == (ORDERS, FRONTEND) and len(ctx.proofs) == 2
    for proof, (iss, aud) in zip(ctx.proofs, ((ORDERS, PAYMENTS), (FRONTEND, ORDERS)), strict=True):
        header, claims, _ = segments(proof)
        assert header["typ"] == "meshward-hop+jwt"
        assert set(claims) <= {"iss", "aud", "sub", "user_iss", "jti", "iat", "exp", "prf"}
        assert (claims["iss"], claims["aud"], claims["sub"]) == (iss, aud, "alice")
    # frontend's token for orders carried the email (orders' policies use it); frontend's proof, which payments and
    # its app receive, does not.
    assert segments(t1.split("~")[0])[1]["email"] == "alice@example.com"
    assert "alice@example.com" not in "".join(json.dumps(segments(p)[1]) for p in ctx.proofs)


def test_attack_forged_act_entry_naming_a_nonexistent_workload_issue_18() -> None:
    """The issue's finding: orders signs act = (orders, ghost) with its own key; before hop proofs, payments'
    audit line and `source.act` showed `ghost`. Without a proof, and with a proof orders signed as `ghost`."""
    act = {"act": act_claim((ORDERS, GHOST))}
    refused_at_payments(forged(act, []), "2 workloads but 0 hop proofs")
    fake = forged_proof({"iss": GHOST})
    twin = forged_proof({"iss": ORDERS, "aud": PAYMENTS, "prf": digest(fake)})
    refused_at_payments(forged({**act, "prf": digest(twin)}, [twin, fake]),
                        "hop proof signed by a certificate of another workload")


def test_attack_act_entry_naming_a_real_workload_that_never_minted() -> None:
    """orders claims the user came through frontend, which never passed it to orders: a proof "from frontend"
    signed with orders' key, with orders' certificate (SAN mismatch) or frontend's genuine one (bad signature)."""
    act = {"act": act_claim((ORDERS, FRONTEND))}
    for header_from, match in ((ORDERS, "hop proof signed by a certificate of another workload"),
                               (FRONTEND, "invalid signature on a hop proof")):
        h, _, _ = segments(hop(CHAIN_CERTS[FRONTEND], ORDERS).split("~")[1])
        fake = forged_proof({}, header={**h, "x5c": list(x5c_of(CHAIN_CERTS[header_from].chain_pem))})
        twin = forged_proof({"iss": ORDERS, "aud": PAYMENTS, "prf": digest(fake)})
        refused_at_payments(forged({**act, "prf": digest(twin)}, [twin, fake]), match)
    # A genuine proof, of a workload that did pass alice to orders (admin), standing for frontend's entry.
    admins = hop(CHAIN_CERTS[f"{TD}/admin"], ORDERS).split("~")[1]
    refused_at_payments(orders_claiming(admins), "not proven by a hop proof of that workload")


def orders_claiming(proof: str) -> str:
    """orders, compromised, presents `proof` as frontend's, behind a correctly linked token and twin it signs."""
    twin = forged_proof({"iss": ORDERS, "aud": PAYMENTS, "prf": digest(proof)})
    return forged({"act": act_claim((ORDERS, FRONTEND)), "prf": digest(twin)}, [twin, proof])


def test_attack_hop_proof_replayed_from_another_users_chain() -> None:
    """frontend really passed bob to orders; orders replays that proof to claim alice came through frontend."""
    bobs = hop(CHAIN_CERTS[FRONTEND], ORDERS, sub="bob").split("~")[1]
    refused_at_payments(orders_claiming(bobs), "names another user")


def test_attack_hop_proof_minted_for_another_workload() -> None:
    """A proof frontend minted for payments (captured by orders, e.g. from a log) does not say frontend passed the
    user to orders: the inner token's audience must be the next hop."""
    to_payments = hop(CHAIN_CERTS[FRONTEND], PAYMENTS).split("~")[1]
    refused_at_payments(orders_claiming(to_payments), "minted for another workload")


def test_attack_hop_proofs_spliced_from_another_chain() -> None:
    """A genuine frontend -> orders -> payments presentation whose frontend proof is swapped for another genuine
    one (same user, another request): the token and each proof sign the digest of the proof behind it."""
    genuine = hop(CHAIN_CERTS[ORDERS], PAYMENTS, hop(CHAIN_CERTS[FRONTEND], ORDERS, jti="r1"))
    other = hop(CHAIN_CERTS[FRONTEND], ORDERS, jti="r2").split("~")[1]
    token, twin, _ = genuine.split("~")
    assert at_payments(genuine).act == (ORDERS, FRONTEND)
    refused_at_payments("~".join((token, twin, other)), "spliced")
    refused_at_payments("~".join((token, other, twin)), "spliced")


def test_attack_path_truncated_to_hide_a_hop() -> None:
    """admin -> frontend -> orders: orders drops admin's entry and proof, so that a policy refusing calls that came
    through admin (`!(admin in source.act)`) would pass. frontend's proof signs the digest of admin's."""
    genuine = hop(CHAIN_CERTS[ORDERS], PAYMENTS, hop(CHAIN_CERTS[FRONTEND], ORDERS, hop(CHAIN_CERTS[f"{TD}/admin"],
                                                                                     FRONTEND)))
    assert at_payments(genuine).act == (ORDERS, FRONTEND, f"{TD}/admin")
    refused_at_payments(orders_claiming(genuine.split("~")[2]), "did not come with it")


def test_attack_hop_proof_kept_past_its_chain() -> None:
    """orders keeps a proof from a request frontend passed it two minutes ago (expired) and mints fresh tokens
    naming frontend: a proof is good only while the chain minted from it is (its exp covers the token's)."""
    old = hop(CHAIN_CERTS[FRONTEND], ORDERS, now=NOW - 120).split("~")[1]
    refused_at_payments(orders_claiming(old), "lifetime does not cover")


def test_attack_hop_proof_with_a_stretched_lifetime() -> None:
    fake_lifetime = segments(hop(CHAIN_CERTS[FRONTEND], ORDERS).split("~")[1])[1]
    proof = forged_proof({"exp": fake_lifetime["iat"] + 3600}, signer=FRONTEND)  # frontend itself, compromised
    refused_at_payments(orders_claiming(proof), "lifetime is too long")


def test_attack_hop_proof_from_a_foreign_ca() -> None:
    """A proof naming frontend, signed with a certificate for frontend from a self-made CA."""
    foreign = workload(generate_root("cluster.local", dt.datetime.fromtimestamp(NOW - 3600, dt.UTC)), FRONTEND)
    refused_at_payments(orders_claiming(hop(foreign, ORDERS).split("~")[1]), "does not chain")


@pytest.mark.parametrize("alg", ["none", "HS256", "ES384", "RS256"])
def test_attack_hop_proof_alg_confusion(alg: str) -> None:
    """CVE-2015-9235 style, on the proof: its algorithm is fixed like the token's."""
    h, c, sig = segments(hop(CHAIN_CERTS[FRONTEND], ORDERS).split("~")[1])
    refused_at_payments(orders_claiming(f"{b64({**h, 'alg': alg})}.{b64(c)}.{sig}"),
                        "algorithm not allowed on a hop proof")


def test_attack_a_context_token_in_place_of_a_hop_proof_and_the_reverse() -> None:
    """Token types do not mix: frontend's token for orders (claims and all) as the proof, and a proof presented as
    the context token itself (it has no claims to forge, but it is not a token)."""
    token_to_orders = hop(CHAIN_CERTS[FRONTEND], ORDERS).split("~")[0]
    refused_at_payments(orders_claiming(token_to_orders), "hop proof has the wrong token type")
    own_proof = hop(CHAIN_CERTS[ORDERS], PAYMENTS).split("~")[1]
    refused_at_payments(own_proof, "wrong token type")


def test_attack_a_hop_proof_presented_as_an_end_user_jwt() -> None:
    from meshward.sidecar.config.schema import Issuer

    proof = hop(CHAIN_CERTS[FRONTEND], ORDERS).split("~")[1]
    lax = Issuer(issuer=FRONTEND, audiences=(ORDERS,), algorithms=frozenset({"ES256"}), jwks_uri=None,
                 sources=(), token_types=frozenset({"meshward-hop+jwt", "jwt"}))
    with pytest.raises(JwtError, match="not an end-user token"):
        verify(parse(proof, 16384), {FRONTEND: lax}, lambda i, k: [], NOW)


def test_attack_act_chain_depth_overflow() -> None:
    """More proofs than MAX_ACT_DEPTH are refused before any of them is parsed (bounded work for a forged header),
    and an exchange that would pass the bound refuses to mint (the app learns why at its own Envoy)."""
    refused_at_payments("~".join([hop(CHAIN_CERTS[ORDERS], PAYMENTS).split("~")[0], *["x.y.z"] * 9]),
                        "more than 8 hop proofs")
    presentation = hop(CHAIN_CERTS[FRONTEND], ORDERS)
    workloads = [FRONTEND, ORDERS]
    for n in range(7):  # frontend, orders, frontend, ... : eight hops, the bound, still verify
        sender, receiver = workloads[n % 2], workloads[(n + 1) % 2]
        ctx = verify_context(presentation, sender, receiver, roots_of(CHAIN_CA.cert_pem()), NOW)
        presentation = mint(minting_key(CHAIN_CERTS[receiver]), sender, ISSUER, {"sub": "alice"},
                            (receiver, *ctx.act), f"d{n}", NOW, 30, ctx.expires_at, ctx.proofs)[0]
    ctx = verify_context(presentation, ORDERS, FRONTEND, roots_of(CHAIN_CA.cert_pem()), NOW)
    assert len(ctx.act) == 8
    ctx = verify_context(mint(minting_key(CHAIN_CERTS[FRONTEND]), FRONTEND, ISSUER, {"sub": "alice"}, ctx.act,
                              "app", NOW, 30, ctx.expires_at, ctx.proofs)[0], FRONTEND, FRONTEND,
                         roots_of(CHAIN_CA.cert_pem()), NOW)
    with pytest.raises(ContextError, match="longer than 8 workloads"):
        mint(minting_key(CHAIN_CERTS[FRONTEND]), ORDERS, ISSUER, {"sub": "alice"}, (FRONTEND, *ctx.act), "d", NOW,
             30, ctx.expires_at, ctx.proofs)


def test_attack_forged_path_satisfies_a_via_frontend_policy_issue_18() -> None:
    """The policy the finding is about: payments admits a user only via frontend. orders, compromised, signs
    act = (orders, frontend) itself: refused before any rule, and its claim never reaches the audit line; the
    genuine path is admitted and audited with its chain."""
    clock = Clock(NOW)
    rule = {"name": "via-frontend", "when": [f"'{FRONTEND}' in source.act"]}
    pay, audit = agent(CHAIN_CERTS[PAYMENTS], policy("payments", rules=[rule]), clock)
    unproven = forged({"act": act_claim((ORDERS, FRONTEND))}, [])
    d = pay.decide_now(request(peer=ORDERS, **{WIRE_HEADER: unproven}), "http")
    assert d.outcome is Outcome.UNAUTHENTICATED and "hop proofs" in d.reason  # type: ignore[union-attr]
    assert "act" not in json.loads(audit.getvalue().splitlines()[-1])
    genuine = hop(CHAIN_CERTS[ORDERS], PAYMENTS, hop(CHAIN_CERTS[FRONTEND], ORDERS))
    d = pay.decide_now(request(peer=ORDERS, **{WIRE_HEADER: genuine}), "http")
    assert d.outcome is Outcome.ALLOW and d.rule == "via-frontend"  # type: ignore[union-attr]
    assert json.loads(audit.getvalue().splitlines()[-1])["act"] == f"{ORDERS},{FRONTEND}"
    # Without frontend in the path the rule does not match.
    d = pay.decide_now(request(peer=ORDERS, **{WIRE_HEADER: hop(CHAIN_CERTS[ORDERS], PAYMENTS)}), "http")
    assert d.outcome is Outcome.FORBIDDEN  # type: ignore[union-attr]


def test_a_remembered_hop_proof_is_still_checked_for_its_place_in_the_chain(monkeypatch: pytest.MonkeyPatch
                                                                            ) -> None:
    """The proof cache remembers signatures, not positions: a proof verified once in a genuine chain, then replayed
    by orders behind a token for another user, is still refused; and the app's token brings back to the exchange
    the proofs its inbound check verified, which the exchange does not check again (counted)."""
    import meshward.sidecar.engines.context as engine

    checked: list[str] = []
    real = verify_proof

    def counting(raw: str, *args: Any) -> Any:
        checked.append(raw)
        return real(raw, *args)

    monkeypatch.setattr(engine, "verify_proof", counting)
    service = ContextService(ContextKeys(lambda: CHAIN_CERTS[PAYMENTS]), Clock(NOW))
    genuine = hop(CHAIN_CERTS[ORDERS], PAYMENTS, hop(CHAIN_CERTS[FRONTEND], ORDERS))
    ctx, _ = service.verify(genuine, TokenCache.key(genuine), ORDERS, PAYMENTS)
    assert len(checked) == 2
    frontends = ctx.proofs[1]
    h, c, _ = segments(genuine.split("~")[0])
    twin = forged_proof({"iss": ORDERS, "aud": PAYMENTS, "sub": "bob", "prf": digest(frontends)})
    bob = "~".join([resigned(CHAIN_CERTS[ORDERS], h, {**c, "sub": "bob", "prf": digest(twin)}), twin, frontends])
    with pytest.raises(ContextError, match="names another user"):
        service.verify(bob, TokenCache.key(bob), ORDERS, PAYMENTS)
    checked.clear()
    app, _ = mint(minting_key(CHAIN_CERTS[PAYMENTS]), PAYMENTS, ISSUER, {"sub": "alice"}, ctx.act, "app", NOW, 30,
                  ctx.expires_at, ctx.proofs)
    assert service.verify(app, TokenCache.key(app), PAYMENTS, PAYMENTS)[0].act == (ORDERS, FRONTEND)
    assert checked == []


# ------------------------------------------------------------------------------------------ across namespaces
# Issue 19: frontend (namespace shop) knows billing's workloads only as `ns/billing/sa/*` (tenant isolation), so
# it mints for the namespace; the token stays bound to frontend's mTLS identity, so only what frontend sends
# itself is accepted, and only in billing. `intruder` is a workload of a third namespace with its own genuine
# certificate; `ledger` a workload of billing that is not the peer.

TDOMAIN = "spiffe://cluster.local/ns"
BILLING_NS = f"{TDOMAIN}/billing/sa/*"
BILLING_PAYMENTS, LEDGER, INTRUDER = f"{TDOMAIN}/billing/sa/payments", f"{TDOMAIN}/billing/sa/ledger", \
    f"{TDOMAIN}/intruder/sa/intruder"
NS_CERTS = {w: workload(CHAIN_CA, w) for w in (FRONTEND, ORDERS, PAYMENTS, BILLING_PAYMENTS, LEDGER, INTRUDER)}
TENANT_ONLY = policy("payments", rules=[{"name": "acme-only", "when": ["claims.tenant == 'acme'"]}])


def _frontend_sends(destination: str, destinations: dict[str, list[str]]) -> tuple[str, Any]:
    """What frontend's Envoy sends toward `destination` (as its outbound chain names it) for alice, who holds
    every claim of USER, frontend's policies carrying all of them; and the exchange's decision."""
    clock = Clock(NOW)
    front, _ = agent(NS_CERTS[FRONTEND], policy("frontend", rules=ANYONE), clock,
                     claims=["tenant", "email", "scope"], destinations=destinations)
    app, _ = mint(minting_key(NS_CERTS[FRONTEND]), FRONTEND, ISSUER, USER, (), "edge", NOW, 30)
    d = front.exchange(_outbound(app, destination), "outbound")
    return set_headers(d).get(WIRE_HEADER, ""), d


def _received(wire: str, at: str, peer: str, policy_doc: dict[str, Any] | None = None) -> Any:
    """The decision of `at`'s agent on `wire`, sent by `peer` over mTLS."""
    receiver, _ = agent(NS_CERTS[at], policy_doc or TENANT_ONLY, Clock(NOW + 1))
    return receiver.decide_now(request(peer=peer, **{WIRE_HEADER: wire}), "http")


def test_a_user_crosses_namespaces_minimized_to_what_that_namespaces_policies_use() -> None:
    """frontend (shop) -> payments (billing): the token names billing's namespace, carries the union of claim
    names billing's policies reference (compiled into frontend's config by namespace, no ServiceAccount), and
    payments' policy sees the user; its app's own token names payments exactly."""
    wire, d = _frontend_sends(BILLING_NS, {BILLING_NS: ["sub", "tenant"], ORDERS: ["sub", "email"]})
    assert d.outcome is Outcome.ALLOW and d.reason == "context exchanged"
    ctx = verify_context(wire, FRONTEND, BILLING_PAYMENTS, roots_of(CHAIN_CA.cert_pem()), NOW, namespace_ok=True)
    assert ctx.audience == BILLING_NS and dict(ctx.claims) == {"sub": "alice", "tenant": "acme"}
    assert ctx.act == (FRONTEND,)
    got = _received(wire, BILLING_PAYMENTS, FRONTEND)
    assert got.outcome is Outcome.ALLOW and got.rule == "acme-only", got
    app = verify_context(set_headers(got)[WIRE_HEADER], BILLING_PAYMENTS, BILLING_PAYMENTS,
                         roots_of(CHAIN_CA.cert_pem()), NOW)
    assert app.audience == BILLING_PAYMENTS and dict(app.claims) == {"sub": "alice"}  # its own policies: none


def test_a_namespace_without_listed_claims_receives_the_user_alone() -> None:
    """A namespace whose policies reference nothing but `sub` (or that the operator left out: over its bound) is
    not listed in frontend's config: its workloads get the user's `sub`, never frontend's other claims."""
    wire, _ = _frontend_sends(BILLING_NS, {ORDERS: ["sub", "email", "tenant"]})
    ctx = verify_context(wire, FRONTEND, LEDGER, roots_of(CHAIN_CA.cert_pem()), NOW, namespace_ok=True)
    assert dict(ctx.claims) == {"sub": "alice"}


def test_attack_namespace_token_replayed_by_another_workload_of_that_namespace_token_binding() -> None:
    """ledger (billing) captures the token frontend minted for billing (payments' app logged it) and presents it
    to payments over its own mTLS connection: the audience is right, the binding is not."""
    wire, _ = _frontend_sends(BILLING_NS, {BILLING_NS: ["sub", "tenant"]})
    got = _received(wire, BILLING_PAYMENTS, LEDGER)
    assert got.outcome is Outcome.UNAUTHENTICATED and "not minted by the peer" in got.reason


@pytest.mark.parametrize("peer", [INTRUDER, FRONTEND], ids=["replayed-by-the-intruder", "sent-by-the-minter"])
def test_attack_namespace_token_presented_in_a_third_namespace_rfc7519_4_1_3(peer: str) -> None:
    """A token for billing presented in namespace intruder: by the intruder that captured it (binding and
    audience), and even by its minter, frontend, over its own connection (audience: billing only)."""
    wire, _ = _frontend_sends(BILLING_NS, {BILLING_NS: ["sub", "tenant"]})
    got = _received(wire, INTRUDER, peer, policy("intruder", rules=ANYONE))
    assert got.outcome is Outcome.UNAUTHENTICATED
    assert ("audience is not this workload nor its namespace" if peer == FRONTEND else "not minted by the peer") \
        in got.reason


@pytest.mark.parametrize("audience", [
    f"{TDOMAIN}/shop/sa/*",                                  # a token for namespace shop presented in billing
    f"{TDOMAIN}/bill/sa/*",                                  # a prefix of the receiver's namespace
    f"{TDOMAIN}/billing/sa/*/x",                             # more path after the wildcard
    f"{TDOMAIN}/billing/*",                                  # not the map's form
    "spiffe://evil.example/ns/billing/sa/*",                 # the same namespace in another trust domain
    f"{TDOMAIN}/billing/sa/",                                # an empty ServiceAccount
    "*",
])
def test_attack_namespace_audience_accepted_only_for_the_receivers_own_namespace(audience: str) -> None:
    """frontend (the real peer, its own key) mints for lookalikes of billing's audience: none is billing's."""
    token = mint(minting_key(NS_CERTS[FRONTEND]), audience, ISSUER, {"sub": "alice"}, (FRONTEND,), "d", NOW, 30)[0]
    with pytest.raises(ContextError, match="audience"):
        verify_context(token, FRONTEND, BILLING_PAYMENTS, roots_of(CHAIN_CA.cert_pem()), NOW + 1, namespace_ok=True)


def test_attack_a_namespace_token_passed_off_as_the_apps_own_at_the_exchange() -> None:
    """The app's token must name its workload exactly: a token for the workload's namespace, minted by the
    workload itself (toward a Service of its namespace that it also backs, so it arrived inbound and sits in the
    verified cache), is refused when the app presents it to the exchange, cached or not."""
    clock = Clock(NOW)
    service = ContextService(ContextKeys(lambda: NS_CERTS[ORDERS]), clock)
    shop_ns = f"{TDOMAIN}/shop/sa/*"
    token = mint(minting_key(NS_CERTS[ORDERS]), shop_ns, ISSUER, {"sub": "alice"}, (ORDERS,), "d", NOW, 30)[0]
    with pytest.raises(ContextError, match="audience is not this workload"):
        service.verify(token, TokenCache.key(token), ORDERS, ORDERS)
    assert service.verify(token, TokenCache.key(token), ORDERS, ORDERS, namespace_ok=True)[0].audience == shop_ns
    with pytest.raises(ContextError, match="audience is not this workload"):
        service.verify(token, TokenCache.key(token), ORDERS, ORDERS)


def test_a_service_over_two_service_accounts_receives_the_user_minimized_to_their_union() -> None:
    """Issue 19: a Service in frontend's own namespace backed by orders and payments: the token names namespace
    shop, carries what either's policies reference and nothing else, and either pod accepts it from frontend."""
    wire, d = _frontend_sends(f"{ORDERS},{PAYMENTS}", {ORDERS: ["sub", "email"], PAYMENTS: ["sub", "tenant"],
                                                        f"{TDOMAIN}/shop/sa/admin": ["sub", "scope"]})
    assert d.outcome is Outcome.ALLOW
    for at in (ORDERS, PAYMENTS):
        ctx = verify_context(wire, FRONTEND, at, roots_of(CHAIN_CA.cert_pem()), NOW, namespace_ok=True)
        assert ctx.audience == f"{TDOMAIN}/shop/sa/*"
        assert dict(ctx.claims) == {"sub": "alice", "email": "alice@example.com", "tenant": "acme"}
    assert _received(wire, PAYMENTS, FRONTEND).outcome is Outcome.ALLOW


def test_a_destination_spanning_namespaces_gets_no_user() -> None:
    """Identities of two namespaces behind one address (a malformed map: Envoy asks no exchange there): the agent
    mints nothing and removes the context headers rather than pick an audience."""
    wire, d = _frontend_sends(f"{ORDERS},{BILLING_NS}", {BILLING_NS: ["sub", "tenant"]})
    assert wire == "" and d.outcome is Outcome.ALLOW and "no single audience" in d.reason
    assert WIRE_HEADER in d.headers_to_remove


def test_the_path_through_a_namespace_audience_is_proven_past_it() -> None:
    """frontend -> (billing) payments -> ledger: frontend's hop proof names billing, the workload after it in
    `act` is payments, of billing: ledger sees act = (payments, frontend), both proven."""
    wire, _ = _frontend_sends(BILLING_NS, {BILLING_NS: ["sub"]})
    received = verify_context(wire, FRONTEND, BILLING_PAYMENTS, roots_of(CHAIN_CA.cert_pem()), NOW,
                              namespace_ok=True)
    onward = mint(minting_key(NS_CERTS[BILLING_PAYMENTS]), LEDGER, ISSUER, {"sub": "alice"},
                  (BILLING_PAYMENTS, *received.act), "d2", NOW, 30, received.expires_at, received.proofs)[0]
    ctx = verify_context(onward, BILLING_PAYMENTS, LEDGER, roots_of(CHAIN_CA.cert_pem()), NOW + 1, namespace_ok=True)
    assert ctx.act == (BILLING_PAYMENTS, FRONTEND)


def test_attack_a_namespace_hop_proof_claimed_by_a_workload_of_another_namespace() -> None:
    """intruder (a third namespace) got frontend's proof for billing (from a log of the chain) and claims frontend
    passed it alice: the proof names billing, not the intruder's namespace. What it does prove: frontend passed
    alice to *a* workload of billing (docs/context-tokens.md, what a namespace audience gives up)."""
    wire, _ = _frontend_sends(BILLING_NS, {BILLING_NS: ["sub"]})
    received = verify_context(wire, FRONTEND, BILLING_PAYMENTS, roots_of(CHAIN_CA.cert_pem()), NOW,
                              namespace_ok=True)
    for claimant, match in ((INTRUDER, "minted for another workload"), (LEDGER, None)):
        claimed = mint(minting_key(NS_CERTS[claimant]), ORDERS, ISSUER, {"sub": "alice"}, (claimant, FRONTEND),
                       "d2", NOW, 30, received.expires_at, received.proofs)[0]
        if match is None:  # pinned: a workload of billing can claim it (documented)
            assert verify_context(claimed, claimant, ORDERS, roots_of(CHAIN_CA.cert_pem()), NOW + 1).act == (
                LEDGER, FRONTEND)
            continue
        with pytest.raises(ContextError, match=match):
            verify_context(claimed, claimant, ORDERS, roots_of(CHAIN_CA.cert_pem()), NOW + 1)


def test_namespace_tokens_are_cached_per_destination_not_per_audience() -> None:
    """Two destinations of one audience (a Service over orders and payments, and one over orders and admin) need
    different claims: each gets its own minted token, neither the other's."""
    clock = Clock(NOW)
    front, _ = agent(NS_CERTS[FRONTEND], policy("frontend", rules=ANYONE), clock, claims=["tenant", "email"],
                     destinations={ORDERS: ["sub"], PAYMENTS: ["sub", "tenant"], f"{TDOMAIN}/shop/sa/admin": ["sub",
                                                                                                           "email"]})
    app, _ = mint(minting_key(NS_CERTS[FRONTEND]), FRONTEND, ISSUER, USER, (), "edge", NOW, 30)
    claims = []
    for dest in (f"{ORDERS},{PAYMENTS}", f"{TDOMAIN}/shop/sa/admin,{ORDERS}"):
        wire = set_headers(front.exchange(_outbound(app, dest), "outbound"))[WIRE_HEADER]
        claims.append(set(verify_context(wire, FRONTEND, ORDERS, roots_of(CHAIN_CA.cert_pem()), NOW,
                                         namespace_ok=True).claims))
    assert claims == [{"sub", "tenant"}, {"sub", "email"}]


def test_attack_a_namespace_hop_proof_passed_off_as_the_peers_first_hop() -> None:
    """ledger (billing) holds frontend's proof for billing and sends payments a token naming only frontend in
    `act`, the proof behind it, as an app's own token carries the chain: payments would see frontend as the
    workload that handed it alice, ledger hidden. A token passed on must name its minter first."""
    wire, _ = _frontend_sends(BILLING_NS, {BILLING_NS: ["sub"]})
    received = verify_context(wire, FRONTEND, LEDGER, roots_of(CHAIN_CA.cert_pem()), NOW, namespace_ok=True)
    hiding = mint(minting_key(NS_CERTS[LEDGER]), BILLING_PAYMENTS, ISSUER, {"sub": "alice"}, received.act, "d2",
                  NOW, 30, received.expires_at, received.proofs)[0]
    got = _received(hiding, BILLING_PAYMENTS, LEDGER, policy("payments", rules=[
        {"name": "via-frontend", "when": [f"'{FRONTEND}' in source.act"]}]))
    assert got.outcome is Outcome.UNAUTHENTICATED and "act does not name its minter first" in got.reason
