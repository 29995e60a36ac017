"""AuthPolicies (and Revocations) compiled into per-workload sidecar configs, as pure functions.

Why pure and why here: what each workload enforces must follow from the objects a
user applied by rules anyone can read and test:
- a policy selects the pods of its namespace whose labels match `spec.selector`
  (or all opted-in pods with `spec.namespaceWide`);
- every selecting policy goes into the workload's config; deny rules win over allow
  rules and modes stay per policy/rule, exactly as the agent evaluates them;
- one issuer has one definition per workload: when two policies define the same
  issuer differently, the oldest policy's definition is used by both and the other
  policy reports `IssuerConflict` (its rules and token requirement still apply, so a
  conflict never opens access);
- unexpired Revocation entries go into every workload's config, hashed (a sidecar learns
  which tokens to refuse, not whom they name); a subject revoked for one issuer only
  reaches workloads that trust that issuer;
- a workload's config holds only what that workload needs: its own namespace's policies,
  and for context minimization the claim lists of identities in its own namespace and, by
  namespace only (`spiffe://<td>/ns/<ns>/sa/*`, no ServiceAccount), the claim names each
  other namespace's policies reference (issue 19: a user crosses namespaces minimized to
  them). What another namespace applies reaches it only as claim names, bounded per
  namespace and in total (`namespace_claims`), and left out first when the config would be
  too large, so it can never make it fail (docs/security.md).
Validation runs the sidecar's own parser and compiler on the translated policy, so a
policy the operator accepts is a policy every agent accepts (CEL, globs, URLs).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshward.operator.domain.destinations import tcp_ports_of, uncaptured_app_ports
from meshward.operator.domain.duration import parse_duration
from meshward.sidecar.config.schema import API_VERSION as SIDECAR_API_VERSION
from meshward.sidecar.config.schema import KIND as SIDECAR_KIND
from meshward.sidecar.config.schema import ConfigError, hashed_revocation, parse_config
from meshward.sidecar.domain.policy import HTTP_ONLY, http_only_fields
from meshward.sidecar.domain.snapshot import compile_snapshot

# What one namespace's claim-name union may take of every other namespace's configs (compact JSON of the list).
# Claim names are short ("tenant", "groups"): 4 KiB is a few hundred of them, more than any namespace's policies
# use; a namespace over it is left out (its workloads then receive users with `sub` only, which its policies
# needing more refuse: failing closed for that namespace alone).
MAX_NAMESPACE_CLAIMS_BYTES = 4 * 1024
# What all other namespaces' claim names may take of one config together, keys included: with the per-namespace
# bound, at least 64 namespaces at their cap, thousands at a usual few names; the largest are left out first.
# Well under the hub's MAX_CONFIG_BYTES (3 MiB), and dropped whole when a config would exceed it.
MAX_FOREIGN_CLAIMS_BYTES = 256 * 1024
# Claims a CEL condition reads: claims.name or claims['name'].
_CEL_CLAIM = re.compile(r"""\bclaims(?:\.([A-Za-z_][A-Za-z0-9_]*)|\[\s*['"]([^'"]+)['"]\s*\])""")


class PolicyInvalid(ValueError):
    """A policy cannot be compiled; `field` is the path in the AuthPolicy, the message says how to fix it."""

    def __init__(self, field_path: str, problem: str) -> None:
        super().__init__(f"{field_path}: {problem}")
        self.field = field_path


@dataclass(frozen=True)
class PolicyObject:
    """An AuthPolicy as the compiler needs it."""

    namespace: str
    name: str
    generation: int
    created: str
    spec: Mapping[str, Any]

    @property
    def key(self) -> str:
        """`namespace/name`."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class RevocationEntry:
    """One revoked token (`jti`), subject (`sub`, optionally `<iss>/<sub>`) or session (`sid`)."""

    kind: str
    value: str
    expires_at: dt.datetime
    # For `<iss>/<sub>`: the issuer (without a trailing slash), whose workloads alone need the entry.
    issuer: str | None = None


