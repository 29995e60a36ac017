"""Kubernetes API calls the operator makes: TokenReview, ServiceIdentities, the CA Secret, bundles.

The official client is synchronous; callers on an event loop run these methods in
a worker thread (`asyncio.to_thread`). Errors surface as KubeError, chained.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from meshward.operator.api.schema import GROUP, VERSION
from meshward.operator.domain.lease import LeaseView


class KubeError(Exception):
    """A Kubernetes API call failed (network, authorization, server error)."""


T = TypeVar("T")
# Listing a namespace's Services for an injection: under the webhooks' timeoutSeconds (the chart's 5 s), so a slow
# API server refuses the pod with our message (its controller retries) rather than timing the webhook out.
SERVICES_TIMEOUT_S = 4.0


def _json(doing: str, call: Callable[[], Any], *, missing_ok: bool = False) -> Any:
    """The decoded JSON body of `call` (a client call made with `_preload_content=False`); KubeError naming `doing`.

    With `missing_ok`, None when the object does not exist (404).
    """
    try:
        return json.loads(cast(Any, call()).data)
    except ApiException as e:
        if missing_ok and e.status == 404:
            return None
        raise _failed(doing, e) from e
    except (OSError, ValueError, urllib3.exceptions.HTTPError) as e:
        raise KubeError(f"{doing}: {type(e).__name__}: {e}") from e


def _items(doc: Any) -> list[dict[str, Any]]:
    """The object items of a list response."""
    items = doc.get("items") if isinstance(doc, dict) else None
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _failed(doing: str, e: ApiException) -> KubeError:
    """The boundary's error for an API call that failed while `doing` something."""
    return KubeError(f"{doing} failed: HTTP {e.status} {e.reason}")


def _read_or_none(read: Callable[[], T], doing: str) -> T | None:
    """`read()`, or None when the object does not exist (404)."""
    try:
        return read()
    except ApiException as e:
        if e.status == 404:
            return None
        raise _failed(doing, e) from e


@dataclass(frozen=True)
class TokenReviewResult:
    """What the API server said about a token."""

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    error: str = ""
    # The ServiceAccount's UID, and `user.extra`: a pod-bound token names its pod and the pod's UID.
    uid: str = ""
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def pod_name(self) -> str:
        """The pod a pod-bound token belongs to ("" for other tokens)."""
        return next(iter(self.extra.get("authentication.kubernetes.io/pod-name", ())), "")

    @property
    def pod_uid(self) -> str:
        """That pod's UID ("" for other tokens)."""
        return next(iter(self.extra.get("authentication.kubernetes.io/pod-uid", ())), "")


@dataclass(frozen=True)
class StoredSecret:
    """A Secret as read: base64 data, annotations, and the version a replace must match."""

    data: dict[str, str]
    annotations: dict[str, str]
    resource_version: str = ""


