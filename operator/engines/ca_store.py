"""The mesh CA's home: a Secret in the operator's namespace, created once, read ever after.

Two operators starting at once must end with one CA. Each generates a candidate and
tries to *create* the Secret; the API server admits exactly one create, the loser
gets 409 Conflict and reads the winner's. Nothing ever updates the Secret in place,
so a restart always finds the same CA. (Rotation adds a second key pair beside the
first; see docs/identity.md.)
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable
from typing import Protocol

from meshward.operator.domain.ca import CertificateAuthority, generate_root

SECRET_NAME = "meshward-mesh-ca"  # noqa: S105 - a resource name, not a password
LABELS = {"app.kubernetes.io/part-of": "meshward", "app.kubernetes.io/component": "mesh-ca"}


class SecretApi(Protocol):
    """The Secret calls the CA store needs (clients.kube.KubeClient)."""

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        """Read a Secret's data."""
        ...

    def create_secret(self, namespace: str, name: str, data: dict[str, str], labels: dict[str, str]) -> bool:
        """Create a Secret unless it exists."""
        ...


class CaStoreError(Exception):
    """The CA Secret exists but cannot be used; the message says how to fix it."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def load_or_create(api: SecretApi, namespace: str, trust_domain: str,
                   clock: Callable[[], dt.datetime]) -> CertificateAuthority:
    """Return the mesh CA, creating it if no operator has yet (safe under concurrent starts)."""
    data = api.read_secret(namespace, SECRET_NAME)
    if data is None:
        candidate = generate_root(trust_domain, clock())
        created = api.create_secret(namespace, SECRET_NAME, {"tls.crt": _b64(candidate.cert_pem()),
                                                              "tls.key": _b64(candidate.key_pem())}, LABELS)
        if created:
            return candidate
        data = api.read_secret(namespace, SECRET_NAME)
        if data is None:
            raise CaStoreError(f"Secret {namespace}/{SECRET_NAME} was created concurrently and then deleted; "
                               "restart the operator")
    try:
        return CertificateAuthority.from_pem(base64.b64decode(data["tls.crt"]), base64.b64decode(data["tls.key"]))
    except (KeyError, ValueError) as e:
        raise CaStoreError(f"Secret {namespace}/{SECRET_NAME} does not hold a usable CA ({e}); restore it from "
                           "backup, or delete it to bootstrap a new CA (every workload certificate then "
                           "needs reissuing)") from e
