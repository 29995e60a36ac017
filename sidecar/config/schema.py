"""The sidecar's policy config: the versioned contract the operator compiles AuthPolicies into.

Why: the agent must run without Kubernetes (tests, the local mesh, benchmarks), and
the operator must have one precise target to compile `AuthPolicy` objects into.
This module parses and validates that document (YAML or JSON) into frozen
dataclasses, with errors that name the field path and the fix. It is pure: no I/O,
so the same function validates a file on hot reload and a snapshot from the
operator. The format is documented in docs/sidecar-config.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

API_VERSION = "sidecar.meshward.io/v1alpha1"
KIND = "SidecarConfig"

# The only algorithms a JWT may use; `none` and HMAC never (RFC 8725 §3.1, §2.1).
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"})
DEFAULT_ALGORITHMS = ("RS256", "ES256")
# Every header Meshward sets carries this prefix, so one rule strips client-sent copies.
HEADER_PREFIX = "x-meshward-"
# Tokens larger than this are rejected before any parsing (Envoy's own default header limit is 60 KiB).
DEFAULT_MAX_TOKEN_BYTES = 8192
# Enough for a busy pod's distinct users; each entry is a few hundred bytes.
DEFAULT_TOKEN_CACHE_SIZE = 10_000
DEFAULT_CLOCK_SKEW_S = 30.0
# Bearer tokens cannot be revoked in flight: a token living longer than a day is refused unless an
# issuer says otherwise, and no issuer may allow more than a week (a 10-year token was accepted before).
DEFAULT_MAX_LIFETIME_S = 86_400.0
MAX_LIFETIME_BOUND_S = 7 * 86_400.0
# JWT `typ` values of access tokens (RFC 9068 §2.1; RFC 7519 §5.1), compared case-insensitively without
# an `application/` prefix (RFC 7515 §4.1.9). Tokens without `typ` are accepted too. Anything else is a
# JWT made for another purpose (logout+jwt, secevent+jwt, dpop+jwt, id_token+jwt…) and refused.
DEFAULT_TOKEN_TYPES = ("jwt", "at+jwt")
# How often the JWKS is refreshed in the background; unknown `kid`s trigger earlier refetches.
DEFAULT_JWKS_REFRESH_S = 300.0
# At most one unknown-kid refetch per issuer per this many seconds (a flood of random kids
# must not turn the sidecar into a load generator against the IdP).
DEFAULT_JWKS_MIN_REFETCH_S = 5.0
DEFAULT_JWKS_TIMEOUT_S = 5.0
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_HEADER = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
# Hosts plain http is accepted for: this machine only.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})

Mode = Literal["Enforce", "Audit"]
Action = Literal["Allow", "Deny"]
MODES: tuple[Mode, ...] = ("Enforce", "Audit")
ACTIONS: tuple[Action, ...] = ("Allow", "Deny")


class ConfigError(ValueError):
    """The config is invalid; the message names the field path and the fix."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


@dataclass(frozen=True)
class TokenSource:
    """Where a JWT is read from: a header (with an optional prefix) or a cookie."""

    header: str | None = None
    prefix: str = ""
    cookie: str | None = None


@dataclass(frozen=True)
class Issuer:
    """A trusted end-user JWT issuer."""

    issuer: str
    audiences: tuple[str, ...]
    jwks_uri: str | None
    algorithms: frozenset[str]
    sources: tuple[TokenSource, ...]
    forward_original_token: bool = False
    clock_skew_s: float = DEFAULT_CLOCK_SKEW_S
    max_lifetime_s: float = DEFAULT_MAX_LIFETIME_S
    ca_file: str | None = None
    # The keys inline (a JWKS document), instead of fetched from jwks_uri or discovery.
    jwks: str | None = None
    # Accepted `typ` values, lowercase without `application/`; tokens without `typ` always pass this check.
    token_types: frozenset[str] = frozenset(DEFAULT_TOKEN_TYPES)


