"""Attack vectors against authorization and token handling, each named after what it attacks (issue: hardening).

Every test fails on the code before the fix it names: backtracking path globs, path and host forms that slip
past Deny rules, scopes in the shapes real IdPs send, nested identity claims, issuers with a trailing slash,
and OIDC discovery pointing keys at another machine.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest

from meshward.sidecar.config.schema import ConfigError, parse_config
from meshward.sidecar.domain.decision import Decision, Outcome
from meshward.sidecar.domain.policy import compile_paths
from meshward.sidecar.domain.snapshot import compile_snapshot
from meshward.sidecar.engines.keystore import KeyStore
from tests.support.idp import SigningKey
from tests.support.sidecar import ISSUER, Clock, StaticFetcher, config, issuer, pipeline, policy, request

KEY = SigningKey("RS256", kid="k1")
NOW = 1_800_000_000


def token(iss: str = ISSUER, **claims: Any) -> str:
    import jwt

    body = {"iss": iss, "aud": "orders", "sub": "alice", "iat": NOW, "exp": NOW + 300, **claims}
    return jwt.encode(body, KEY.private, algorithm="RS256", headers={"kid": "k1"})


def decide(rules: list[dict[str, Any]], inp: Any, *, jwt: list[dict[str, Any]] | None = None,
           iss: str = ISSUER, **extra: Any) -> Decision:
    p, _, _ = pipeline(config(policy(jwt=jwt, rules=rules), **extra), jwks={iss: [KEY.jwk]} if jwt else None,
                       clock=Clock(NOW))
    d = p.decide_now(inp, "http")
    assert isinstance(d, Decision)
    return d


# --- ReDoS -------------------------------------------------------------------------------------


def _within(seconds: float, fn: Any) -> Any:
    """Run fn in a thread; fail if it is still running after `seconds` (catches exponential blow-up, not speed)."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still matching after {seconds} s: a backtracking matcher"
    return out[0]


@pytest.mark.parametrize("path", ["/files/" + "-" * 600, "/files/" + "a-" * 300 + "b", "/files/" + "-" * 600 + ".tx"])
def test_redos_path_glob_is_matched_in_linear_time(path: str) -> None:
    """`/files/*-*-*-*.txt` against a 607-character path took 34 s of CPU with a backtracking regex and froze
    the agent (every other request 503). With RE2 it is linear in the path."""
    match = compile_paths(["/files/*-*-*-*.txt"])
    assert _within(5, lambda: match(path)) is False
    assert match("/files/a-b-c-d.txt") is True


def test_redos_through_the_pipeline_leaves_other_requests_decided() -> None:
    rules = [{"name": "reports", "to": {"paths": ["/files/*-*-*-*-*.txt", "/v*/**/x*y*z*"]}}]
    p, _, _ = pipeline(config(policy(rules=rules)), clock=Clock(NOW))
    evil = request("/files/" + "-" * 2000)
    d = _within(5, lambda: p.decide_now(evil, "http"))
    assert isinstance(d, Decision) and d.outcome is Outcome.FORBIDDEN
    ok = p.decide_now(request("/files/a-b-c-d-e.txt"), "http")
    assert isinstance(ok, Decision) and ok.outcome is Outcome.ALLOW


# --- path and host forms against Deny rules ----------------------------------------------------------

DENY_ADMIN: list[dict[str, Any]] = [{"name": "no-admin", "action": "Deny", "to": {"paths": ["/admin/*"]}}, {"name": "all"}]


@pytest.mark.parametrize("path", [
    "/admin/users",
    "/ADMIN/users",                  # case: IIS, Spring with case-insensitive matching
    "/Admin/users",
    "/admin;x/users",                # ;parameters: Tomcat/Jetty path parameters (jsessionid)
    "/admin;jsessionid=1/users",
    "/admin./users",                 # trailing dot of a segment: Windows file names, some routers
    "/%61dmin/users",                # RFC 3986 §6.2.2.2: %61 is an unreserved 'a'
    "/ad%6Din/users",
], ids=["plain", "upper-case", "mixed-case", "matrix-parameter", "jsessionid", "trailing-dot", "pct-encoded-a",
        "pct-encoded-m"])
