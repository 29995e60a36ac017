"""The decision pipeline: identity → authorization → response, shared by both transports.

Why phases: each is a small object behind a Protocol, testable on its own, and the
mapping of outcomes to wire codes lives in one table (domain.decision.WIRE).
The common case is synchronous (`decide_now`): a cached or verifiable token, a
dict lookup for keys, precompiled rules. Only a token with an unknown `kid`
needs I/O; `decide_now` then returns `NeedKeys` and the transport awaits `decide`,
which waits on the key store's single in-flight refetch.

Errors deny: any exception inside a phase becomes UNAVAILABLE (503), never allow.

Context tokens (docs/context-tokens.md): inbound, a context token from the mTLS peer stands
for the end user exactly as a verified JWT would; on an allow with a user, the app gets a
context token minted for itself. Outbound (`exchange`), the app's token is verified and
exchanged for one scoped to the destination.
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
from meshward.sidecar.domain.context import (
    WIRE_HEADER,
    ContextError,
    ContextToken,
    audience_for,
    context_headers,
    minimized,
)
from meshward.sidecar.domain.decision import AuditRecord, Decision, Outcome
from meshward.sidecar.domain.jwt import JwtError, ParsedToken, UnknownKey, VerifiedToken, parse, verify
from meshward.sidecar.domain.policy import AuthzResult, identity_headers, path_is_safe
from meshward.sidecar.domain.request import CheckInput
from meshward.sidecar.domain.snapshot import Snapshot, extract_token, is_revoked, without_cookies
from meshward.sidecar.engines.context import ContextService
from meshward.sidecar.engines.keystore import KeyStore
from meshward.sidecar.engines.token_cache import TokenCache

log = logging.getLogger("meshward.sidecar.pipeline")

REALM = "meshward"
# Per cached token: headers to set, headers to remove, subject hash, the transports' wire cache, and until when
# they may be reused (the context token among the headers is re-minted at half its life).
_TokenMemo = tuple[list[tuple[str, str]], list[str], str, dict[str, bytes], float]


@dataclass(slots=True)
class Identity:
    """The identity phase's result."""

    token: VerifiedToken | None = None
    failure: str | None = None
    enforced: bool = True
    unavailable: bool = False
    revoked: bool = False
    # The context token the user came in, when it came in one (not a JWT).
    context: ContextToken | None = None
    # The cache key of the raw credential (JWT or context token) the user came in.
    source_key: bytes = b""


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
        """Establish the end-user identity of `inp` (none for a TCP connection: no token, `requireJwt` is HTTP's)."""
        if inp.l4:
            return Identity()
        s = self._s
        raw, _ = extract_token(s.sources, inp.headers) if s.sources else (None, None)
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
        return Identity(token=token, source_key=key)


