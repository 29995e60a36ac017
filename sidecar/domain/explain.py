"""`meshward explain`: the per-rule trace of a decision, and how it is shown.

The decision itself comes from the agent's own pipeline (engines/explain.py runs it);
this module only traces each compiled rule part by part with the same fixed templates
the agent compiles them from (policy.PART_TEMPLATES), so the trace cannot drift from
what the agent evaluates, and renders both for a terminal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshward.sidecar.config.schema import Rule
from meshward.sidecar.domain.jwt import VerifiedToken
from meshward.sidecar.domain.policy import L4_WRAP, NOT_L4, PART_TEMPLATES
from meshward.sidecar.domain.request import CheckInput
from meshward.sidecar.domain.snapshot import Snapshot

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
    would_deny: bool = False
    notes: tuple[str, ...] = ()


def _configured(rule: Rule, field_name: str) -> Any:
    f, t = rule.from_, rule.to
    return {"from.principals": f.principals, "from.requestPrincipals": f.request_principals,
            "from.namespaces": f.namespaces, "to.methods": t.methods, "to.paths": t.paths, "to.hosts": t.hosts,
            "to.ports": t.ports, "when": rule.when}[field_name]


def _actual(inp: CheckInput, token: VerifiedToken | None, field_name: str) -> Any:
    return {"from.principals": inp.peer, "from.requestPrincipals": f"{token.issuer}/{token.subject}" if token else None,
            "from.namespaces": inp.peer_namespace, "to.methods": inp.method, "to.paths": inp.path,
            "to.hosts": inp.host, "to.ports": inp.port, "when": "false (or could not be evaluated)"}[field_name]


def trace(snapshot: Snapshot, inp: CheckInput, token: VerifiedToken | None) -> list[RuleTrace]:
    """Every rule of the workload's config, Deny rules first as the agent checks them, and whether it matched."""
    rules_by_name = {(p.name, r.name): r for p in snapshot.config.policies for r in p.rules}
    modes = {p.name: p.mode for p in snapshot.config.policies}
    traces = []
    for cr in [*snapshot.policies.deny, *snapshot.policies.allow]:
        why = "matched"
        for template, const in cr.parts:
            ok = eval(template.format(c="c"), {"c": const, "inp": inp, "token": token})  # noqa: S307 - fixed templates
            if not ok and template == NOT_L4:
                fields = ", ".join(n for t, _ in cr.parts if (n := _FIELDS.get(t)) in cr.http_only)
                why = f"a TCP connection: an Allow rule with HTTP-only conditions ({fields}) never matches one"
                break
            if not ok:
                name = _FIELDS[template.removeprefix(L4_WRAP).removesuffix(")") if template.startswith(L4_WRAP)
                               else template]
                cfg = _configured(rules_by_name[(cr.policy, cr.name)], name)
                why = f"{name}: {_actual(inp, token, name)!r} does not match {list(cfg)}"
                break
        rule = rules_by_name[(cr.policy, cr.name)]
        traces.append(RuleTrace(cr.policy, cr.name, "Deny" if cr.deny else "Allow",
                                rule.mode if modes[cr.policy] == "Enforce" else "Audit", why == "matched", why))
    return traces


def render(e: Explanation) -> str:
    """The explanation as text for a terminal."""
    head = f"decision: {e.outcome.upper()} ({e.status})"
    if e.rule:
        head += f" by {e.policy} rule {e.rule}"
    lines = [*(f"note: {n}" for n in e.notes), head, f"reason: {e.reason}"]
    if not e.rules:
        lines.append("no rules: no policy selects this workload")
    for t in e.rules:
        mark = "→" if (t.policy, t.rule) == (e.policy, e.rule) else ("✓" if t.matched else "✗")
        lines.append(f"  {mark} {t.policy} / {t.rule} [{t.action}, {t.mode}]: {t.why}")
    return "\n".join(lines)
