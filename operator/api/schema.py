"""The one source of truth for Meshward's CustomResourceDefinitions.

Why: the CRD manifests under `crds/` (and the copy in the Helm chart) are what the
API server validates with, what `kubectl explain` teaches from, and what the
operator parses.  Writing them by hand in three places drifts; so they are built
here as plain data by pure functions, written out by `meshward.operator.api.crdgen`,
and CI fails when a checked-in file differs from what this module builds.

Rules of the schema:
- every field has a description (a test walks the tree), so `kubectl explain`
  is the API reference;
- every string and list is bounded, which also keeps the API server's CEL cost
  estimates within budget;
- cross-field constraints are `x-kubernetes-validations` CEL rules whose
  message names the field and the fix.
"""

from __future__ import annotations

from typing import Any

from meshward.sidecar.domain.context import RESERVED

GROUP = "meshward.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

Schema = dict[str, Any]

# Go-style durations as Kubernetes CEL's duration() parses them ("30s", "1h30m", "500ms").
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
# Envoy and the sidecar reject JWTs signed with anything else; `none` and HS* are never accepted.
JWT_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
# RS256 and ES256 cover the major IdPs; anything else must be asked for explicitly.
DEFAULT_JWT_ALGORITHMS = ["RS256", "ES256"]
HTTP_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"]
# Claims Meshward sets itself on a context token; a policy cannot ask to copy them from the IdP token.
RESERVED_CONTEXT_CLAIMS = sorted(RESERVED)
# http:// is allowed only on loopback, for tests and the local mesh.
_LOOPBACK_HTTP = r"^http://(127\.0\.0\.1|localhost|\[::1\])(:[0-9]+)?(/.*)?$"
# user@host in a URL's authority: `http://localhost@192.0.2.2/` goes to 192.0.2.2.
_USERINFO = r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*@"
_DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


# ----------------------------------------------------------------------- builders


