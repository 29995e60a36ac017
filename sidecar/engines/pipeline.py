"""The decision pipeline: identity → authorization → response, shared by both transports.

Why phases: each is a small object behind a Protocol, testable on its own, and the
mapping of outcomes to wire codes lives in one table (domain.decision.WIRE).
The common case is synchronous (`decide_now`): a cached or verifiable token, a
dict lookup for keys, precompiled rules. Only a token with an unknown `kid`
needs I/O; `decide_now` then returns `NeedKeys` and the transport awaits `decide`,
which waits on the key store's single in-flight refetch.

Errors deny: any exception inside a phase becomes UNAVAILABLE (503), never allow.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from meshward.sidecar.config.schema import Issuer
from meshward.sidecar.domain.decision import AuditRecord, Decision, Outcome
from meshward.sidecar.domain.jwt import JwtError, ParsedToken, UnknownKey, VerifiedToken, parse, verify
from meshward.sidecar.domain.policy import AuthzResult, identity_headers, path_is_safe
from meshward.sidecar.domain.request import CheckInput
from meshward.sidecar.domain.snapshot import Snapshot, extract_token, is_revoked, without_cookie
from meshward.sidecar.engines.keystore import KeyStore
from meshward.sidecar.engines.token_cache import TokenCache

log = logging.getLogger("meshward.sidecar.pipeline")

REALM = "meshward"
# Per cached token: headers to set, headers to remove, subject hash, the transports' wire cache.
_TokenMemo = tuple[list[tuple[str, str]], list[str], str, dict[str, bytes]]


@dataclass(slots=True)
class Identity:
    """The identity phase's result."""

    token: VerifiedToken | None = None
    failure: str | None = None
    enforced: bool = True
    unavailable: bool = False
    revoked: bool = False
    # The cookie that carried the token, when the app must not see it.
    cookie: str | None = None


@dataclass(frozen=True, slots=True)
class NeedKeys:
    """The token names a key the store does not have yet; a refetch may find it."""

    issuer: str
    kid: str | None = None


class Authenticator(Protocol):
    """Identity phase."""

    def authenticate(self, inp: CheckInput, may_refetch: bool) -> Identity | NeedKeys:
        """Establish who is calling (peer from the input, user from the JWT)."""
        ...


class Authorizer(Protocol):
    """Authorization phase."""

    def authorize(self, inp: CheckInput, identity: Identity) -> AuthzResult:
        """Decide whether the identity may make this request."""
        ...


class AuditSink(Protocol):
    """Receives one record per decision."""

    def write(self, r: AuditRecord) -> None:
        """Record a decision."""
        ...


class DecisionObserver(Protocol):
    """Receives every decision for metrics."""

    def observe(self, decision: Decision, transport: str, seconds: float) -> None:
        """Count and time a decision."""
        ...


# Verifies a parsed token against the trusted issuers and their keys (domain.jwt.verify; explain injects
# domain.jwt.verify_unsigned).
Verifier = Callable[[ParsedToken, Mapping[str, Issuer], Callable[[str, str | None], Any], float], VerifiedToken]


class JwtAuthenticator:
    """Reads the end-user token, verifies it (cache first), and checks revocation."""

    def __init__(self, snapshot: Snapshot, keys: KeyStore, cache: TokenCache, clock: Callable[[], float],
                 verifier: Verifier = verify) -> None:
        self._s = snapshot
        self._keys = keys
        self._cache = cache
        self._clock = clock
        self._verify = verifier

    def authenticate(self, inp: CheckInput, may_refetch: bool) -> Identity | NeedKeys:
        """Establish the end-user identity of `inp`."""
        s = self._s
        raw, source = extract_token(s.sources, inp.headers) if s.sources else (None, None)
        if raw is None:
            if s.require_jwt_enforced:
                return Identity(failure="missing token")
            if s.require_jwt_audit:
                return Identity(failure="missing token", enforced=False)
            return Identity()
        key = TokenCache.key(raw)
        token = self._cache.get(key)
        if token is None:
            try:
                token = self._verify(parse(raw, s.config.max_token_bytes), s.issuers, self._keys.keys_of,
                                     self._clock())
            except UnknownKey as e:
                if not self._keys.loaded(e.issuer):
                    return Identity(failure="signing keys not loaded yet", unavailable=True)
                if may_refetch and self._keys.may_refetch(e.issuer):
                    return NeedKeys(e.issuer, e.kid)
                return Identity(failure=e.reason, enforced=s.jwt_enforced)
            except JwtError as e:
                return Identity(failure=e.reason, enforced=s.jwt_enforced)
            self._cache.put(key, token)
        if is_revoked(s.config.revocations, token):
            return Identity(token=None, failure="token revoked", revoked=True)
        if source is not None and source.cookie in s.token_cookies_to_strip:
            return Identity(token=token, cookie=source.cookie)
        return Identity(token=token)