def test_path_forms_an_app_reads_as_admin_are_denied(path: str) -> None:
    d = decide(DENY_ADMIN, request(path))
    assert (d.outcome, d.rule) == (Outcome.FORBIDDEN, "no-admin"), path


def test_a_strict_deny_rule_matches_exactly_as_written() -> None:
    rules: list[dict[str, Any]] = [
        {"name": "no-admin", "action": "Deny", "to": {"paths": ["/admin/*"], "pathMatch": "Strict"}},
             {"name": "all"}]
    assert decide(rules, request("/ADMIN/users")).outcome is Outcome.ALLOW
    assert decide(rules, request("/admin/users")).outcome is Outcome.FORBIDDEN


def test_allow_rules_match_strictly_unless_told_otherwise() -> None:
    strict = [{"name": "reads", "to": {"paths": ["/orders/*"]}}]
    assert decide(strict, request("/orders/1")).outcome is Outcome.ALLOW
    for path in ("/ORDERS/1", "/orders;x/1", "/orders./1"):
        assert decide(strict, request(path)).outcome is Outcome.FORBIDDEN, path
    lenient = [{"name": "reads", "to": {"paths": ["/orders/*"], "pathMatch": "Lenient"}}]
    assert decide(lenient, request("/ORDERS/1")).outcome is Outcome.ALLOW


def test_host_with_a_trailing_dot_is_the_same_host_for_a_deny_rule() -> None:
    """`Host: internal.shop.svc.` is the fully qualified spelling of internal.shop.svc (and Envoy strips it too)."""
    rules: list[dict[str, Any]] = [
        {"name": "no-internal", "action": "Deny", "to": {"hosts": ["internal.shop.svc", "*.admin.svc"]}},
             {"name": "all"}]
    for host in ("internal.shop.svc.", "INTERNAL.shop.svc.:8080", "x.admin.svc."):
        inp = request()
        inp.host = host
        assert decide(rules, inp).outcome is Outcome.FORBIDDEN, host


def test_path_match_must_be_strict_or_lenient() -> None:
    with pytest.raises(ConfigError, match=r"pathMatch: 'Loose' must be Strict or Lenient"):
        parse_config(config(policy(rules=[{"name": "r", "to": {"paths": ["/x"], "pathMatch": "Loose"}}])))


# --- scopes, nested claims, issuers with a trailing slash ---------------------------------------------

JWT = [issuer(algorithms=["RS256"])]
READS = [{"name": "reads", "when": ["'orders:read' in scopes"]}]


@pytest.mark.parametrize("claims", [
    {"scope": "openid orders:read"},           # RFC 9068 / Keycloak / Auth0: space-separated string
    {"scp": ["openid", "orders:read"]},        # Ory Hydra, Okta: an array
    {"scp": "orders:read profile"},            # Azure AD v2: a string under scp
], ids=["scope-string", "scp-array", "scp-string"])
def test_scopes_in_the_shapes_idps_send_are_one_list(claims: dict[str, Any]) -> None:
    d = decide(READS, request(token=token(**claims)), jwt=JWT)
    assert d.outcome is Outcome.ALLOW, d.reason


def test_a_denial_says_which_condition_failed() -> None:
    d = decide(READS, request(token=token(scp=["openid"])), jwt=JWT)
    assert d.outcome is Outcome.FORBIDDEN
    assert d.reason == "no rule allows this request (orders-api/reads: when[0] is false)"
    d = decide([{"name": "tenant", "when": ["claims.tenant == 'acme'"]}], request(token=token()), jwt=JWT)
    assert d.reason.startswith("no rule allows this request (orders-api/tenant: when[0] could not be evaluated")


def test_identity_headers_reach_nested_claims() -> None:
    d = decide([{"name": "all"}], request(token=token(ext={"tenant": "acme"})), jwt=JWT,
               identityHeaders={"x-meshward-tenant": "ext.tenant", "x-meshward-sub": "sub"})
    assert ("x-meshward-tenant", "acme") in d.headers_to_set
    assert ("x-meshward-sub", "alice") in d.headers_to_set


