"""`meshward explain`: why a request would be allowed or denied, rule by rule.

The decision comes from the same compiled policies the agent runs
(`CompiledPolicies.evaluate`); the per-rule trace evaluates each rule's compiled
parts one by one with the same fixed templates, so it cannot drift from what the
agent does. Identity is taken as given (claims, or a token whose signature explain
does not verify) because explain answers "what if", not "is this token genuine".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshward.sidecar.config.schema import Rule
from meshward.sidecar.domain.jwt import VerifiedToken
from meshward.sidecar.domain.policy import PART_TEMPLATES
from meshward.sidecar.domain.request import CheckInput
from meshward.sidecar.domain.snapshot import Snapshot, is_revoked

# Which rule field a compiled part checks (the inverse of policy.PART_TEMPLATES).
_FIELDS = {template: name for name, template in PART_TEMPLATES.items()}


@dataclass(frozen=True)
class RuleTrace:
    """How one rule fared."""

    policy: str
    rule: str
    action: str
    mode: str
    matched: bool
    why: str


@dataclass(frozen=True)
class Explanation:
    """The decision and the trace that led to it."""

    status: int
    outcome: str
    policy: str
    rule: str
    reason: str
    rules: list[RuleTrace]


def _configured(rule: Rule, field_name: str) -> Any:
    f, t = rule.from_, rule.to
    return {"from.principals": f.principals, "from.requestPrincipals": f.request_principals,
            "from.namespaces": f.namespaces, "to.methods": t.methods, "to.paths": t.paths, "to.hosts": t.hosts,
            "to.ports": t.ports, "when": rule.when}[field_name]


def _actual(inp: CheckInput, token: VerifiedToken | None, field_name: str) -> Any:
    return {"from.principals": inp.peer, "from.requestPrincipals": f"{token.issuer}/{token.subject}" if token else None,
            "from.namespaces": inp.peer_namespace, "to.methods": inp.method, "to.paths": inp.path,
            "to.hosts": inp.host, "to.ports": inp.port, "when": "false (or could not be evaluated)"}[field_name]


def explain(snapshot: Snapshot, inp: CheckInput, token: VerifiedToken | None) -> Explanation:
    """Decide `inp` as the agent would (identity taken as given) and trace every rule."""
    rules_by_name = {(p.name, r.name): r for p in snapshot.config.policies for r in p.rules}
    modes = {p.name: p.mode for p in snapshot.config.policies}
    traces = []
    for cr in [*snapshot.policies.deny, *snapshot.policies.allow]:
        why = "matched"
        for template, const in cr.parts:
            ok = eval(template.format(c="c"), {"c": const, "inp": inp, "token": token})  # noqa: S307 - fixed templates
            if not ok:
                name = _FIELDS[template]
                cfg = _configured(rules_by_name[(cr.policy, cr.name)], name)
                why = f"{name}: {_actual(inp, token, name)!r} does not match {list(cfg)}"
                break
        rule = rules_by_name[(cr.policy, cr.name)]
        traces.append(RuleTrace(cr.policy, cr.name, "Deny" if cr.deny else "Allow",
                                rule.mode if modes[cr.policy] == "Enforce" else "Audit", why == "matched", why))
    if token is not None and token.issuer not in snapshot.issuers and snapshot.issuers:
        return Explanation(401, "unauthenticated", "", "", f"issuer {token.issuer} is not trusted here", traces)
    if token is not None and is_revoked(snapshot.config.revocations, token):
        return Explanation(401, "unauthenticated", "", "", "token revoked", traces)
    if token is None and snapshot.require_jwt_enforced:
        return Explanation(401, "unauthenticated", "", "", "missing token (a policy requires a JWT)", traces)
    result = snapshot.policies.evaluate(inp, token)
    status = 200 if result.allowed else 403
    reason = result.reason + (f" (Audit rule {result.audit_policy}/{result.audit_rule} would deny)"
                              if result.would_deny else "")
    return Explanation(status, "allow" if result.allowed else "forbidden", result.policy, result.rule, reason, traces)


def render(e: Explanation) -> str:
    """The explanation as text for a terminal."""
    head = f"decision: {e.outcome.upper()} ({e.status})"
    if e.rule:
        head += f" by {e.policy} rule {e.rule}"
    lines = [head, f"reason: {e.reason}"]
    if not e.rules:
        lines.append("no rules: no policy selects this workload")
    for t in e.rules:
        mark = "→" if (t.policy, t.rule) == (e.policy, e.rule) else ("✓" if t.matched else "✗")
        lines.append(f"  {mark} {t.policy} / {t.rule} [{t.action}, {t.mode}]: {t.why}")
    return "\n".join(lines)