class PolicyAuthorizer:
    """Evaluates the compiled rules."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._policies = snapshot.policies

    def authorize(self, inp: CheckInput, identity: Identity) -> AuthzResult:
        """Evaluate the compiled policies for this request; a default deny says which condition failed."""
        result = self._policies.evaluate(inp, identity.token)
        if not result.allowed and not result.rule:
            hint = self._policies.near_miss(inp, identity.token)
            if hint:
                return AuthzResult(False, result.policy, "", f"{result.reason} ({hint})", result.would_deny)
        return result


def decision_ids() -> Callable[[], str]:
    """A cheap unique id source: a random per-process prefix and a counter."""
    prefix = os.urandom(6).hex()
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter):010x}"


class Pipeline:
    """One workload's decision pipeline for one config snapshot."""

    def __init__(self, snapshot: Snapshot, keys: KeyStore, cache: TokenCache, *, clock: Callable[[], float],
                 ids: Callable[[], str], audit: AuditSink, observer: DecisionObserver,
                 authenticator: Authenticator | None = None, authorizer: Authorizer | None = None,
                 unavailable: str | None = None) -> None:
        self.snapshot = snapshot
        # Set while the agent has no config of its own yet: every decision is 503 with this reason.
        self._unavailable = unavailable
        self._keys = keys
        self._ids = ids
        self._audit = audit
        self._observer = observer
        self._clock = clock
        self._authn = authenticator or JwtAuthenticator(snapshot, keys, cache, clock)
        self._authz = authorizer or PolicyAuthorizer(snapshot)
        self._workload = snapshot.config.workload
        self._remove_without_token = [*snapshot.owned_headers, *snapshot.token_headers_to_strip]
        self._wire_without_token: dict[str, bytes] = {}

    def decide_now(self, inp: CheckInput, transport: str) -> Decision | NeedKeys:
        """Decide without I/O, or return NeedKeys when a key refetch could change the answer."""
        t0 = time.perf_counter()
        try:
            if self._unavailable is not None:
                return self._finish(inp, transport, t0, Identity(), self._deny(Outcome.UNAVAILABLE, self._unavailable))
            if not path_is_safe(inp.path):
                return self._finish(inp, transport, t0, Identity(), self._deny(
                    Outcome.FORBIDDEN, "path is not normalized"))
            identity = self._authn.authenticate(inp, True)
            if isinstance(identity, NeedKeys):
                return identity
            return self._finish(inp, transport, t0, identity, None)
        except Exception:
            log.exception("decision failed; denying")
            return self._finish(inp, transport, t0, Identity(), self._deny(Outcome.UNAVAILABLE, "internal error"))

    async def decide(self, inp: CheckInput, transport: str) -> Decision:
        """Decide, waiting for a key refetch when the token names an unknown key."""
        first = self.decide_now(inp, transport)
        if isinstance(first, Decision):
            return first
        t0 = time.perf_counter()
        try:
            await self._keys.refetch_for_unknown_kid(first.issuer, first.kid)
            identity = self._authn.authenticate(inp, False)
            assert isinstance(identity, Identity)
            return self._finish(inp, transport, t0, identity, None)
        except Exception:
            log.exception("decision failed; denying")
            return self._finish(inp, transport, t0, Identity(), self._deny(Outcome.UNAVAILABLE, "internal error"))

    def _deny(self, outcome: Outcome, reason: str, policy: str = "", rule: str = "") -> Decision:
        return Decision(outcome, self._ids(), reason, policy, rule)

    def _respond(self, inp: CheckInput, identity: Identity) -> Decision:
        """Response phase: turn identity and authorization into a decision with headers."""
        if identity.unavailable:
            return self._deny(Outcome.UNAVAILABLE, identity.failure or "unavailable")
        if identity.failure and (identity.enforced or identity.revoked):
            d = self._deny(Outcome.UNAUTHENTICATED, identity.failure)
            if identity.failure == "missing token":
                d.deny_headers.append(("www-authenticate", f'Bearer realm="{REALM}"'))
            else:
                d.deny_headers.append(("www-authenticate", f'Bearer realm="{REALM}", error="invalid_token", '
                                                           f'error_description="{identity.failure}"'))
            return d
        authz = self._authz.authorize(inp, identity)
        token = identity.token
        if not authz.allowed:
            d = self._deny(Outcome.FORBIDDEN, authz.reason, authz.policy, authz.rule)
            d.subject_hash = self._memo(token)[2] if token else ""
            return d
        wire: dict[str, bytes] | None
        if token is not None:
            to_set, to_remove, subject_hash, wire = self._memo(token)
        else:
            to_set, to_remove, subject_hash, wire = [], self._remove_without_token, "", self._wire_without_token
        if identity.cookie:
            # The token came in a cookie: the app gets the other cookies (or none). Per request, so not shared.
            rest = without_cookie(inp.headers.get("cookie", ""), identity.cookie)
            to_set = [*to_set, ("cookie", rest)] if rest else to_set
            to_remove = to_remove if rest else [*to_remove, "cookie"]
            wire = None
        # The header lists are shared by every decision for this token: transports only read them,
        # and serialize them once into `wire`, which lives exactly as long as the lists.
        d = Decision(Outcome.ALLOW, self._ids(), authz.reason, authz.policy, authz.rule, to_set, to_remove,
                     would_deny=authz.would_deny or identity.failure is not None, subject_hash=subject_hash,
                     wire_cache=wire)
        if authz.would_deny:
            d.reason = f"audit: would be denied by {authz.audit_policy}/{authz.audit_rule or 'default deny'}"
            d.would_deny_policy = authz.audit_policy
        elif identity.failure:
            d.reason = f"audit: would be denied ({identity.failure})"
            d.would_deny_policy = self.snapshot.jwt_audit_policy
        return d

    def _memo(self, token: VerifiedToken) -> _TokenMemo:
        """Headers to set and remove, the subject hash and their wire cache, computed once per cached token."""
        m = token.memo
        hit: _TokenMemo | None = m.get("identity")
        if hit is None:
            s = self.snapshot
            subject = f"{token.issuer}/{token.subject}"
            to_set = identity_headers(s.config.identity_headers, token)
            set_names = {h for h, _ in to_set}
            to_remove = [h for h in s.owned_headers if h not in set_names] + list(s.token_headers_to_strip)
            hit = m["identity"] = (to_set, to_remove, hashlib.sha256(subject.encode()).hexdigest()[:16], {})
        return hit

    def _finish(self, inp: CheckInput, transport: str, t0: float, identity: Identity,
                decision: Decision | None) -> Decision:
        if decision is None:
            decision = self._respond(inp, identity)
        elapsed = time.perf_counter() - t0
        self._observer.observe(decision, transport, elapsed)
        self._audit.write(AuditRecord(
            self._clock(), decision.decision_id, self._workload, transport, decision.outcome,
            decision.would_deny, decision.policy, decision.rule, decision.reason, inp.peer or "",
            decision.subject_hash, inp.method, inp.path, inp.request_id, elapsed * 1e6))
        return decision