def test_a_claim_named_with_dots_wins_over_a_path() -> None:
    roles: dict[str, Any] = {"https://shop.example/roles": ["admin"]}
    d = decide([{"name": "all"}], request(token=token(ISSUER, **roles)), jwt=JWT,
               identityHeaders={"x-meshward-roles": "https://shop.example/roles"})
    assert ("x-meshward-roles", '["admin"]') in d.headers_to_set


HYDRA = "https://hydra.example.com/"  # Ory Hydra's default issuer ends with a slash


@pytest.mark.parametrize("principal", [f"{HYDRA.rstrip('/')}/alice", f"{HYDRA}/alice", f"{HYDRA.rstrip('/')}/*"])
def test_request_principals_match_an_issuer_with_a_trailing_slash(principal: str) -> None:
    rules = [{"name": "alice", "from": {"requestPrincipals": [principal]}}]
    d = decide(rules, request(token=token(HYDRA)), jwt=[issuer(HYDRA, algorithms=["RS256"])], iss=HYDRA)
    assert d.outcome is Outcome.ALLOW, d.reason
    other = decide(rules, request(token=token(HYDRA, sub="bob")), jwt=[issuer(HYDRA, algorithms=["RS256"])],
                   iss=HYDRA)
    assert other.outcome is Outcome.FORBIDDEN or principal.endswith("*")


def test_revoking_a_subject_of_an_issuer_with_a_trailing_slash() -> None:
    for entry in (f"{HYDRA.rstrip('/')}/alice", f"{HYDRA}/alice"):
        d = decide([{"name": "all"}], request(token=token(HYDRA)), jwt=[issuer(HYDRA, algorithms=["RS256"])],
                   iss=HYDRA, revocations={"sub": [entry]})
        assert (d.outcome, d.reason) == (Outcome.UNAUTHENTICATED, "token revoked"), entry


# --- where keys come from -------------------------------------------------------------------------


@pytest.mark.parametrize(("jwks_uri", "problem"), [
    ("http://localhost@192.0.2.2:18446/jwks.json", "userinfo"),
    ("http://192.0.2.2:18446/jwks.json", "plain http to another machine"),
    ("http://127.0.0.1.nip.io/jwks.json", "plain http to another machine"),
    ("ftp://idp.example.com/jwks.json", "not an http(s) URL"),
], ids=["userinfo-host-confusion", "plain-http-remote", "loopback-lookalike", "other-scheme"])
def test_oidc_discovery_cannot_point_keys_at_another_machine(jwks_uri: str, problem: str) -> None:
    """The discovery document is no more trusted than config: its jwks_uri passes the same parsed checks."""
    iss = "https://idp.example.com"
    discovery = json.dumps({"issuer": iss, "jwks_uri": jwks_uri}).encode()
    fetcher = StaticFetcher({f"{iss}/.well-known/openid-configuration": discovery,
                             jwks_uri: json.dumps({"keys": [KEY.jwk]}).encode()})
    asked: list[str] = []
    real_get = fetcher.get

    async def get(url: str, *, ca_file: str | None, timeout: float) -> bytes:
        asked.append(url)
        return await real_get(url, ca_file=ca_file, timeout=timeout)

    fetcher.get = get  # type: ignore[method-assign]
    snap = compile_snapshot(parse_config(config(policy(jwt=[{"issuer": iss, "audiences": ["orders"]}]))))
    keys = KeyStore(snap.issuers, snap.config.jwks, fetcher, Clock(NOW))
    assert asyncio.run(keys.refresh(iss)) is False
    assert jwks_uri not in asked
    assert problem in str(keys.status()[iss]["last_error"])


def test_discovery_naming_another_issuer_says_both() -> None:
    iss = "https://hydra.example.com/"
    fetcher = StaticFetcher({"https://hydra.example.com/.well-known/openid-configuration":
                             json.dumps({"issuer": "https://hydra.example.com", "jwks_uri": "https://x/j"}).encode()})
    snap = compile_snapshot(parse_config(config(policy(jwt=[{"issuer": iss, "audiences": ["orders"]}]))))
    keys = KeyStore(snap.issuers, snap.config.jwks, fetcher, Clock(NOW))
    assert asyncio.run(keys.refresh(iss)) is False
    error = str(keys.status()[iss]["last_error"])
    assert "'https://hydra.example.com'" in error and "'https://hydra.example.com/'" in error


