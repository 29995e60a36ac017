"""A validated SidecarConfig compiled for the hot path: issuers, token sources, rules, flags.

Compiling happens once per config (load or hot reload); a failure here rejects the
new config and keeps the last good one in force.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from meshward.sidecar.config.schema import (
    Issuer,
    Revocations,
    SidecarConfig,
    TokenSource,
    hashed_revocation,
    issuers_of,
)
from meshward.sidecar.domain.jwt import VerifiedToken
from meshward.sidecar.domain.policy import CompiledPolicies, compile_policies


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one request needs, precomputed."""

    config: SidecarConfig
    issuers: dict[str, Issuer]
    sources: tuple[TokenSource, ...]
    policies: CompiledPolicies
    # A missing token is a 401 when an Enforce policy requires one; an audit finding otherwise.
    require_jwt_enforced: bool
    require_jwt_audit: bool
    # An invalid token is a 401 when an Enforce policy configures JWT issuers.
    jwt_enforced: bool
    # Header names Meshward sets upstream; client-sent copies are always removed.
    owned_headers: tuple[str, ...]
    # Headers carrying the original token, removed upstream unless an issuer forwards it.
    token_headers_to_strip: tuple[str, ...]
    # Cookies carrying the original token, cut out of the upstream `cookie` header likewise.
    token_cookies_to_strip: frozenset[str] = frozenset()
    # The policy a missing or invalid token would be denied by were its Audit mode enforced.
    jwt_audit_policy: str = ""


def compile_snapshot(config: SidecarConfig, pause: Callable[[], None] | None = None) -> Snapshot:
    """Compile a config; raise ConfigError when a rule (e.g. its CEL) does not compile.

    `pause` is called between the generated rule functions of a large config (compile_policies).
    """
    policies = compile_policies(config.policies, pause) if pause is not None else compile_policies(config.policies)
    issuers = issuers_of(config.policies)
    sources: list[TokenSource] = []
    for i in issuers.values():
        for s in i.sources:
            if s not in sources:
                sources.append(s)
    forward = {s.header for i in issuers.values() if i.forward_original_token for s in i.sources if s.header}
    strip = tuple(sorted({s.header for s in sources if s.header and s.header not in forward}))
    forward_cookies = {s.cookie for i in issuers.values() if i.forward_original_token for s in i.sources if s.cookie}
    strip_cookies = frozenset(s.cookie for s in sources if s.cookie and s.cookie not in forward_cookies)
    return Snapshot(
        config=config, issuers=issuers, sources=tuple(sources), policies=policies,
        require_jwt_enforced=any(p.require_jwt and p.mode == "Enforce" for p in config.policies),
        require_jwt_audit=any(p.require_jwt for p in config.policies),
        jwt_enforced=any(p.issuers and p.mode == "Enforce" for p in config.policies),
        owned_headers=tuple(config.identity_headers),
        token_headers_to_strip=strip,
        token_cookies_to_strip=strip_cookies,
        jwt_audit_policy=next((p.name for p in config.policies if p.issuers and p.mode == "Audit"), ""),
    )


def pieces(snapshot: Snapshot) -> list[object]:
    """The snapshot's compiled rules and parsed policies, leaves first, for freeing a piece at a time."""
    return [*snapshot.policies.pieces(), *snapshot.config.policies]


def extract_token(sources: tuple[TokenSource, ...], headers: Mapping[str, str]
                  ) -> tuple[str | None, TokenSource | None]:
    """Return (token, the source it came from) for the first configured source present."""
    for s in sources:
        if s.header is not None:
            value = headers.get(s.header)
            if value is None:
                continue
            if s.prefix:
                if value[: len(s.prefix)].lower() != s.prefix.lower():
                    continue
                value = value[len(s.prefix):]
            value = value.strip()
            if value:
                return value, s
        elif s.cookie is not None:
            cookie = headers.get("cookie")
            if not cookie:
                continue
            for part in cookie.split(";"):
                name, _, v = part.strip().partition("=")
                if name == s.cookie and v:
                    return v, s
    return None, None


def without_cookies(header: str, names: Collection[str]) -> str | None:
    """The `cookie` header without the cookies `names` (every occurrence, the rest in order); None if none is there."""
    parts = [part.strip() for part in header.split(";") if part.strip()]
    kept = [part for part in parts if part.partition("=")[0].strip() not in names]
    return None if len(kept) == len(parts) else "; ".join(kept)


def _revocation_forms(token: VerifiedToken) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The token's jti, sid and subject forms, each plain and hashed; computed once per token (memo).

    Subject forms: bare `sub`, and `iss/sub` with and without the issuer's trailing slash.
    """
    forms: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] | None = token.memo.get("revocation")
    if forms is None:
        def both(values: Sequence[str | None]) -> tuple[str, ...]:
            plain = [v for v in values if v]
            return (*plain, *(hashed_revocation(v) for v in plain))
        subs = [token.subject, f"{token.issuer}/{token.subject}", f"{token.issuer.rstrip('/')}/{token.subject}"]
        forms = token.memo["revocation"] = (both([token.jti]), both([token.sid]), both(subs))
    return forms


def is_revoked(rev: Revocations, token: VerifiedToken) -> bool:
    """Whether a verified token is revoked by jti, by session, or by subject (bare `sub` or `iss/sub`)."""
    if not (rev.jti or rev.sid or rev.sub):
        return False
    jti, sid, sub = _revocation_forms(token)
    return any(f in rev.jti for f in jti) or any(f in rev.sid for f in sid) or any(f in rev.sub for f in sub)