@dataclass(frozen=True)
class Workload:
    """An opted-in pod: where it runs, as whom, with which labels."""

    namespace: str
    pod: str
    service_account: str
    labels: Mapping[str, str] = field(default_factory=dict)
    uid: str = ""
    # Declared container ports excluded from capture: plaintext reaches the app there, outside every policy.
    uncaptured_ports: tuple[int, ...] = ()
    # Ports declared TCP (meshward.io/tcp-ports): connections there are decided by L4 rules only.
    tcp_ports: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        """`namespace/pod`."""
        return f"{self.namespace}/{self.pod}"


@dataclass(frozen=True)
class Compiled:
    """A workload's config document, its version, and what it contains."""

    document: dict[str, Any]
    version: str
    policies: dict[str, int]
    conflicts: dict[str, str]
    size: int = 0


def _seconds(text: str) -> float:
    return parse_duration(text).total_seconds()


def _issuer(doc: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"issuer": doc["issuer"], "audiences": list(doc["audiences"])}
    for k in ("jwksUri", "jwks", "algorithms", "fromHeaders", "fromCookies", "forwardOriginalToken", "tokenTypes"):
        if k in doc:
            out[k] = doc[k]
    if "clockSkew" in doc:
        out["clockSkewSeconds"] = _seconds(doc["clockSkew"])
    if "maxTokenLifetime" in doc:
        out["maxLifetimeSeconds"] = _seconds(doc["maxTokenLifetime"])
    return out


def to_sidecar_policy(p: PolicyObject) -> dict[str, Any]:
    """Translate one AuthPolicy spec into the sidecar config's policy shape."""
    spec = p.spec
    out: dict[str, Any] = {"name": p.key, "mode": spec.get("mode", "Enforce"),
                           "rules": [dict(r) for r in spec.get("rules", [])]}
    if spec.get("jwt"):
        out["jwt"] = [_issuer(i) for i in spec["jwt"]]
    if "requireJwt" in spec:
        out["requireJwt"] = bool(spec["requireJwt"])
    return out


def _field_of(config_path: str) -> str:
    """Map a sidecar config error path (policies[0].rules[1].when[0]) to the AuthPolicy field."""
    path = config_path.removeprefix("policies[0]").lstrip(".")
    path = path.replace("clockSkewSeconds", "clockSkew").replace("maxLifetimeSeconds", "maxTokenLifetime")
    return f"spec.{path}" if path else "spec"


def validate(p: PolicyObject) -> None:
    """Check what the CRD schema cannot (CEL compiles, globs, issuers, selector); raise PolicyInvalid."""
    spec = p.spec
    selector = spec.get("selector") or {}
    if not spec.get("namespaceWide") and not (selector.get("matchLabels") or selector.get("matchExpressions")):
        raise PolicyInvalid("spec.selector", "must select workloads with matchLabels or matchExpressions; set "
                                             "spec.namespaceWide: true to protect the whole namespace")
    for n, req in enumerate(selector.get("matchExpressions") or []):
        op, values = req.get("operator"), req.get("values") or []
        if op in ("In", "NotIn") and not values:
            raise PolicyInvalid(f"spec.selector.matchExpressions[{n}].values", f"{op} needs at least one value")
        if op in ("Exists", "DoesNotExist") and values:
            raise PolicyInvalid(f"spec.selector.matchExpressions[{n}].values", f"must be empty with {op}")
    doc = {"apiVersion": SIDECAR_API_VERSION, "kind": SIDECAR_KIND, "workload": p.key,
           "policies": [to_sidecar_policy(p)]}
    try:
        compile_snapshot(parse_config(doc))
    except ConfigError as e:
        raise PolicyInvalid(_field_of(e.path), str(e).removeprefix(f"{e.path}: ")) from e