@pytest.mark.parametrize("url", ["http://hydra.auth.svc:4444/", "http://localhost@idp.example.com/",
                                 "https://user:pw@idp.example.com/"])
def test_configured_issuer_urls_are_parsed_not_prefix_matched(url: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(config(policy(jwt=[{"issuer": url, "audiences": ["orders"]}])))
    assert "https" in str(e.value)


def test_an_in_cluster_http_idp_gets_a_message_that_says_how_to_serve_it() -> None:
    with pytest.raises(ConfigError, match=r"serve it over https .*caFile"):
        parse_config(config(policy(jwt=[{"issuer": "http://hydra.auth.svc:4444", "audiences": ["orders"]}])))


# --- tokens in cookies -----------------------------------------------------------------------------

COOKIE_JWT = [issuer(algorithms=["RS256"], fromCookies=["session"])]


def test_a_token_read_from_a_cookie_never_reaches_the_app() -> None:
    """`fromCookies`: the app got the raw IdP token in its Cookie header; now the cookie is cut out, the rest kept."""
    inp = request(cookie=f"theme=dark; session={token()}; lang=de")
    d = decide([{"name": "all"}], inp, jwt=COOKIE_JWT)
    assert d.outcome is Outcome.ALLOW
    assert ("cookie", "theme=dark; lang=de") in d.headers_to_set
    assert "cookie" not in d.headers_to_remove
    assert d.wire_cache is None  # per request: never served from another request's cache


def test_a_token_cookie_alone_removes_the_cookie_header() -> None:
    d = decide([{"name": "all"}], request(cookie=f"session={token()}"), jwt=COOKIE_JWT)
    assert d.outcome is Outcome.ALLOW
    assert "cookie" in d.headers_to_remove and not any(h == "cookie" for h, _ in d.headers_to_set)


BOTH_JWT = [issuer(algorithms=["RS256"], fromHeaders=[{"name": "authorization", "prefix": "Bearer "}],
                  fromCookies=["session"])]


@pytest.mark.parametrize("cookie_user", ["alice", "bob"])
def test_a_token_cookie_never_reaches_the_app_when_the_token_came_in_authorization(cookie_user: str) -> None:
    """The token was read from `Authorization` (the first source): the configured token cookie, the same user's or
    another user's token, passed through to the app untouched. Every configured token source is cut out, whichever
    one was used."""
    inp = request(token=token(), cookie=f"theme=dark; session={token(sub=cookie_user)}")
    d = decide([{"name": "all"}], inp, jwt=BOTH_JWT)
    assert d.outcome is Outcome.ALLOW
    assert ("cookie", "theme=dark") in d.headers_to_set
    assert "authorization" in d.headers_to_remove
    assert d.wire_cache is None


def test_a_token_cookie_never_reaches_the_app_when_no_token_was_used() -> None:
    """An Audit-mode policy lets a request through whose cookie token did not verify: the cookie is cut all the same,
    and a cookie header without a token cookie is left as sent."""
    audit = policy(jwt=[issuer(algorithms=["RS256"], fromCookies=["session"])], rules=[{"name": "all"}], mode="Audit")
    p, _, _ = pipeline(config(audit), jwks={ISSUER: [KEY.jwk]}, clock=Clock(NOW))
    d = p.decide_now(request(cookie="session=not-a-jwt; a=1"), "http")
    assert isinstance(d, Decision) and d.outcome is Outcome.ALLOW and d.would_deny
    assert ("cookie", "a=1") in d.headers_to_set
    d = decide([{"name": "all"}], request(token=token(), cookie="a=1;b=2"), jwt=BOTH_JWT)
    assert not any(h == "cookie" for h, _ in d.headers_to_set) and "cookie" not in d.headers_to_remove


def test_forward_original_token_keeps_the_cookie() -> None:
    jwt = [issuer(algorithms=["RS256"], fromCookies=["session"], forwardOriginalToken=True)]
    d = decide([{"name": "all"}], request(cookie=f"session={token()}; a=1"), jwt=jwt)
    assert d.outcome is Outcome.ALLOW
    assert not any(h == "cookie" for h, _ in d.headers_to_set) and "cookie" not in d.headers_to_remove