@dataclass(frozen=True)
class From:
    """Who calls: peer principals, end-user principals, peer namespaces (each ORed within)."""

    principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()


PathMatch = Literal["Strict", "Lenient"]


@dataclass(frozen=True)
class To:
    """What is called: methods, paths, hosts, ports (each ORed within).

    `path_match` None means the default: Lenient for Deny rules, Strict for Allow rules.
    """

    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    path_match: PathMatch | None = None


@dataclass(frozen=True)
class Rule:
    """One authorization rule; it matches when every part given matches."""

    name: str
    action: Action
    mode: Mode
    from_: From = field(default_factory=From)
    to: To = field(default_factory=To)
    when: tuple[str, ...] = ()


@dataclass(frozen=True)
class Policy:
    """One compiled AuthPolicy as it applies to this workload."""

    name: str
    mode: Mode
    issuers: tuple[Issuer, ...]
    require_jwt: bool
    rules: tuple[Rule, ...]


# Revocation values may be given hashed, `sha256:<hex of the value>`: the operator sends them so, and a
# sidecar then learns which tokens to refuse without learning whom they name.
REVOCATION_HASH_PREFIX = "sha256:"


def hashed_revocation(value: str) -> str:
    """The hashed form of a revocation value (a jti, sid, sub or `<iss>/<sub>`)."""
    return REVOCATION_HASH_PREFIX + hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True)
class Revocations:
    """Tokens denied everywhere: by `jti`, by subject (`iss/sub` or bare `sub`), or by session `sid`.

    Each value is plain or hashed (`sha256:<hex>`, see hashed_revocation).
    """

    jti: frozenset[str] = frozenset()
    sub: frozenset[str] = frozenset()
    sid: frozenset[str] = frozenset()


@dataclass(frozen=True)
class JwksSettings:
    """How keys are fetched."""

    refresh_s: float = DEFAULT_JWKS_REFRESH_S
    min_refetch_s: float = DEFAULT_JWKS_MIN_REFETCH_S
    timeout_s: float = DEFAULT_JWKS_TIMEOUT_S


@dataclass(frozen=True)
class ContextSettings:
    """The user context this workload receives (minted by its sidecar for context propagation).

    `destinations` maps each mesh identity to the claims its own policies let through, and
    another namespace's `spiffe://<td>/ns/<ns>/sa/*` to what any of its policies let through,
    so that on an outbound call the context token is cut down to what the callee needs.
    """

    claims: tuple[str, ...] = ("sub",)
    ttl_s: float = 30.0
    header: str = "x-meshward-context"
    destinations: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class SidecarConfig:
    """The whole validated config."""

    workload: str
    policies: tuple[Policy, ...]
    identity_headers: Mapping[str, str]
    revocations: Revocations = field(default_factory=Revocations)
    jwks: JwksSettings = field(default_factory=JwksSettings)
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES
    token_cache_size: int = DEFAULT_TOKEN_CACHE_SIZE
    generation: str = ""
    context: ContextSettings = field(default_factory=ContextSettings)


# ------------------------------------------------------------------------------ parsing


_S = TypeVar("_S", bound=str)