class KubeClient:
    """A thin wrapper over the official client for the calls Meshward needs."""

    def __init__(self, api: client.ApiClient) -> None:
        self._auth = client.AuthenticationV1Api(api)
        self._custom = client.CustomObjectsApi(api)
        self._core = client.CoreV1Api(api)
        self._coordination = client.CoordinationV1Api(api)
        self._admission = client.AdmissionregistrationV1Api(api)

    @classmethod
    def from_kubeconfig(cls, path: str | None = None) -> KubeClient:
        """Connect with a kubeconfig file, or in-cluster credentials when `path` is None and none is found."""
        cfg = client.Configuration()
        try:
            config.load_kube_config(config_file=path, client_configuration=cfg)  # type: ignore[no-untyped-call]
        except config.ConfigException as e:
            if path:
                raise KubeError(f"kubeconfig {path}: {e}") from e
            try:
                config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            except config.ConfigException as e2:
                raise KubeError("no kubeconfig ($KUBECONFIG, ~/.kube/config) and not running in a pod; "
                                "pass --kubeconfig") from e2
        # One pooled connection per issuance worker thread (the default pool is smaller).
        cfg.connection_pool_maxsize = 16
        return cls(client.ApiClient(cfg))

    def token_review(self, token: str, audiences: list[str]) -> TokenReviewResult:
        """Ask the API server to authenticate `token` for `audiences`."""
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=audiences))
        try:
            status = self._auth.create_token_review(body).status
        except ApiException as e:
            raise _failed("TokenReview", e) from e
        if not status or not status.authenticated:
            return TokenReviewResult(False, error=(status.error if status else "") or "not authenticated")
        user = status.user or client.V1UserInfo()
        extra = {k: tuple(v or ()) for k, v in (user.extra or {}).items()}
        return TokenReviewResult(True, user.username or "", tuple(status.audiences or ()), "", user.uid or "", extra)

    def service_identities(self, namespace: str) -> list[dict[str, Any]]:
        """Every ServiceIdentity in `namespace`."""
        return self.list_custom("serviceidentities", namespace)

    def read_lease(self, namespace: str, name: str) -> LeaseView | None:
        """The Lease, or None when it does not exist."""
        lease = _read_or_none(lambda: self._coordination.read_namespaced_lease(name, namespace),
                              f"reading Lease {namespace}/{name}")
        if lease is None:
            return None
        spec = lease.spec or client.V1LeaseSpec()
        renewed = spec.renew_time or spec.acquire_time or dt.datetime.fromtimestamp(0, dt.UTC)
        return LeaseView(spec.holder_identity or "", renewed, spec.lease_duration_seconds or 0,
                         spec.lease_transitions or 0, (lease.metadata or client.V1ObjectMeta()).resource_version or "")

    def write_lease(self, namespace: str, name: str, lease: LeaseView) -> LeaseView | None:
        """Create the Lease, or replace it at its resourceVersion; the written lease, or None if another writer won."""
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(name=name, namespace=namespace,
                                         resource_version=lease.resource_version or None),
            spec=client.V1LeaseSpec(holder_identity=lease.holder, lease_duration_seconds=lease.duration_s,
                                    renew_time=lease.renewed, acquire_time=lease.renewed,
                                    lease_transitions=lease.transitions))
        try:
            if lease.resource_version:
                out = self._coordination.replace_namespaced_lease(name, namespace, body)
            else:
                out = self._coordination.create_namespaced_lease(namespace, body)
        except ApiException as e:
            if e.status == 409:
                return None
            raise _failed(f"writing Lease {namespace}/{name}", e) from e
        return LeaseView(lease.holder, lease.renewed, lease.duration_s, lease.transitions,
                         (out.metadata or client.V1ObjectMeta()).resource_version or "")

    def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Pod as a plain dict, or None when it does not exist."""
        pod = _read_or_none(lambda: self._core.read_namespaced_pod(name, namespace), f"reading Pod {namespace}/{name}")
        if pod is None:
            return None
        out: dict[str, Any] = self._core.api_client.sanitize_for_serialization(pod)
        return out

    def list_pods(self, namespace: str | None, label_selector: str) -> list[dict[str, Any]]:
        """The pods of `namespace` (None: every namespace) matching `label_selector`, as plain dicts."""
        try:
            pods = self._core.list_namespaced_pod(namespace, label_selector=label_selector) if namespace is not None \
                else self._core.list_pod_for_all_namespaces(label_selector=label_selector)
        except ApiException as e:
            raise _failed(f"listing pods in {namespace or 'every namespace'}", e) from e
        out: list[dict[str, Any]] = self._core.api_client.sanitize_for_serialization(pods).get("items", [])
        return out

    def list_services(self, namespace: str, timeout_s: float = SERVICES_TIMEOUT_S) -> list[dict[str, Any]]:
        """The Services of `namespace`, as plain dicts (read as JSON, not through the client's models: far cheaper)."""
        return _items(_json(f"listing Services in {namespace}", lambda: self._core.list_namespaced_service(
            namespace, _preload_content=False, _request_timeout=timeout_s)))

    def list_namespaces(self, timeout_s: float = SERVICES_TIMEOUT_S * 4) -> list[dict[str, Any]]:
        """Every Namespace, as plain dicts (read as JSON)."""
        return _items(_json("listing namespaces", lambda: self._core.list_namespace(
            _preload_content=False, _request_timeout=timeout_s)))

    def read_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A Service as a plain dict; None if it does not exist."""
        doc = _json(f"reading Service {namespace}/{name}", lambda: self._core.read_namespaced_service(
            name, namespace, _preload_content=False, _request_timeout=SERVICES_TIMEOUT_S), missing_ok=True)
        return doc if isinstance(doc, dict) else None

    def namespaces(self, label_selector: str) -> list[str]:
        """The names of the namespaces matching `label_selector`."""
        try:
            found = self._core.list_namespace(label_selector=label_selector)
        except ApiException as e:
            raise _failed("listing namespaces", e) from e
        return [n.metadata.name for n in found.items or [] if n.metadata and n.metadata.name]

    def label_pod(self, namespace: str, name: str, labels: dict[str, str | None]) -> bool:
        """Merge `labels` into a Pod's (None removes one); False when the Pod does not exist."""
        try:
            self._core.patch_namespaced_pod(name, namespace, {"metadata": {"labels": labels}})
        except ApiException as e:
            if e.status == 404:
                return False
            raise _failed(f"labelling Pod {namespace}/{name}", e) from e
        return True

    def list_custom(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Every Meshward object of a kind, in `namespace` or (cluster-scoped) everywhere."""
        try:
            if namespace is None:
                out = self._custom.list_cluster_custom_object(GROUP, VERSION, plural)
            else:
                out = self._custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
        except ApiException as e:
            where = f" in {namespace}" if namespace is not None else ""
            raise _failed(f"listing {plural}{where}", e) from e
        items: list[dict[str, Any]] = cast(dict[str, Any], out).get("items", [])
        return items

    def read_secret(self, namespace: str, name: str) -> StoredSecret | None:
        """The Secret (data as stored, base64), or None when it does not exist."""
        secret = _read_or_none(lambda: self._core.read_namespaced_secret(name, namespace),
                               f"reading Secret {namespace}/{name}")
        if secret is None:
            return None
        meta = secret.metadata or client.V1ObjectMeta()
        return StoredSecret({k: v.decode() if isinstance(v, bytes) else v for k, v in (secret.data or {}).items()},
                            dict(meta.annotations or {}), meta.resource_version or "")

    def replace_secret(self, namespace: str, name: str, secret: StoredSecret, labels: dict[str, str]) -> bool:
        """Replace a Secret if it is still at `secret.resource_version`; False when someone changed it first."""
        body = client.V1Secret(metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels=labels,
                                                            annotations=secret.annotations,
                                                            resource_version=secret.resource_version),
                               type="Opaque", data=dict[str, bytes | str](secret.data))
        try:
            self._core.replace_namespaced_secret(name, namespace, body)
        except ApiException as e:
            if e.status == 409:
                return False
            raise _failed(f"updating Secret {namespace}/{name}", e) from e
        return True

    def annotate_secret(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        """Merge `annotations` into a Secret's metadata."""
        try:
            self._core.patch_namespaced_secret(name, namespace, {"metadata": {"annotations": annotations}})
        except ApiException as e:
            raise _failed(f"annotating Secret {namespace}/{name}", e) from e

    def post_event(self, namespace: str, kind: str, name: str, type_: str, reason: str, message: str, *,
                   api_version: str = "v1", uid: str = "") -> None:
        """Record a core/v1 Event about `kind/name` in `namespace` (the object's, or `default` for cluster-scoped).

        A Namespace's Event is recorded in that namespace itself (its tenants see it), about no namespace.
        """
        now = dt.datetime.now(dt.UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{name}.", namespace=namespace),
            involved_object=client.V1ObjectReference(kind=kind, name=name,
                                                     namespace=None if kind == "Namespace" else namespace,
                                                     api_version=api_version, uid=uid or None),
            type=type_, reason=reason, message=message[:1024], first_timestamp=now, last_timestamp=now, count=1,
            source=client.V1EventSource(component="meshward-operator"))
        try:
            self._core.create_namespaced_event(namespace, body)
        except ApiException as e:
            raise _failed(f"posting Event on {kind} {namespace}/{name}", e) from e

    def patch_custom_status(self, plural: str, namespace: str | None, name: str, status: dict[str, Any]) -> bool:
        """Merge `status` into a Meshward object's status subresource; False when the object is gone."""
        body = {"status": status}
        try:
            if namespace is None:
                self._custom.patch_cluster_custom_object_status(
                    GROUP, VERSION, plural, name, body, _content_type="application/merge-patch+json")
            else:
                self._custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, plural, name, body, _content_type="application/merge-patch+json")
        except ApiException as e:
            if e.status == 404:
                return False
            where = f"{namespace}/{name}" if namespace else name
            raise _failed(f"writing the status of {plural} {where}", e) from e
        return True

    def webhook_ca_bundles(self, kind: str, name: str) -> list[str] | None:
        """The base64 caBundle of each webhook of a Mutating- or ValidatingWebhookConfiguration; None if absent."""
        read = (self._admission.read_mutating_webhook_configuration if kind == "mutating"
                else self._admission.read_validating_webhook_configuration)
        found = _read_or_none(lambda: read(name), f"reading {kind} webhook configuration {name}")
        if found is None:
            return None
        bundles = [w.client_config.ca_bundle or "" for w in found.webhooks or []]
        return [b.decode() if isinstance(b, bytes) else b for b in bundles]

    def set_webhook_ca_bundle(self, kind: str, name: str, count: int, bundle_b64: str) -> None:
        """Set the caBundle of the first `count` webhooks of a webhook configuration (JSON patch, by index)."""
        patch = [{"op": "add", "path": f"/webhooks/{n}/clientConfig/caBundle", "value": bundle_b64}
                 for n in range(count)]
        write = (self._admission.patch_mutating_webhook_configuration if kind == "mutating"
                 else self._admission.patch_validating_webhook_configuration)
        try:
            write(name, patch)
        except ApiException as e:
            raise _failed(f"setting the caBundle of {kind} webhook configuration {name}", e) from e

    def service_account_exists(self, namespace: str, name: str) -> bool:
        """Whether the ServiceAccount exists."""
        return _read_or_none(lambda: self._core.read_namespaced_service_account(name, namespace),
                             f"reading ServiceAccount {namespace}/{name}") is not None

    def ensure_configmap(self, namespace: str, name: str, data: dict[str, str], labels: dict[str, str]) -> bool:
        """Create or update a ConfigMap to hold exactly `data`; True when something was written."""
        current = _read_or_none(lambda: self._core.read_namespaced_config_map(name, namespace),
                                f"reading ConfigMap {namespace}/{name}")
        body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels=labels),
                                  data=data)
        try:
            if current is None:
                self._core.create_namespaced_config_map(namespace, body)
            elif (current.data or {}) != data:
                body = client.V1ConfigMap(metadata=client.V1ObjectMeta(
                    name=name, namespace=namespace, labels=labels,
                    resource_version=(current.metadata or client.V1ObjectMeta()).resource_version), data=data)
                self._core.replace_namespaced_config_map(name, namespace, body)
            else:
                return False
        except ApiException as e:
            raise _failed(f"writing ConfigMap {namespace}/{name}", e) from e
        return True

    def create_secret(self, namespace: str, name: str, data: dict[str, str], labels: dict[str, str]) -> bool:
        """Create a Secret with base64 `data`; False when one of that name already exists (nothing written)."""
        body = client.V1Secret(metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels=labels),
                               type="Opaque", data=dict[str, bytes | str](data))
        try:
            self._core.create_namespaced_secret(namespace, body)
        except ApiException as e:
            if e.status == 409:
                return False
            raise _failed(f"creating Secret {namespace}/{name}", e) from e
        return True
