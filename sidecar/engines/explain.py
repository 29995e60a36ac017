"""`meshward explain` decides with the agent's own pipeline: identity → authorization → response.

Why: an explanation that re-implements any phase drifts from enforcement (it once said 401
where the agent allowed an Audit-mode request). So explain builds the very `Pipeline` the
agent runs, with one injection point changed: the identity phase's verifier skips the
signature check (domain.jwt.verify_unsigned), because explain answers "what would happen
to a genuine token with these claims", and it has no keys to fetch. Everything else —
token sources, issuer, audience, type, lifetime and skew checks, Audit-mode handling,
revocations, rules, the response — is the agent's code path.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from meshward.sidecar.domain.decision import AuditRecord, Decision
from meshward.sidecar.domain.explain import Explanation, trace
from meshward.sidecar.domain.jwt import JwtError, VerifiedToken, parse, verify_unsigned
from meshward.sidecar.domain.request import CheckInput
from meshward.sidecar.domain.snapshot import Snapshot, extract_token
from meshward.sidecar.engines.keystore import KeyStore
from meshward.sidecar.engines.observe import Metrics
from meshward.sidecar.engines.pipeline import JwtAuthenticator, Pipeline, decision_ids
from meshward.sidecar.engines.token_cache import TokenCache


class _NoKeys:
    """Explain never fetches keys: it does not verify signatures."""

    async def get(self, url: str, *, ca_file: str | None, timeout: float) -> bytes:
        raise OSError("explain fetches no keys")


class _Keep:
    """An audit sink that keeps the decision's record."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    def write(self, r: AuditRecord) -> None:
        self.records.append(r)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(claims: Mapping[str, Any], snapshot: Snapshot, now: float) -> tuple[str, list[str]]:
    """A compact JWT carrying `claims`, and notes saying what was added.

    What a genuine token of its issuer would also carry is filled in: an allowed `alg`, `aud`, `iat`, `exp`.
    """
    body = dict(claims)
    notes = []
    issuer = snapshot.issuers.get(str(body.get("iss", "")))
    alg = sorted(issuer.algorithms)[0] if issuer else "RS256"
    if "aud" not in body and issuer is not None:
        body["aud"] = issuer.audiences[0]
        notes.append(f"claims have no aud: explain used {issuer.audiences[0]!r}")
    if "iat" not in body:
        body["iat"] = int(now)
    if "exp" not in body:
        body["exp"] = int(now) + 300
        notes.append("claims have no exp: explain used 5 minutes from now")
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(body).encode())}.{_b64(b'unsigned')}", notes


def _with_token(inp: CheckInput, raw: str, snapshot: Snapshot) -> CheckInput:
    """`inp` carrying `raw` where the workload reads tokens (its first configured source)."""
    headers = dict(inp.headers)
    source = snapshot.sources[0] if snapshot.sources else None
    if source is not None and source.cookie is not None:
        headers["cookie"] = f"{source.cookie}={raw}"
    elif source is not None and source.header is not None:
        headers[source.header] = f"{source.prefix}{raw}"
    else:
        headers["authorization"] = f"Bearer {raw}"
    return CheckInput(inp.method, inp.path, inp.host, headers, inp.peer, inp.request_id, inp.port)


def explain(snapshot: Snapshot, inp: CheckInput, *, token: str | None = None,
            claims: Mapping[str, Any] | None = None, clock: Callable[[], float] = time.time) -> Explanation:
    """Decide `inp` (with an end-user token, or claims made into one) as the agent would, and trace every rule."""
    notes: list[str] = []
    raw = token
    if claims is not None:
        raw, notes = unsigned_token(claims, snapshot, clock())
    if raw is not None:
        inp = _with_token(inp, raw, snapshot)
    keys = KeyStore(snapshot.issuers, snapshot.config.jwks, _NoKeys(), clock)
    cache = TokenCache(16, clock, keys.generation)
    audit = _Keep()
    pipeline = Pipeline(snapshot, keys, cache, clock=clock, ids=decision_ids(), audit=audit,
                        observer=Metrics(CollectorRegistry()),
                        authenticator=JwtAuthenticator(snapshot, keys, cache, clock, verify_unsigned))
    decision = pipeline.decide_now(inp, "explain")
    assert isinstance(decision, Decision)  # no I/O: the unsigned verifier never asks for keys
    verified = _token_for_trace(snapshot, inp, clock())
    return Explanation(decision.wire.http, decision.outcome.value, decision.policy, decision.rule, decision.reason,
                       trace(snapshot, inp, verified), decision.would_deny, tuple(notes))


def _token_for_trace(snapshot: Snapshot, inp: CheckInput, now: float) -> VerifiedToken | None:
    """The end-user identity the rules saw, for the per-rule trace (None without an acceptable token)."""
    raw, _ = extract_token(snapshot.sources, inp.headers) if snapshot.sources else (None, None)
    if raw is None:
        return None
    try:
        return verify_unsigned(parse(raw, snapshot.config.max_token_bytes), snapshot.issuers, None, now)
    except JwtError:
        return None