class _Reader:
    """Typed access to one mapping of the document, tracking the field path for errors."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(path, f"must be a mapping, got {type(data).__name__}")
        self.data = data
        self.path = path
        self.seen: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        self.seen.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                raise ConfigError(self.at(key), "is required")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ConfigError(self.at(key), f"must be a {names}, got {type(value).__name__}")
        return value

    def strings(self, key: str, *, required: bool = False, pattern: re.Pattern[str] | None = None,
                hint: str = "") -> tuple[str, ...]:
        items = self.get(key, list, [], required=required)
        out = []
        for n, item in enumerate(items):
            p = f"{self.at(key)}[{n}]"
            if not isinstance(item, str) or not item:
                raise ConfigError(p, "must be a non-empty string")
            if pattern and not pattern.match(item):
                raise ConfigError(p, f"{item!r} is invalid{hint}")
            out.append(item)
        return tuple(out)

    def choice(self, key: str, allowed: tuple[_S, ...], default: _S) -> _S:
        """The string at `key`, one of `allowed`."""
        value: _S = self.get(key, str, default)
        if value not in allowed:
            raise ConfigError(self.at(key), f"{value!r} must be {' or '.join(allowed)}")
        return value

    def section(self, key: str) -> _Reader | None:
        """A reader of the mapping at `key`, None when the field is absent."""
        return _Reader(self.get(key, Mapping), self.at(key)) if key in self.data else None

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(self.at(unknown[0]), "unknown field (check the spelling against "
                                                   "docs/sidecar-config.md)")


def _unique(names: Sequence[str], path: Callable[[int], str], problem: str) -> None:
    """Raise naming the first repeated name in `names` (its path from `path`)."""
    for n, x in enumerate(names):
        if names.index(x) != n:
            raise ConfigError(path(n), f"{x!r} {problem}")


def _positive(r: _Reader, key: str, default: float, *, maximum: float | None = None) -> float:
    v = float(r.get(key, float, default))
    if v <= 0 or (maximum is not None and v > maximum):
        bound = f" and at most {maximum:g}" if maximum is not None else ""
        raise ConfigError(r.at(key), f"must be greater than 0{bound}, got {v:g}")
    return v


def url_problem(url: str) -> str | None:
    """Why `url` may not be fetched for keys (None when it may): https, or plain http to this machine only.

    Parsed, not prefix-matched: `http://localhost@192.0.2.2/` is a request to 192.0.2.2 with userinfo.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("https", "http"):
        return "is not an http(s) URL"
    if any(ch.isspace() or ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url):
        return "contains whitespace or control characters"
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        return "must not carry userinfo (user@host): the host is what follows the @"
    host = authority
    if host.startswith("["):
        host = host[: host.find("]") + 1] if "]" in host else ""
    else:
        host = host.rsplit(":", 1)[0] if ":" in host else host
    if not host:
        return "has no host"
    port = authority[len(host):]
    if port and not (port.startswith(":") and port[1:].isdigit() and 0 < int(port[1:]) < 65536):
        return f"has an invalid port {port!r}"
    if scheme.lower() == "http" and host.lower() not in LOOPBACK_HOSTS:
        return ("uses plain http to another machine, so its keys could be forged on the way; serve it over https "
                "(an in-cluster IdP: a TLS certificate for its Service name, and caFile for its CA)")
    return None


def _url(r: _Reader, key: str, *, required: bool) -> str | None:
    v = r.get(key, str, required=required)
    if v is not None:
        problem = url_problem(v)
        if problem:
            raise ConfigError(r.at(key), f"{v!r} must be an https URL without user@ (plain http only to 127.0.0.1, "
                                         f"localhost or [::1]): it {problem}")
    return v  # type: ignore[no-any-return]


def _issuer(data: Any, path: str) -> Issuer:
    r = _Reader(data, path)
    issuer = _url(r, "issuer", required=True)
    assert issuer is not None
    audiences = r.strings("audiences", required=True)
    if not audiences:
        raise ConfigError(r.at("audiences"), "must list at least one audience")
    algorithms = r.strings("algorithms") or DEFAULT_ALGORITHMS
    for n, alg in enumerate(algorithms):
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise ConfigError(f"{r.at('algorithms')}[{n}]", f"{alg!r} is not allowed; use one of "
                                                             f"{', '.join(sorted(ASYMMETRIC_ALGORITHMS))}")
    sources = _token_sources(r)
    skew = float(r.get("clockSkewSeconds", float, DEFAULT_CLOCK_SKEW_S))
    if not 0 <= skew <= 300:
        raise ConfigError(r.at("clockSkewSeconds"), f"must be between 0 and 300, got {skew:g}")
    max_life = float(r.get("maxLifetimeSeconds", float, DEFAULT_MAX_LIFETIME_S))
    if not 0 < max_life <= MAX_LIFETIME_BOUND_S:
        raise ConfigError(r.at("maxLifetimeSeconds"), f"must be greater than 0 and at most {MAX_LIFETIME_BOUND_S:g} "
                                                      f"(7 days), got {max_life:g}")
    types = tuple(t.lower().removeprefix("application/") for t in r.strings("tokenTypes")) or DEFAULT_TOKEN_TYPES
    jwks_uri = _url(r, "jwksUri", required=False)
    jwks = _inline_jwks(r)
    if jwks is not None and jwks_uri is not None:
        raise ConfigError(r.at("jwks"), "set jwks (keys inline) or jwksUri (keys fetched), not both")
    out = Issuer(
        issuer=issuer, audiences=audiences, jwks_uri=jwks_uri, jwks=jwks,
        algorithms=frozenset(algorithms), sources=sources,
        forward_original_token=bool(r.get("forwardOriginalToken", bool, False)),
        clock_skew_s=skew, max_lifetime_s=max_life, ca_file=r.get("caFile", str), token_types=frozenset(types),
    )
    r.done()
    return out


