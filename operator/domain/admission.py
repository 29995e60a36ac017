"""Admission reviews, decided by pure functions: sidecar injection and Meshward objects' validation.

Why pure and total: the API server calls these for every opted-in pod and every
Meshward object, and a webhook that answers 500 (or crashes on an odd object) blocks
people. So every input gets an answer: a malformed review is a ReviewError (the server
answers 400 with its message), anything else an AdmissionResponse. Injection patches
only pods that opted in (domain/inject.py decides), and refuses, never passes
unprotected, an opted-in pod it cannot protect. Validation runs the operator's own
checks (the same the policy hub runs), so `kubectl apply` of an object the CRD schema
accepts but the operator would reject fails at once, naming the field and the fix; an
update that leaves the spec alone (finalizers, labels, annotations) is always allowed,
so an object stored before a check existed can still be cleaned up.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

from meshward.operator.domain.ca import MAX_TTL, MIN_TTL, parse_ttl, spiffe_id
from meshward.operator.domain.compile import PolicyInvalid, policy_object, revocation_entries, validate
from meshward.operator.domain.egress import exclusions_problem
from meshward.operator.domain.inject import (
    InjectRefused,
    InjectSettings,
    check_ephemeral,
    inject,
    json_patch,
    opted_in,
)
from meshward.sidecar.config.schema import url_problem

API_VERSION = "admission.k8s.io/v1"
GROUP = "meshward.io"


class ReviewError(ValueError):
    """Not an AdmissionReview this webhook can answer; the message says what is wrong."""


def parse_review(body: bytes) -> dict[str, Any]:
    """The `request` of an AdmissionReview (admission.k8s.io/v1) in `body`; ReviewError if it is not one."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ReviewError(f"the body is not JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("kind") != "AdmissionReview" or doc.get("apiVersion") != API_VERSION:
        raise ReviewError(f"expected an AdmissionReview of {API_VERSION}")
    request = doc.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str) or not request["uid"]:
        raise ReviewError("the AdmissionReview has no request.uid")
    return request


def review(response: Mapping[str, Any]) -> dict[str, Any]:
    """The AdmissionReview carrying `response`."""
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": dict(response)}


def _allowed(uid: str, **extra: Any) -> dict[str, Any]:
    return {"uid": uid, "allowed": True, **extra}


def _denied(uid: str, code: int, message: str) -> dict[str, Any]:
    return {"uid": uid, "allowed": False, "status": {"code": code, "message": message}}


def _kind(request: Mapping[str, Any]) -> tuple[str, str]:
    kind = request.get("kind")
    if not isinstance(kind, dict):
        return "", ""
    return str(kind.get("group", "")), str(kind.get("kind", ""))


def _pod_created(request: Mapping[str, Any]) -> tuple[dict[str, Any], str] | None:
    """(the pod, its namespace) of a Pod CREATE review, else None: the only reviews that inject."""
    pod = request.get("object")
    if _kind(request) != ("", "Pod") or request.get("operation") != "CREATE" or not isinstance(pod, dict):
        return None
    return pod, str(request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or "")


def services_needed(request: Mapping[str, Any], settings: InjectSettings, namespace_opted_in: bool) -> str | None:
    """The namespace whose Services the injection of this review reads (a Pod CREATE that opts in), else None."""
    created = _pod_created(request)
    if created is None:
        return None
    pod, namespace = created
    try:
        return namespace if opted_in(pod, namespace, namespace_opted_in, settings.operator_namespace) else None
    except (AttributeError, TypeError, KeyError, ValueError):
        return None  # inject_response refuses the pod, saying why


def services_unavailable_response(request: Mapping[str, Any], namespace: str, reason: str) -> dict[str, Any]:
    """The answer for an opted-in pod whose namespace's Services could not be listed: refused, to be retried."""
    return _denied(str(request["uid"]), 503, f"meshward: could not list the Services of namespace {namespace!r}, "
                                             f"which may declare ports of this pod TCP ({reason[:300]}); create it "
                                             "again (a controller retries by itself)")


def inject_response(request: Mapping[str, Any], settings: InjectSettings, namespace_opted_in: bool,
                    services: Sequence[Mapping[str, Any]] = (), egress_locked: bool = False) -> dict[str, Any]:
    """The answer for a pod CREATE: a JSON patch adding the mesh, nothing, or a refusal saying why.

    `services`: the Services of the pod's namespace (the ports they declare TCP for it are declared).
    `egress_locked`: the namespace's egress is locked, so outbound exclusions are refused (domain/egress.py).
    """
    uid = str(request["uid"])
    created = _pod_created(request)
    if created is None:
        return _allowed(uid)
    pod, namespace = created
    try:
        if not opted_in(pod, namespace, namespace_opted_in, settings.operator_namespace):
            return _allowed(uid)
        problem = exclusions_problem((pod.get("metadata") or {}).get("annotations") or {}) if egress_locked else None
        if problem is not None:
            raise InjectRefused(problem)
        patch = json_patch(pod, inject(pod, settings, services))
    except InjectRefused as e:
        return _denied(uid, 403, f"meshward: this pod opted in to the mesh but cannot be protected: {e}")
    except (AttributeError, TypeError, KeyError, ValueError) as e:
        # An opted-in pod that does not even parse never runs unprotected either.
        return _denied(uid, 400, f"meshward: cannot read this pod to inject it ({type(e).__name__}: {e})")
    if not patch:
        return _allowed(uid)
    return _allowed(uid, patchType="JSONPatch", patch=base64.b64encode(json.dumps(patch).encode()).decode())