def cel_str(value: str) -> str:
    """Return `value` as a single-quoted CEL string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def string(description: str, **extra: Any) -> Schema:
    """Return a bounded string schema (maxLength defaults to 253)."""
    return {"type": "string", "description": description, "maxLength": 253, **extra}


def duration(description: str, default: str | None = None, *, minimum: str, maximum: str,
             field: str, why: str) -> Schema:
    """Return a Go-duration string bounded to [minimum, maximum] by a CEL rule that names `field`."""
    s = string(description, maxLength=32, pattern=DURATION_PATTERN)
    if default is not None:
        s["default"] = default
    s["x-kubernetes-validations"] = [{
        "rule": f"!self.matches({cel_str(DURATION_PATTERN)}) || "
                f"(duration(self) >= duration('{minimum}') && duration(self) <= duration('{maximum}'))",
        "message": f"{field} must be between {minimum} and {maximum}{why}",
    }]
    return s


def array(items: Schema, description: str, max_items: int, **extra: Any) -> Schema:
    """Return a bounded list schema."""
    return {"type": "array", "description": description, "items": items, "maxItems": max_items, **extra}


def obj(description: str, properties: dict[str, Schema], **extra: Any) -> Schema:
    """Return an object schema with the given properties (`required=[...]` and other keywords pass through)."""
    return {"type": "object", "description": description, "properties": properties, **extra}


def rule(expr: str, message: str, **extra: Any) -> dict[str, Any]:
    """Return one `x-kubernetes-validations` entry."""
    return {"rule": expr, "message": message, **extra}


# ------------------------------------------------------------------ shared shapes


def conditions_schema() -> Schema:
    """Return the standard metav1.Condition list schema."""
    return array(
        obj("A condition, as in metav1.Condition.", {
            "type": string("Condition type, e.g. Ready or Degraded.", maxLength=316),
            "status": string("True, False or Unknown.", enum=["True", "False", "Unknown"]),
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0,
                                   "description": "The .metadata.generation the condition was set for."},
            "lastTransitionTime": string("When the status last changed.", format="date-time", maxLength=64),
            "reason": string("A CamelCase machine-readable reason, e.g. ServiceAccountMissing.",
                             maxLength=1024),
            "message": string("A human-readable explanation that names what to do.", maxLength=32768),
        }, required=["type", "status", "lastTransitionTime", "reason", "message"]),
        "Standard conditions; Ready says whether the object is in force.",
        max_items=16,
        **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


def observed_generation() -> Schema:
    """Return the status.observedGeneration schema."""
    return {"type": "integer", "format": "int64", "minimum": 0,
            "description": "The .metadata.generation the operator last acted on."}


def label_selector(description: str) -> Schema:
    """Return a metav1.LabelSelector schema."""
    return obj(description, {
        "matchLabels": {
            "type": "object", "maxProperties": 64,
            "description": "Labels a pod must carry, all of them, with these values.",
            "additionalProperties": {"type": "string", "maxLength": 63},
        },
        "matchExpressions": array(obj("A label requirement.", {
            "key": string("The label key.", maxLength=317),
            "operator": string("How the key relates to the values.",
                               enum=["In", "NotIn", "Exists", "DoesNotExist"]),
            "values": array(string("A label value.", maxLength=63), "Values for In and NotIn; empty otherwise.",
                            max_items=64),
        }, required=["key", "operator"]), "Requirements a pod must meet, all of them.", max_items=16),
    }, **{"x-kubernetes-map-type": "atomic"})


# ------------------------------------------------------------------- AuthPolicy

_MODE_DESC = ("Enforce applies the decision; Audit decides, logs and counts the would-be outcome "
              "(metric meshward_authz_would_deny_total) but lets the request through.")


def jwt_issuer_schema() -> Schema:
    """Return the schema of one trusted end-user JWT issuer."""
    url_ok = (f"(self.startsWith('https://') || self.matches({cel_str(_LOOPBACK_HTTP)})) && "
              f"!self.matches({cel_str(_USERINFO)})")
    return obj(
        "An identity provider whose end-user JWTs the selected workloads accept.",
        {
            "issuer": string(
                "The exact `iss` claim of accepted tokens; an https URL (http only on loopback).",
                maxLength=512,
                **{"x-kubernetes-validations": [rule(
                    url_ok, "spec.jwt[].issuer must be an https URL such as https://idp.example.com, without "
                            "user@ (plain http is allowed only for 127.0.0.1, localhost or [::1]; serve an "
                            "in-cluster IdP over https and set caFile)")]},
            ),
            "audiences": array(
                string("An audience.", maxLength=512),
                "Accepted `aud` values; a token must name at least one of them. Required: a token minted "
                "for another service must never be accepted here.",
                max_items=16, minItems=1),
            "jwksUri": string(
                "Where the issuer's signing keys (JWKS) are fetched from. When unset, it is read from "
                "the issuer's OIDC discovery document (<issuer>/.well-known/openid-configuration).",
                maxLength=2048,
                **{"x-kubernetes-validations": [rule(
                    url_ok, "spec.jwt[].jwksUri must be an https URL without user@ (plain http is allowed "
                            "only for 127.0.0.1, localhost or [::1]); keys fetched over plain http can be "
                            "forged")]},
            ),
            "jwks": string(
                "The issuer's public signing keys as a JWKS document (JSON), inline instead of fetched: for "
                "air-gapped clusters and issuers without a reachable JWKS endpoint. Rotate keys by updating "
                "the policy; never put a private key here.",
                maxLength=65536),
            "algorithms": array(
                string("A JWS algorithm.", enum=JWT_ALGORITHMS),
                "Signature algorithms accepted from this issuer. `none` and HMAC (HS*) are never "
                "accepted.",
                max_items=len(JWT_ALGORITHMS), minItems=1, default=DEFAULT_JWT_ALGORITHMS,
                **{"x-kubernetes-list-type": "set"}),
            "fromHeaders": array(
                obj("A request header that carries the token.", {
                    "name": string("Header name, lowercase.", maxLength=128,
                                   pattern=r"^[a-z0-9!#$%&'*+.^_`|~-]+$"),
                    "prefix": string("Text before the token in the header value, e.g. `Bearer `.",
                                     maxLength=64),
                }, required=["name"]),
                "Headers to read the token from, in order. Default: `Authorization: Bearer <token>`.",
                max_items=4),
            "fromCookies": array(
                string("A cookie name.", maxLength=128),
                "Cookies to read the token from, after the headers.", max_items=4),
            "forwardOriginalToken": {
                "type": "boolean", "default": False,
                "description": "Pass the original token on to the workload. Off by default: the "
                               "workload gets a minimized context token instead (spec.context).",
            },
            "clockSkew": duration(
                "Tolerance for `exp`, `nbf` and `iat` against the sidecar's clock.", "30s",
                minimum="0s", maximum="5m", field="spec.jwt[].clockSkew",
                why="; more skew accepts tokens long after they expired"),
            "maxTokenLifetime": duration(
                "Reject tokens whose `exp - iat` (or, without `iat`, `exp` - now) is longer than this, "
                "however valid their signature.", "24h",
                minimum="1m", maximum="168h", field="spec.jwt[].maxTokenLifetime",
                why="; long-lived bearer tokens cannot be revoked in time"),
            "tokenTypes": array(
                string("A JWT `typ` header value, e.g. `at+jwt`; compared case-insensitively, with or "
                       "without `application/`.", maxLength=64),
                "Accepted `typ` values. Default: `JWT` and `at+jwt` (RFC 9068), and tokens without `typ`. "
                "JWTs made for other purposes (`logout+jwt`, `secevent+jwt`, `dpop+jwt`, …) are refused "
                "unless listed here.", max_items=8),
        },
        required=["issuer", "audiences"],
        **{"x-kubernetes-validations": [rule(
            "!(has(self.jwks) && has(self.jwksUri))",
            "spec.jwt[]: set jwks (keys inline) or jwksUri (keys fetched), not both")]},
    )


def auth_rule_schema() -> Schema:
    """Return the schema of one authorization rule."""
    principal_ok = r"^(\*|spiffe://[^*]+\*?|\*[^*]+)$"
    return obj(
        "One authorization rule: it matches a request when every given part of `from`, `to` and "
        "`when` matches. Deny rules are checked first and win; when any policy selects a workload, "
        "a request that matches no Allow rule is denied. A TCP connection (a port the workload declares "
        "with meshward.io/tcp-ports, or a Service port's appProtocol or tcp- name) has only a peer and a "
        "port: an Allow rule with any HTTP-only field (from.requestPrincipals, to.methods, to.paths, "
        "to.hosts, and a `when` that uses more than source.principal and source.namespace) never matches "
        "one, and a Deny rule ignores those fields there and denies on the others.",
        {
            "name": string("Unique within the policy; appears in audit logs, metrics and "
                           "`meshward explain`.", maxLength=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
            "action": string("Allow or Deny.", enum=["Allow", "Deny"], default="Allow"),
            "mode": string(f"Overrides spec.mode for this rule. {_MODE_DESC}", enum=["Enforce", "Audit"]),
            "from": obj("Who is calling. Every list given must match; entries within a list are ORed.", {
                "principals": array(
                    string("A SPIFFE ID (spiffe://<trust-domain>/ns/<ns>/sa/<sa>), optionally with "
                           "one leading or trailing `*`; `*` alone is any mTLS peer.", maxLength=512,
                           **{"x-kubernetes-validations": [rule(
                               f"self.matches({cel_str(principal_ok)})",
                               "spec.rules[].from.principals: use a SPIFFE ID such as "
                               "spiffe://cluster.local/ns/shop/sa/frontend, with at most one '*' at its "
                               "start or end ('spiffe://cluster.local/ns/shop/*'), or '*' for any peer")]}),
                    "Peer workload identities from the mTLS certificate.", max_items=64),
                "requestPrincipals": array(
                    string("`<iss>/<sub>` of the end user, with one leading or trailing `*`; "
                           "`*` alone is any authenticated user.", maxLength=1024),
                    "End-user identities (`<iss>/<sub>`) from a validated JWT, or from a context token a meshed "
                    "caller passed on.", max_items=64),
                "namespaces": array(
                    string("A namespace name.", maxLength=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
                    "Namespaces of the peer workload (from its SPIFFE ID).", max_items=64),
            }),
            "to": obj("What is called. Every list given must match; entries within a list are ORed.", {
                "methods": array(string("An HTTP method.", enum=HTTP_METHODS),
                                 "HTTP methods.", max_items=len(HTTP_METHODS)),
                "paths": array(
                    string("A path: exact (`/healthz`), prefix (`/orders/*`) or glob (`/v*/orders/**`: "
                           "`*` is one segment, `**` any number). Matched before the query string.",
                           maxLength=1024,
                           **{"x-kubernetes-validations": [rule(
                               "self.startsWith('/') || self == '*'",
                               "spec.rules[].to.paths: a path must start with '/' (e.g. /orders/*), "
                               "or be '*' for any path")]}),
                    "Request paths.", max_items=64),
                "pathMatch": string(
                    "How `paths` compare with the request path, after Envoy's normalization (RFC 3986 dot "
                    "segments, merged slashes, decoded `%2F` redirected). `Strict`: exactly. `Lenient`: also "
                    "ignoring case, `;parameters` in a segment, trailing dots of a segment and percent-encoded "
                    "unreserved characters, so `/ADMIN;x./users` and `/%61dmin/users` match `/admin/*`. "
                    "Default: Lenient for Deny rules (an app that reads those forms as the denied resource "
                    "cannot be reached around the rule), Strict for Allow rules.",
                    enum=["Strict", "Lenient"]),
                "hosts": array(string("A Host/:authority value; a leading `*.` matches subdomains. The "
                                      "port and a trailing dot of the request's host are ignored.",
                                      maxLength=253),
                               "Request hosts.", max_items=64),
                "ports": array({"type": "integer", "minimum": 1, "maximum": 65535,
                                "description": "A destination port."},
                               "Destination ports of the workload.", max_items=32),
            }),
            "when": array(
                string("A CEL expression over `request`, `claims`, `scopes` and `source` that must be true, "
                       "e.g. \"'orders:read' in scopes\" (`scopes`: the token's space-separated `scope` and "
                       "its `scp` array, as one list).", maxLength=1024),
                "Conditions, all of which must hold. Compiled once when the policy is loaded.",
                max_items=16),
        },
        required=["name"],
    )


def auth_policy_spec() -> Schema:
    """Return the AuthPolicy .spec schema."""
    non_empty_selector = (
        "has(self.selector) && ((has(self.selector.matchLabels) && size(self.selector.matchLabels) > 0)"
        " || (has(self.selector.matchExpressions) && size(self.selector.matchExpressions) > 0))"
    )
    return obj(
        "Which workloads this policy protects, which end-user tokens they accept, and who may call "
        "what.",
        {
            "selector": label_selector(
                "Pods in this namespace the policy applies to. Required unless spec.namespaceWide is "
                "true; an empty selector is rejected so that a typo never protects (or opens) the "
                "whole namespace."),
            "namespaceWide": {
                "type": "boolean", "default": False,
                "description": "Apply the policy to every opted-in workload in the namespace. "
                               "Mutually exclusive with spec.selector.",
            },
            "mode": string(_MODE_DESC, enum=["Enforce", "Audit"], default="Enforce"),
            "jwt": array(jwt_issuer_schema(), "Identity providers whose end-user JWTs are accepted.",
                         max_items=8,
                         **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["issuer"]}),
            "requireJwt": {
                "type": "boolean",
                "description": "Deny requests without a valid end-user JWT (401). Default: true when "
                               "spec.jwt lists an issuer, false otherwise.",
            },
            "rules": array(auth_rule_schema(), "Authorization rules; Deny rules win over Allow rules.",
                           max_items=64,
                           **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}),
            "context": obj(
                "The user context token the sidecar mints for the workload on every allowed request.",
                {
                    "claims": array(
                        string("A claim name to copy from the end-user token.", maxLength=128,
                               **{"x-kubernetes-validations": [rule(
                                   f"!(self in {RESERVED_CONTEXT_CLAIMS!r})",
                                   "spec.context.claims: this claim is set by Meshward itself; list only "
                                   "end-user claims such as sub or tenant",
                                   messageExpression=(
                                       "'spec.context.claims: \"' + self + '\" is set by Meshward itself; "
                                       "list only end-user claims such as sub or tenant'"))]}),
                        "End-user claims the workload may see (`sub` is always included). Everything "
                        "else is dropped.", max_items=32, **{"x-kubernetes-list-type": "set"}),
                    "ttl": duration(
                        "Lifetime of the context token.", "30s", minimum="1s", maximum="60s",
                        field="spec.context.ttl", why="; context tokens must expire within a minute"),
                    "header": string("The request header the workload reads the token from.",
                                     maxLength=128, default="x-meshward-context",
                                     pattern=r"^x-[a-z0-9-]+$"),
                },
            ),
        },
        **{"x-kubernetes-validations": [
            rule(f"self.namespaceWide || ({non_empty_selector})",
                 "spec.selector must select workloads with matchLabels or matchExpressions; to apply the "
                 "policy to the whole namespace set spec.namespaceWide: true instead",
                 fieldPath=".selector", reason="FieldValueRequired"),
            rule("!self.namespaceWide || !has(self.selector)",
                 "spec.selector must be omitted when spec.namespaceWide is true (a namespace-wide policy "
                 "already selects every workload)", fieldPath=".selector", reason="FieldValueForbidden"),
            rule("!has(self.requireJwt) || !self.requireJwt || (has(self.jwt) && size(self.jwt) > 0)",
                 "spec.requireJwt: true needs at least one issuer in spec.jwt; add one or remove requireJwt",
                 fieldPath=".requireJwt"),
        ]},
    )


def auth_policy_status() -> Schema:
    """Return the AuthPolicy .status schema."""
    return obj("What the operator and the sidecars report about this policy.", {
        "observedGeneration": observed_generation(),
        "conditions": conditions_schema(),
        "workloads": string("Selected workloads enforcing the current generation, over all selected "
                            "workloads (connected, or running with the mesh but not connected), e.g. `3/3`.",
                            maxLength=32),
        "selectedWorkloads": {"type": "integer", "minimum": 0,
                              "description": "How many workloads the policy selects: connected ones, and pods "
                                             "running with the mesh whose agent is not connected (NotConnected)."},
        "enforcingWorkloads": {"type": "integer", "minimum": 0,
                               "description": "How many of them enforce the current generation."},
        "laggingWorkloads": array(string("namespace/workload, with the generation it enforces.",
                                         maxLength=512),
                                  "Workloads that do not yet enforce the current generation.",
                                  max_items=50),
    })


# -------------------------------------------------------------- ServiceIdentity


def service_identity_spec() -> Schema:
    """Return the ServiceIdentity .spec schema."""
    return obj(
        "Admits a ServiceAccount of this namespace to the mesh: pods running as it may obtain a "
        "workload certificate for spiffe://<trust-domain>/ns/<namespace>/sa/<serviceAccountName>.",
        {
            "serviceAccountName": string(
                "The ServiceAccount in this namespace whose pods get this identity. Immutable.",
                pattern=_DNS1123_SUBDOMAIN,
                **{"x-kubernetes-validations": [rule(
                    "self == oldSelf",
                    "spec.serviceAccountName is immutable: create another ServiceIdentity for another "
                    "ServiceAccount")]}),
            "certificate": obj("The workload certificates issued for this identity.", {
                "ttl": duration(
                    "Lifetime of each leaf certificate; the sidecar renews at half of it.", "1h",
                    minimum="5m", maximum="24h", field="spec.certificate.ttl",
                    why=" (e.g. 1h); short lifetimes limit what a stolen key is worth"),
            }, default={}),
        },
        required=["serviceAccountName"],
    )


def service_identity_status() -> Schema:
    """Return the ServiceIdentity .status schema."""
    return obj("What the operator reports about this identity.", {
        "observedGeneration": observed_generation(),
        "conditions": conditions_schema(),
        "spiffeID": string("The SPIFFE ID certificates are issued for.", maxLength=2048),
        "issuedCertificates": {"type": "integer", "format": "int64", "minimum": 0,
                               "description": "Certificates issued for this identity since it was created."},
        "lastIssuedAt": string("When the last certificate was issued.", format="date-time", maxLength=64),
    })


# ------------------------------------------------------------------- Revocation

# Entries larger than this belong in the IdP (disable the user), not in every sidecar's memory.
MAX_REVOCATION_ENTRIES = 1000


def revocation_spec() -> Schema:
    """Return the Revocation .spec schema."""
    one_kind = "[has(self.jti), has(self.sub), has(self.sid)].filter(x, x).size() == 1"
    return obj(
        "Tokens, subjects or sessions every sidecar of the mesh denies (401 \"token revoked\") until the "
        "entry expires.",
        {
            "entries": array(obj("One revoked token, subject or session; set exactly one of jti, sub, sid.", {
                "jti": string("A token id (`jti` claim): revokes that one token.", maxLength=512),
                "sub": string("A subject (`sub` claim): revokes every token of that user.", maxLength=512),
                "sid": string("A session id (`sid` claim): revokes every token of that session.", maxLength=512),
                "issuer": string("Only for sub: the issuer whose subject this is (otherwise any issuer's).",
                                 maxLength=512),
                "expiresAt": string("When the entry stops applying (RFC 3339): after the revoked tokens "
                                    "have expired anyway, so the set stays small.", format="date-time",
                                    maxLength=64),
                "reason": string("Why, for the audit trail (e.g. an incident number).", maxLength=1024),
            }, required=["expiresAt"], **{"x-kubernetes-validations": [
                rule(one_kind, "spec.entries[]: set exactly one of jti, sub or sid"),
                rule("!has(self.issuer) || has(self.sub)",
                     "spec.entries[].issuer applies only to sub entries; remove it or use sub"),
            ]}), "What to revoke.", max_items=MAX_REVOCATION_ENTRIES, minItems=1),
        },
        required=["entries"],
    )


def revocation_status() -> Schema:
    """Return the Revocation .status schema."""
    return obj("What the operator reports about this revocation.", {
        "observedGeneration": observed_generation(),
        "conditions": conditions_schema(),
        "activeEntries": {"type": "integer", "minimum": 0, "description": "Entries not yet expired."},
        "expiredEntries": {"type": "integer", "minimum": 0,
                           "description": "Entries past expiresAt (no longer sent to sidecars)."},
        "workloads": string("Workloads enforcing this revocation over all workloads (connected, or running "
                            "with the mesh but not connected).", maxLength=32),
    })


# ------------------------------------------------------------------------- CRDs

_READY = '.status.conditions[?(@.type=="Ready")].status'


def crd(kind: str, plural: str, short_names: list[str], description: str, spec: Schema, status: Schema,
        columns: list[dict[str, Any]], scope: str = "Namespaced") -> dict[str, Any]:
    """Return a single-version CRD with a status subresource."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "meshward"}},
        "spec": {
            "group": GROUP,
            "scope": scope,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural,
                      "singular": kind.lower(), "shortNames": short_names, "categories": ["meshward"]},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": {
                    "type": "object", "description": description,
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": string("The API version, meshward.io/v1alpha1.", maxLength=64),
                        "kind": string(f"The kind, {kind}.", maxLength=64),
                        "metadata": {"type": "object"},
                        "spec": spec,
                        "status": status,
                    },
                }},
            }],
        },
    }