def _inline_jwks(r: _Reader) -> str | None:
    """An inline JWKS: a JSON object with a `keys` list of public keys only."""
    text = r.get("jwks", str)
    if text is None:
        return None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ConfigError(r.at("jwks"), f"is not JSON: {e}") from e
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ConfigError(r.at("jwks"), 'must be a JWKS document: {"keys": [...]} with at least one key')
    for n, key in enumerate(keys):
        if isinstance(key, dict) and any(p in key for p in ("d", "p", "q", "k")):
            raise ConfigError(f"{r.at('jwks')}.keys[{n}]", "holds private or symmetric key material: publish the "
                                                             "public keys only (no d, p, q or k)")
    return str(text)


def _token_sources(r: _Reader) -> tuple[TokenSource, ...]:
    """Where an issuer's tokens are read from: its headers, then its cookies; `Authorization: Bearer` if neither."""
    sources: list[TokenSource] = []
    for n, h in enumerate(r.get("fromHeaders", list, [])):
        hr = _Reader(h, f"{r.at('fromHeaders')}[{n}]")
        name = hr.get("name", str, required=True).lower()
        if not _HEADER.match(name):
            raise ConfigError(hr.at("name"), f"{name!r} is not a valid header name")
        sources.append(TokenSource(header=name, prefix=hr.get("prefix", str, "")))
        hr.done()
    sources.extend(TokenSource(cookie=cookie) for cookie in r.strings("fromCookies"))
    return tuple(sources) or (TokenSource(header="authorization", prefix="Bearer "),)


def _principal_ok(p: str) -> bool:
    if p == "*":
        return True
    body = p[1:] if p.startswith("*") else p[:-1] if p.endswith("*") else p
    return "*" not in body and (p.startswith("*") or p.startswith("spiffe://"))


def _rule(data: Any, path: str, policy_mode: Mode) -> Rule:
    r = _Reader(data, path)
    name = r.get("name", str, required=True)
    if not _NAME.match(name):
        raise ConfigError(r.at("name"), f"{name!r} must be lowercase letters, digits and '-'")
    action = r.choice("action", ACTIONS, "Allow")
    mode = r.choice("mode", MODES, policy_mode)
    fr, tr = r.section("from"), r.section("to")
    rule = Rule(name=name, action=action, mode=mode, from_=_from(fr) if fr else From(), to=_to(tr) if tr else To(),
                when=r.strings("when"))
    r.done()
    return rule


def _from(r: _Reader) -> From:
    """A rule's `from`: who may call."""
    principals = r.strings("principals")
    for n, p in enumerate(principals):
        if not _principal_ok(p):
            raise ConfigError(f"{r.at('principals')}[{n}]",
                              f"{p!r}: use a SPIFFE ID with at most one '*' at its start or end, or '*'")
    out = From(principals, r.strings("requestPrincipals"), r.strings("namespaces", pattern=_NAME))
    r.done()
    return out