def ephemeral_response(request: Mapping[str, Any]) -> dict[str, Any]:
    """The answer for `kubectl debug` on an opted-in pod (pods/ephemeralcontainers): allowed, or refused saying why."""
    uid = str(request["uid"])
    pod = request.get("object")
    if _kind(request) != ("", "Pod") or request.get("subResource") != "ephemeralcontainers" or \
            not isinstance(pod, dict):
        return _allowed(uid)
    try:
        check_ephemeral(pod)
    except InjectRefused as e:
        return _denied(uid, 403, f"meshward: this debug container could get around the pod's mesh: {e}")
    except (AttributeError, TypeError, KeyError, ValueError) as e:
        return _denied(uid, 400, f"meshward: cannot read this pod's ephemeral containers ({type(e).__name__}: {e})")
    return _allowed(uid)


def _check_identity(obj: Mapping[str, Any], namespace: str, trust_domain: str) -> None:
    spec = obj.get("spec") or {}
    sa = str(spec.get("serviceAccountName") or "")
    try:
        spiffe_id(trust_domain, namespace, sa)
    except ValueError as e:
        raise PolicyInvalid("spec.serviceAccountName", str(e)) from e
    ttl = (spec.get("certificate") or {}).get("ttl")
    if ttl:
        try:
            parse_ttl(str(ttl), MIN_TTL, MAX_TTL)
        except ValueError as e:
            raise PolicyInvalid("spec.certificate.ttl", f"{e} (e.g. 1h)") from e


def _check_revocation(obj: Mapping[str, Any], now: dt.datetime) -> list[str]:
    """Raise PolicyInvalid for what the operator cannot use; the warnings for what it will ignore."""
    warnings: list[str] = []
    for n, e in enumerate((obj.get("spec") or {}).get("entries") or []):
        issuer = e.get("issuer") if isinstance(e, dict) else None
        if issuer:
            problem = url_problem(str(issuer))
            if problem:
                raise PolicyInvalid(f"spec.entries[{n}].issuer", f"{issuer!r} must be the issuer's https URL, as "
                                                                  f"in its tokens' iss claim: it {problem}")
    try:
        entries = revocation_entries(obj)
    except (KeyError, TypeError, ValueError) as e:
        raise PolicyInvalid("spec.entries", f"cannot read an entry ({e}); each needs expiresAt (RFC 3339) and "
                                            "one of jti, sub or sid") from e
    expired = [entry for entry in entries if entry.expires_at <= now]
    if expired:
        warnings.append(f"{len(expired)} of {len(entries)} entries have already expired and revoke nothing "
                        f"(first: {expired[0].kind} {expired[0].value!r})")
    return warnings


def validate_response(request: Mapping[str, Any], trust_domain: str, now: dt.datetime) -> dict[str, Any]:
    """The answer for a Meshward object's CREATE or UPDATE: allowed, or denied naming the field and the fix."""
    uid = str(request["uid"])
    group, kind = _kind(request)
    obj = request.get("object")
    if group != GROUP or request.get("operation") not in ("CREATE", "UPDATE") or not isinstance(obj, dict):
        return _allowed(uid)
    old = request.get("oldObject")
    if request.get("operation") == "UPDATE" and isinstance(old, dict) and old.get("spec") == obj.get("spec"):
        return _allowed(uid)
    meta = dict(obj.get("metadata") or {})
    namespace = str(request.get("namespace") or meta.get("namespace") or "")
    name = str(meta.get("name") or request.get("name") or "")
    warnings: list[str] = []
    try:
        if kind == "AuthPolicy":
            validate(policy_object({**obj, "metadata": {**meta, "namespace": namespace, "name": name}}))
        elif kind == "ServiceIdentity":
            _check_identity(obj, namespace, trust_domain)
        elif kind == "Revocation":
            warnings = _check_revocation(obj, now)
    except PolicyInvalid as e:
        where = f"{namespace}/{name}" if namespace else name
        return _denied(uid, 422, f"{kind} {where}: {e}")
    except (AttributeError, TypeError, KeyError, ValueError) as e:
        return _denied(uid, 422, f"{kind} {name}: cannot read it ({type(e).__name__}: {e})")
    return _allowed(uid, **({"warnings": warnings} if warnings else {}))