def auth_policy_crd() -> dict[str, Any]:
    """Return the AuthPolicy CRD."""
    return crd(
        "AuthPolicy", "authpolicies", ["ap", "authpol"],
        "AuthPolicy authenticates and authorizes requests into the workloads it selects: which end-user "
        "JWTs they accept, which peers and users may call which paths, and which claims travel on.",
        auth_policy_spec(), auth_policy_status(),
        [
            {"name": "Mode", "type": "string", "jsonPath": ".spec.mode",
             "description": "Enforce or Audit."},
            {"name": "Ready", "type": "string", "jsonPath": _READY,
             "description": "Whether every selected workload enforces the current generation."},
            {"name": "Workloads", "type": "string", "jsonPath": ".status.workloads",
             "description": "Enforcing / selected workloads."},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


def service_identity_crd() -> dict[str, Any]:
    """Return the ServiceIdentity CRD."""
    return crd(
        "ServiceIdentity", "serviceidentities", ["si", "svcid"],
        "ServiceIdentity admits a ServiceAccount to the mesh: its pods get short-lived X.509 SPIFFE "
        "certificates from the mesh CA, renewed automatically.",
        service_identity_spec(), service_identity_status(),
        [
            {"name": "SPIFFE ID", "type": "string", "jsonPath": ".status.spiffeID",
             "description": "The identity issued."},
            {"name": "Ready", "type": "string", "jsonPath": _READY,
             "description": "Whether certificates are being issued."},
            {"name": "Service Account", "type": "string", "jsonPath": ".spec.serviceAccountName",
             "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


def revocation_crd() -> dict[str, Any]:
    """Return the (cluster-scoped) Revocation CRD."""
    return crd(
        "Revocation", "revocations", ["rev"],
        "Revocation denies tokens, subjects or sessions across the whole mesh within seconds, each entry "
        "until its expiresAt.",
        revocation_spec(), revocation_status(),
        [
            {"name": "Active", "type": "integer", "jsonPath": ".status.activeEntries",
             "description": "Entries in force."},
            {"name": "Ready", "type": "string", "jsonPath": _READY,
             "description": "Whether every workload enforces it (a running one not connected does not)."},
            {"name": "Workloads", "type": "string", "jsonPath": ".status.workloads",
             "description": "Enforcing / all workloads."},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        scope="Cluster",
    )


def all_crds() -> dict[str, dict[str, Any]]:
    """Return every CRD keyed by the file name it is written to."""
    return {
        f"{GROUP}_authpolicies.yaml": auth_policy_crd(),
        f"{GROUP}_revocations.yaml": revocation_crd(),
        f"{GROUP}_serviceidentities.yaml": service_identity_crd(),
    }