def selects(spec: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether a policy's selector matches a pod's labels (metav1.LabelSelector semantics)."""
    if spec.get("namespaceWide"):
        return True
    selector = spec.get("selector") or {}
    match = selector.get("matchLabels") or {}
    exprs = selector.get("matchExpressions") or []
    if not match and not exprs:
        return False  # an empty selector selects nothing (validate() refuses it anyway)
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    for req in exprs:
        key, op, values = req.get("key"), req.get("operator"), set(req.get("values") or [])
        present = key in labels
        if (op == "In" and not (present and labels[key] in values)) or \
                (op == "NotIn" and present and labels[key] in values) or \
                (op == "Exists" and not present) or (op == "DoesNotExist" and present):
            return False
    return True


def revocation_entries(body: Mapping[str, Any]) -> list[RevocationEntry]:
    """The entries of a Revocation object (`sub` with an issuer becomes `<iss>/<sub>`)."""
    out = []
    for e in body.get("spec", {}).get("entries", []):
        when = dt.datetime.fromisoformat(str(e["expiresAt"]).replace("Z", "+00:00"))
        for kind in ("jti", "sub", "sid"):
            if kind in e:
                issuer = str(e["issuer"]).rstrip("/") if kind == "sub" and e.get("issuer") else None
                value = f"{issuer}/{e['sub']}" if issuer else str(e[kind])
                out.append(RevocationEntry(kind, value, when, issuer))
    return out


def policy_object(body: Mapping[str, Any]) -> PolicyObject:
    """An AuthPolicy object as the compiler needs it."""
    meta = body["metadata"]
    return PolicyObject(meta["namespace"], meta["name"], int(meta.get("generation") or 0),
                        str(meta.get("creationTimestamp") or ""), dict(body.get("spec") or {}))


def workload_of(pod: Mapping[str, Any]) -> Workload:
    """The workload a Pod object is."""
    meta = pod["metadata"]
    return Workload(meta["namespace"], meta["name"], pod.get("spec", {}).get("serviceAccountName") or "default",
                    dict(meta.get("labels") or {}), str(meta.get("uid") or ""), uncaptured_app_ports(pod),
                    tcp_ports_of(pod))


def revocation_section(entries: Iterable[RevocationEntry], now: dt.datetime, issuers: Iterable[str]
                       ) -> dict[str, list[str]]:
    """The unexpired entries a workload trusting `issuers` must enforce, hashed (`sha256:<hex>`)."""
    trusted = {i.rstrip("/") for i in issuers}
    out: dict[str, set[str]] = {"jti": set(), "sub": set(), "sid": set()}
    for e in entries:
        if e.expires_at > now and (e.issuer is None or e.issuer in trusted):
            out[e.kind].add(hashed_revocation(e.value))
    return {k: sorted(v) for k, v in out.items()}


def applies_to(entry: RevocationEntry, issuers: Iterable[str]) -> bool:
    """Whether a workload trusting `issuers` must enforce `entry` (its issuer's subjects, or any other entry)."""
    return entry.issuer is None or entry.issuer in {i.rstrip("/") for i in issuers}


def referenced_claims(specs: Iterable[Mapping[str, Any]]) -> list[str]:
    """Claims the policies let through (spec.context.claims) or read (CEL `when`), always with `sub`."""
    out = {"sub"}
    for spec in specs:
        out.update((spec.get("context") or {}).get("claims") or [])
        for rule in spec.get("rules") or []:
            for expr in rule.get("when") or []:
                out.update(a or b for a, b in _CEL_CLAIM.findall(expr))
    return sorted(out)


def destination_claims(workloads: Iterable[Workload], policies: Sequence[PolicyObject],
                       trust_domain: str) -> dict[str, list[str]]:
    """For the identities of `workloads` (one namespace's), the claims their selecting policies reference.

    Only identities that need more than `sub` (the default every context token carries) are listed.
    """
    by_identity: dict[str, list[Mapping[str, Any]]] = {}
    for w in workloads:
        specs = by_identity.setdefault(f"spiffe://{trust_domain}/ns/{w.namespace}/sa/{w.service_account}", [])
        specs += [p.spec for p in policies if p.namespace == w.namespace and selects(p.spec, w.labels)]
    out = {spiffe: referenced_claims(specs) for spiffe, specs in sorted(by_identity.items())}
    return {spiffe: claims for spiffe, claims in out.items() if claims != ["sub"]}


def namespace_audience_of(namespace: str, trust_domain: str) -> str:
    """The audience of a context token for any workload of `namespace` (sidecar/domain/context.py)."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/*"


def claims_of_namespace(workloads: Iterable[Workload], policies: Sequence[PolicyObject], trust_domain: str
                        ) -> list[str]:
    """The claim names the policies selecting any of `workloads` (one namespace's) reference, `sub` included."""
    return sorted({"sub", *(c for claims in destination_claims(workloads, policies, trust_domain).values()
                            for c in claims)})


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")))


def namespace_claims(by_namespace: Mapping[str, list[str]], trust_domain: str,
                     max_namespace_bytes: int = MAX_NAMESPACE_CLAIMS_BYTES,
                     max_total_bytes: int = MAX_FOREIGN_CLAIMS_BYTES) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Each namespace's claim-name union keyed by its namespace audience, bounded; and why any was left out.

    Namespaces needing only `sub` are not listed (every token carries it). A namespace over its share is left
    out; then, while the whole is over its bound, the largest left. Every workload's config gets the same map,
    minus its own namespace (`compile_workload`).
    """
    cut: dict[str, str] = {}
    entries: dict[str, tuple[str, list[str]]] = {}
    for ns, claims in sorted(by_namespace.items()):
        if claims == ["sub"]:
            continue
        size = _json_size(claims)
        if size > max_namespace_bytes:
            cut[ns] = (f"the claim names the AuthPolicies of namespace {ns} reference take {size} bytes, more than "
                       f"the {max_namespace_bytes} other namespaces' configs carry for one namespace: users reach "
                       f"its workloads from other namespaces with `sub` only. Reference fewer claims")
            continue
        entries[ns] = (namespace_audience_of(ns, trust_domain), claims)
    sizes = {ns: _json_size({key: claims}) for ns, (key, claims) in entries.items()}
    total = sum(sizes.values())
    for ns in sorted(sizes, key=lambda n: (-sizes[n], n)):
        if total <= max_total_bytes:
            break
        cut[ns] = (f"other namespaces' claim names would take {total} bytes of every config, more than "
                   f"{max_total_bytes}; namespace {ns}, the largest left ({sizes[ns]} bytes), is left out: users "
                   "reach its workloads from other namespaces with `sub` only")
        total -= sizes[ns]
        del entries[ns]
    return dict(entries.values()), cut


def _context(chosen: Sequence[PolicyObject], destinations: Mapping[str, list[str]]) -> dict[str, Any]:
    ttls = [_seconds((p.spec.get("context") or {}).get("ttl", "30s")) for p in chosen]
    headers = [(p.spec.get("context") or {}).get("header") for p in chosen]
    return {"claims": referenced_claims(p.spec for p in chosen), "ttlSeconds": min(ttls, default=30.0),
            "header": next((h for h in headers if h), "x-meshward-context"),
            "destinations": {k: list(v) for k, v in destinations.items()}}


def compile_workload(w: Workload, policies: Sequence[PolicyObject], revocations: Iterable[RevocationEntry],
                     now: dt.datetime, destinations: Mapping[str, list[str]] | None = None,
                     foreign: Mapping[str, list[str]] | None = None) -> Compiled:
    """The sidecar config for one workload: its selecting policies (oldest first) and the revocation set.

    `destinations` other than the workload's own namespace's exact identities are dropped: a config never
    carries another namespace's ServiceAccounts. `foreign` (`namespace_claims`) adds other namespaces' claim
    names by namespace audience; its entry for the workload's own namespace is dropped (exact identities serve).
    """
    chosen = sorted((p for p in policies if p.namespace == w.namespace and selects(p.spec, w.labels)),
                    key=lambda p: (p.created, p.name))
    first: dict[str, tuple[str, dict[str, Any]]] = {}
    conflicts: dict[str, str] = {}
    docs = []
    for p in chosen:
        d = to_sidecar_policy(p)
        merged = []
        for iss in d.get("jwt", []):
            seen = first.setdefault(iss["issuer"], (p.key, iss))
            if seen[1] != iss:
                conflicts[p.key] = (f"issuer {iss['issuer']} is defined differently by {seen[0]}, whose "
                                    f"definition {w.key} uses; make the definitions identical")
            merged.append(seen[1])  # the oldest definition; the policy keeps requiring a token
        if merged:
            d["jwt"] = merged
        docs.append(d)
    own = f"/ns/{w.namespace}/sa/"
    local = {k: v for k, v in (destinations or {}).items() if own in k and not k.endswith("/sa/*")}
    local.update((k, v) for k, v in (foreign or {}).items() if k.endswith("/sa/*") and own not in k)
    issuers = [i["issuer"] for d in docs for i in d.get("jwt", [])]
    document: dict[str, Any] = {"apiVersion": SIDECAR_API_VERSION, "kind": SIDECAR_KIND, "workload": w.key,
                                "policies": docs, "revocations": revocation_section(revocations, now, issuers),
                                "context": _context(chosen, local)}
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(encoded).hexdigest()[:16]
    document["generation"] = digest
    return Compiled(document, digest, {p.key: p.generation for p in chosen}, conflicts, len(encoded))


def workload_config(w: Workload, policies: Sequence[PolicyObject], revocations: Iterable[RevocationEntry],
                    now: dt.datetime, neighbours: Iterable[Workload], trust_domain: str,
                    destinations: Mapping[str, list[str]] | None = None,
                    foreign: Mapping[str, list[str]] | None = None) -> Compiled:
    """A workload's config exactly as the operator compiles it, from valid policies (see `validate`).

    Its namespace's policies, revocations, the context claims of its namespace's identities (`destinations`,
    when the caller already computed them for the namespace) and other namespaces' (`foreign`, by namespace).
    """
    own = [p for p in policies if p.namespace == w.namespace]
    if destinations is None:
        destinations = destination_claims([n for n in neighbours if n.namespace == w.namespace], own, trust_domain)
    return compile_workload(w, own, revocations, now, destinations, foreign)


def _field(rule: Mapping[str, Any], dotted: str) -> Any:
    """A rule's field by its dotted CRD name (`to.methods`, `when`)."""
    part, _, name = dotted.partition(".")
    return (rule.get(part) or {}).get(name) if name else rule.get(part)


def _http_only(rule: Mapping[str, Any]) -> frozenset[str]:
    """The rule's fields a TCP connection cannot answer, as the agent compiles them (http_only_fields)."""
    when = rule.get("when")
    if not isinstance(when, list) or not all(isinstance(w, str) for w in when):
        return HTTP_ONLY  # not a list of expressions: the spec is refused anyway
    try:
        return http_only_fields(when)
    except ConfigError:
        return HTTP_ONLY  # invalid CEL: the spec is refused anyway; say nothing more about it here


def http_rules_on_tcp_ports(spec: Mapping[str, Any], workloads: Iterable[Workload]) -> list[str]:
    """`rule: namespace/pod:port` for each rule with HTTP-only fields that covers a port a workload declares TCP.

    Such an Allow rule never admits a connection there, and such a Deny rule denies every connection its other
    fields match (Istio's semantics, fail closed): the policy's status says so, as the issue asks, so that
    `to.methods: [GET]` on a database port is not read as "these peers may connect", nor a Deny on DELETE as "these
    peers may not delete". Likewise a policy requiring a JWT: it does not apply to connections there.
    """
    out = []
    workloads = list(workloads)
    jwt = spec.get("jwt") or []
    if (spec.get("requireJwt") if "requireJwt" in spec else bool(jwt)) and spec.get("mode", "Enforce") == "Enforce":
        # requireJwt is an HTTP request's: a connection carries no token, so the rules alone decide it (not Istio's
        # `requestPrincipals: ["*"]`, which never matches a connection).
        out += [f"requireJwt (not applied to connections): {w.key}:{port}" for w in workloads for port in w.tcp_ports]
    if not any(w.tcp_ports for w in workloads):
        return out
    for rule in spec.get("rules") or []:
        if not isinstance(rule, Mapping):
            continue
        if not any(_field(rule, name) for name in _http_only(rule)):  # the agent's fields: the CRD has their names
            continue
        deny = " (Deny: every connection its other conditions match)" if rule.get("action", "Allow") == "Deny" else ""
        ports = set((rule.get("to") or {}).get("ports") or [])
        for w in workloads:
            for port in w.tcp_ports:
                if not ports or port in ports:
                    out.append(f"{rule.get('name', '?')}{deny}: {w.key}:{port}")
    return out
