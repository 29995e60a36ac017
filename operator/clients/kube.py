"""Kubernetes API calls the operator makes: TokenReview and ServiceIdentity lookups.

The official client is synchronous; callers on an event loop run these methods in
a worker thread (`asyncio.to_thread`). Errors surface as KubeError, chained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from meshward.operator.api.schema import GROUP, VERSION


class KubeError(Exception):
    """A Kubernetes API call failed (network, authorization, server error)."""


@dataclass(frozen=True)
class TokenReviewResult:
    """What the API server said about a token."""

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    error: str = ""


class KubeClient:
    """A thin wrapper over the official client for the calls Meshward needs."""

    def __init__(self, api: client.ApiClient) -> None:
        self._auth = client.AuthenticationV1Api(api)
        self._custom = client.CustomObjectsApi(api)

    @classmethod
    def from_kubeconfig(cls, path: str | None = None) -> KubeClient:
        """Connect with a kubeconfig file, or in-cluster credentials when `path` is None and none is found."""
        cfg = client.Configuration()
        try:
            config.load_kube_config(config_file=path, client_configuration=cfg)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            if path:
                raise
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        return cls(client.ApiClient(cfg))

    def token_review(self, token: str, audiences: list[str]) -> TokenReviewResult:
        """Ask the API server to authenticate `token` for `audiences`."""
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=audiences))
        try:
            status = self._auth.create_token_review(body).status
        except ApiException as e:
            raise KubeError(f"TokenReview failed: HTTP {e.status} {e.reason}") from e
        if not status or not status.authenticated:
            return TokenReviewResult(False, error=(status.error if status else "") or "not authenticated")
        username = (status.user.username if status.user else None) or ""
        return TokenReviewResult(True, username, tuple(status.audiences or ()), "")

    def service_identities(self, namespace: str) -> list[dict[str, Any]]:
        """Every ServiceIdentity in `namespace`."""
        try:
            out = self._custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "serviceidentities")
        except ApiException as e:
            raise KubeError(f"listing ServiceIdentities in {namespace} failed: HTTP {e.status} {e.reason}") from e
        items: list[dict[str, Any]] = cast(dict[str, Any], out).get("items", [])
        return items