def _to(r: _Reader) -> To:
    """A rule's `to`: which requests it is about."""
    methods = r.strings("methods")
    for n, m in enumerate(methods):
        if m not in HTTP_METHODS:
            raise ConfigError(f"{r.at('methods')}[{n}]", f"{m!r} is not an uppercase HTTP method")
    paths = r.strings("paths")
    for n, p in enumerate(paths):
        if not (p.startswith("/") or p == "*"):
            raise ConfigError(f"{r.at('paths')}[{n}]", f"{p!r} must start with '/' (or be '*')")
    ports = tuple(r.get("ports", list, []))
    for n, port in enumerate(ports):
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ConfigError(f"{r.at('ports')}[{n}]", f"{port!r} must be a port number 1..65535")
    path_match = r.get("pathMatch", str)
    if path_match not in (None, "Strict", "Lenient"):
        raise ConfigError(r.at("pathMatch"), f"{path_match!r} must be Strict or Lenient")
    out = To(methods, paths, tuple(h.lower() for h in r.strings("hosts")), ports, path_match)
    r.done()
    return out


def _policy(data: Any, path: str) -> Policy:
    r = _Reader(data, path)
    name = r.get("name", str, required=True)
    mode = r.choice("mode", MODES, "Enforce")
    issuers = tuple(_issuer(d, f"{r.at('jwt')}[{n}]") for n, d in enumerate(r.get("jwt", list, [])))
    _unique([i.issuer for i in issuers], lambda n: f"{r.at('jwt')}[{n}].issuer", "is listed twice; merge the entries")
    require_jwt = r.get("requireJwt", bool, bool(issuers))
    if require_jwt and not issuers:
        raise ConfigError(r.at("requireJwt"), "true needs at least one issuer in jwt")
    rules = tuple(_rule(d, f"{r.at('rules')}[{n}]", mode) for n, d in enumerate(r.get("rules", list, [])))
    _unique([x.name for x in rules], lambda n: f"{r.at('rules')}[{n}].name", "is used twice; rule names must be unique")
    r.done()
    return Policy(name=name, mode=mode, issuers=issuers, require_jwt=require_jwt, rules=rules)


def parse_config(doc: Any) -> SidecarConfig:
    """Validate a decoded config document and return it typed; raise ConfigError naming the field."""
    r = _Reader(doc, "")
    api = r.get("apiVersion", str, required=True)
    if api != API_VERSION:
        raise ConfigError("apiVersion", f"{api!r} is not supported; this sidecar reads {API_VERSION}")
    kind = r.get("kind", str, required=True)
    if kind != KIND:
        raise ConfigError("kind", f"{kind!r} must be {KIND}")
    workload = r.get("workload", str, required=True)
    policies = tuple(_policy(d, f"policies[{n}]") for n, d in enumerate(r.get("policies", list, [])))
    _unique([p.name for p in policies], lambda n: f"policies[{n}].name", "is used twice")
    headers = _identity_headers(r.get("identityHeaders", Mapping, {"x-meshward-sub": "sub", "x-meshward-iss": "iss"}))
    rr, jr = r.section("revocations"), r.section("jwks")
    revocations = _revocations(rr) if rr else Revocations()
    jwks = _jwks(jr) if jr else JwksSettings()
    context = _context(r.get("context", Mapping, {}))
    max_token, cache = _limits(_Reader(r.get("limits", Mapping, {}), "limits"))
    generation = str(r.get("generation", (str, int), ""))
    r.done()
    _one_definition_per_issuer(policies)
    return SidecarConfig(workload=workload, policies=policies, identity_headers=headers, revocations=revocations,
                         jwks=jwks, max_token_bytes=max_token, token_cache_size=cache, generation=generation,
                         context=context)