class ContextAuthenticator:
    """A context token from the mTLS peer, when the request carries one; otherwise the end-user JWT."""

    def __init__(self, snapshot: Snapshot, service: ContextService, jwt: Authenticator) -> None:
        self._s = snapshot
        self._service = service
        self._jwt = jwt

    def authenticate(self, inp: CheckInput, may_refetch: bool) -> Identity | NeedKeys:
        """The user of the context token in the wire header, or the JWT phase's answer without one."""
        raw = inp.headers.get(WIRE_HEADER)
        me = self._service.keys.spiffe_id
        if raw is None or me is None:
            return self._jwt.authenticate(inp, may_refetch)
        key = TokenCache.key(raw)
        try:
            ctx, memo = self._service.verify(raw, key, inp.peer, me, namespace_ok=True)
        except ContextError as e:
            return Identity(failure=e.reason)
        issuers = self._s.issuers
        if issuers and ctx.user_issuer not in issuers:
            return Identity(failure="context token: the end user's issuer is not one this workload trusts")
        token: VerifiedToken | None = memo.get("user")
        if token is None:
            token = memo["user"] = VerifiedToken(ctx.user_issuer, {**ctx.claims, "iss": ctx.user_issuer},
                                                 ctx.expires_at, ctx.subject, ctx.act)
        if is_revoked(self._s.config.revocations, token):
            return Identity(token=None, failure="token revoked", revoked=True)
        return Identity(token=token, context=ctx, source_key=key)


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
                 unavailable: str | None = None, context: ContextService | None = None) -> None:
        self.snapshot = snapshot
        # Set while the agent has no config of its own yet: every decision is 503 with this reason.
        self._unavailable = unavailable
        self._keys = keys
        self._ids = ids
        self._audit = audit
        self._observer = observer
        self._clock = clock
        self._context = context
        authn = authenticator or JwtAuthenticator(snapshot, keys, cache, clock)
        self._authn = ContextAuthenticator(snapshot, context, authn) if context is not None else authn
        self._authz = authorizer or PolicyAuthorizer(snapshot)
        self._workload = snapshot.config.workload
        settings = snapshot.config.context
        # The app's context header and the wire header are Meshward's: a client's copy never reaches the app.
        self._context_headers = context_headers(settings.header)
        self._remove_without_token = [*snapshot.owned_headers, *snapshot.token_headers_to_strip,
                                      *self._context_headers]
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
            d.subject_hash = self._subject_hash(token) if token else ""
            return d
        wire: dict[str, bytes] | None
        decision_id = self._ids()
        if token is not None:
            to_set, to_remove, subject_hash, wire, _ = self._memo(token, identity, decision_id)
        else:
            to_set, to_remove, subject_hash, wire = [], self._remove_without_token, "", self._wire_without_token
        cookies = self.snapshot.token_cookies_to_strip
        sent = inp.headers.get("cookie") if cookies else None
        rest = without_cookies(sent, cookies) if sent else None
        if rest is not None:
            # Every configured token cookie is cut out, whichever source carried this request's token (a token in
            # `authorization` next to a cookie with another user's token) or none: the app gets the other cookies
            # (or none). Per request, so not shared.
            to_set = [*to_set, ("cookie", rest)] if rest else to_set
            to_remove = to_remove if rest else [*to_remove, "cookie"]
            wire = None
        # The header lists are shared by every decision for this token: transports only read them,
        # and serialize them once into `wire`, which lives exactly as long as the lists.
        d = Decision(Outcome.ALLOW, decision_id, authz.reason, authz.policy, authz.rule, to_set, to_remove,
                     would_deny=authz.would_deny or identity.failure is not None, subject_hash=subject_hash,
                     wire_cache=wire)
        if authz.would_deny:
            d.reason = f"audit: would be denied by {authz.audit_policy}/{authz.audit_rule or 'default deny'}"
            d.would_deny_policy = authz.audit_policy
        elif identity.failure:
            d.reason = f"audit: would be denied ({identity.failure})"
            d.would_deny_policy = self.snapshot.jwt_audit_policy
        return d

    @staticmethod
    def _subject_hash(token: VerifiedToken) -> str:
        """SHA-256 (truncated) of `iss/sub`, once per cached token."""
        h: str | None = token.memo.get("subject_hash")
        if h is None:
            h = token.memo["subject_hash"] = hashlib.sha256(f"{token.issuer}/{token.subject}".encode()).hexdigest()[:16]
        return h

    def _memo(self, token: VerifiedToken, identity: Identity, decision_id: str) -> _TokenMemo:
        """Headers to set and remove, the subject hash and their wire cache, computed once per cached token.

        With a minting key they include the app's context token, minted by decision `decision_id` and reused
        for half its life.
        """
        m = token.memo
        hit: _TokenMemo | None = m.get("identity")
        if hit is None or hit[4] <= self._clock():
            s = self.snapshot
            to_set = identity_headers(s.config.identity_headers, token)
            # Without a minting key (no certificate yet) the headers are recomputed next time, to mint then.
            refresh_at = float("inf") if self._context is None else self._clock()
            minted = self._app_token(token, identity, decision_id)
            if minted is not None:
                to_set = [*to_set, (s.config.context.header, minted[0])]
                refresh_at = minted[1]
            set_names = {h for h, _ in to_set}
            to_remove = [h for h in (*s.owned_headers, *self._context_headers) if h not in set_names] + \
                list(s.token_headers_to_strip)
            hit = m["identity"] = (to_set, to_remove, self._subject_hash(token), {}, refresh_at)
        return hit

    def _app_token(self, token: VerifiedToken, identity: Identity, decision_id: str) -> tuple[str, float] | None:
        """The context token for this workload's own app, and when to mint it again; None without a key."""
        service = self._context
        me = service.keys.spiffe_id if service is not None else None
        if service is None or me is None:
            return None
        settings = self.snapshot.config.context
        ctx = identity.context
        minted = service.mint(identity.source_key, me, token.issuer, minimized(token.claims, settings.claims),
                              ctx.act if ctx else (), decision_id, settings.ttl_s,
                              ctx.expires_at if ctx else token.expires_at, ctx.proofs if ctx else ())
        return (minted.token, minted.refresh_at) if minted is not None else None

    def exchange(self, inp: CheckInput, transport: str) -> Decision:
        """Outbound: verify the app's context token and exchange it for one scoped to `inp.destination`.

        `inp.destination` lists the identities that may answer (comma-separated, as Envoy's outbound chain names
        them): the token's audience is the one exact identity, or their namespace's `.../sa/*`
        (`domain.context.audience_for`), and its claims the union of what each identity's policies reference
        (`spec.context.destinations` by identity, another namespace's by its `.../sa/*`). Without the app's
        header, or with no single audience, the call carries no user (the header names are removed); a token
        that does not verify (expired, not this workload's) is refused with 401, so the app learns why.
        """
        t0 = time.perf_counter()
        destination = inp.destination or ""
        identities = destination.split(",")
        audience = audience_for(identities) if destination else None
        settings = self.snapshot.config.context
        service = self._context
        raw = inp.headers.get(settings.header)
        me = service.keys.spiffe_id if service is not None else None
        identity = Identity()
        try:
            if raw is None or service is None or me is None or audience is None:
                d = Decision(Outcome.ALLOW, self._ids(), "no user context" if audience or raw is None else
                             "no single audience for the destination: no user context", headers_to_remove=[
                                 *self._context_headers])
            else:
                key = TokenCache.key(raw)
                ctx, _ = service.verify(raw, key, me, me)
                identity = Identity(context=ctx)
                did = self._ids()
                wanted = {c for i in identities for c in settings.destinations.get(i, ())}
                # Cached per (source, destination as Envoy names it): the destination fixes audience and claims.
                minted = service.mint(key + destination.encode(), audience, ctx.user_issuer,
                                      minimized(ctx.claims, wanted), (me, *ctx.act), did, settings.ttl_s,
                                      ctx.expires_at, ctx.proofs)
                if minted is None:
                    d = self._deny(Outcome.UNAVAILABLE, "no workload certificate to sign the context with")
                else:
                    d = Decision(Outcome.ALLOW, did, "context exchanged", headers_to_set=[(WIRE_HEADER, minted.token)],
                                 headers_to_remove=[h for h in self._context_headers if h != WIRE_HEADER])
        except ContextError as e:
            d = self._deny(Outcome.UNAUTHENTICATED, e.reason)
        except Exception:
            log.exception("context exchange failed; denying")
            d = self._deny(Outcome.UNAVAILABLE, "internal error")
        return self._finish(inp, transport, t0, identity, d)

    def _finish(self, inp: CheckInput, transport: str, t0: float, identity: Identity,
                decision: Decision | None) -> Decision:
        if decision is None:
            decision = self._respond(inp, identity)
        elapsed = time.perf_counter() - t0
        self._observer.observe(decision, transport, elapsed)
        ctx = identity.context
        self._audit.write(AuditRecord(
            self._clock(), decision.decision_id, self._workload, transport, decision.outcome,
            decision.would_deny, decision.policy, decision.rule, decision.reason, inp.peer or "",
            decision.subject_hash, inp.method, inp.path, inp.request_id, elapsed * 1e6,
            ctx.jti if ctx else "", ",".join(ctx.act) if ctx else "", inp.destination or "",
            inp.port if inp.l4 else None))
        return decision