def _identity_headers(raw: Mapping[Any, Any]) -> dict[str, str]:
    """The headers the workload receives, each naming the claim it carries."""
    headers: dict[str, str] = {}
    for h, claim in raw.items():
        p = f"identityHeaders.{h}"
        if not isinstance(h, str) or not h.startswith(HEADER_PREFIX) or not _HEADER.match(h):
            raise ConfigError(p, f"header names must be lowercase and start with {HEADER_PREFIX!r}")
        if not isinstance(claim, str) or not claim:
            raise ConfigError(p, "must name a claim, e.g. sub")
        headers[h] = claim
    return headers


def _revocations(r: _Reader) -> Revocations:
    """Tokens denied everywhere."""
    out = Revocations(frozenset(r.strings("jti")), frozenset(r.strings("sub")), frozenset(r.strings("sid")))
    r.done()
    return out


def _jwks(r: _Reader) -> JwksSettings:
    """How keys are fetched."""
    out = JwksSettings(
        refresh_s=_positive(r, "refreshSeconds", DEFAULT_JWKS_REFRESH_S),
        min_refetch_s=_positive(r, "minRefetchSeconds", DEFAULT_JWKS_MIN_REFETCH_S),
        timeout_s=_positive(r, "timeoutSeconds", DEFAULT_JWKS_TIMEOUT_S, maximum=60),
    )
    r.done()
    return out


def _limits(r: _Reader) -> tuple[int, int]:
    """The largest token accepted and how many verified tokens are cached."""
    max_token = int(r.get("maxTokenBytes", int, DEFAULT_MAX_TOKEN_BYTES))
    if not 512 <= max_token <= 65536:
        raise ConfigError("limits.maxTokenBytes", f"must be between 512 and 65536, got {max_token}")
    cache = int(r.get("tokenCacheSize", int, DEFAULT_TOKEN_CACHE_SIZE))
    if not 0 <= cache <= 1_000_000:
        raise ConfigError("limits.tokenCacheSize", f"must be between 0 and 1000000, got {cache}")
    r.done()
    return max_token, cache


def _one_definition_per_issuer(policies: Sequence[Policy]) -> None:
    """Raise when two policies of one workload define the same issuer differently."""
    first: dict[str, tuple[int, int, Issuer]] = {}
    for pn, pol in enumerate(policies):
        for jn, iss in enumerate(pol.issuers):
            if iss.issuer in first and first[iss.issuer][2] != iss:
                fp, fj, _ = first[iss.issuer]
                raise ConfigError(f"policies[{pn}].jwt[{jn}]",
                                  f"issuer {iss.issuer!r} is configured differently in policies[{fp}].jwt[{fj}]; "
                                  "one issuer must have one definition per workload")
            first.setdefault(iss.issuer, (pn, jn, iss))


def _context(data: Mapping[str, Any]) -> ContextSettings:
    r = _Reader(data, "context")
    claims = tuple(r.strings("claims")) or ("sub",)
    ttl = _positive(r, "ttlSeconds", 30.0, maximum=60)
    header = r.get("header", str, "x-meshward-context")
    if not re.match(r"^x-[a-z0-9-]+$", header):
        raise ConfigError(r.at("header"), f"{header!r} must be a lowercase header name starting with x-")
    dests: dict[str, tuple[str, ...]] = {}
    for spiffe, wanted in r.get("destinations", Mapping, {}).items():
        p = f"context.destinations.{spiffe}"
        if not isinstance(spiffe, str) or not spiffe.startswith("spiffe://"):
            raise ConfigError(p, "keys must be SPIFFE IDs (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)")
        if not isinstance(wanted, list) or not all(isinstance(c, str) and c for c in wanted):
            raise ConfigError(p, "must be a list of claim names")
        dests[spiffe] = tuple(wanted)
    r.done()
    return ContextSettings(claims, ttl, header, dests)


def issuers_of(policies: Sequence[Policy]) -> dict[str, Issuer]:
    """Every issuer by `iss` across `policies` (first definition wins)."""
    out: dict[str, Issuer] = {}
    for p in policies:
        for i in p.issuers:
            out.setdefault(i.issuer, i)
    return out
