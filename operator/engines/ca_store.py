"""The mesh CA's home: a Secret in the operator's namespace, created once, changed only by rotation.

Two operators starting at once must end with one CA. Each generates a candidate and
tries to *create* the Secret; the API server admits exactly one create, the loser
gets 409 Conflict and reads the winner's. After that the Secret changes only by a
rotation step (domain/rotation.py), written with a resourceVersion precondition so
two operators can never write different steps: the loser rereads and finds the step
done. Layout: `tls.crt`/`tls.key` sign; `next.crt`/`next.key` are staged;
`previous.crt` is retiring; `phase-since` dates the phase.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshward.operator.clients.kube import StoredSecret
from meshward.operator.domain.ca import CertificateAuthority, generate_root
from meshward.operator.domain.rotation import CaState

SECRET_NAME = "meshward-mesh-ca"  # noqa: S105 - a resource name, not a password
LABELS = {"app.kubernetes.io/part-of": "meshward", "app.kubernetes.io/component": "mesh-ca"}
# Setting this annotation on the CA Secret (any value) asks the operator to rotate the CA.
ROTATE_ANNOTATION = "meshward.io/rotate-ca"


class SecretApi(Protocol):
    """The Secret calls the CA store needs (clients.kube.KubeClient)."""

    def read_secret(self, namespace: str, name: str) -> StoredSecret | None:
        """Read a Secret."""
        ...

    def create_secret(self, namespace: str, name: str, data: dict[str, str], labels: dict[str, str]) -> bool:
        """Create a Secret unless it exists."""
        ...

    def replace_secret(self, namespace: str, name: str, secret: StoredSecret, labels: dict[str, str]) -> bool:
        """Replace a Secret at a resourceVersion."""
        ...


class CaStoreError(Exception):
    """The CA Secret exists but cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class Stored:
    """The CA state as read, with what a conditional write needs."""

    state: CaState
    resource_version: str
    rotation_requested: bool
    annotations: dict[str, str]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode(state: CaState) -> dict[str, str]:
    """The Secret data for a CA state."""
    data = {"tls.crt": _b64(state.active.cert_pem()), "tls.key": _b64(state.active.key_pem())}
    if state.next is not None:
        data |= {"next.crt": _b64(state.next.cert_pem()), "next.key": _b64(state.next.key_pem())}
    if state.previous is not None:
        data["previous.crt"] = _b64(state.previous.public_bytes(serialization.Encoding.PEM))
    if state.since is not None:
        data["phase-since"] = _b64(state.since.isoformat().encode())
    return data


def decode(secret: StoredSecret, where: str) -> Stored:
    """Parse the CA Secret; raise CaStoreError saying how to recover when it is damaged."""
    raw = {k: base64.b64decode(v) for k, v in secret.data.items()}
    try:
        active = CertificateAuthority.from_pem(raw["tls.crt"], raw["tls.key"])
        nxt = CertificateAuthority.from_pem(raw["next.crt"], raw["next.key"]) if "next.crt" in raw else None
        previous = x509.load_pem_x509_certificate(raw["previous.crt"]) if "previous.crt" in raw else None
        since = dt.datetime.fromisoformat(raw["phase-since"].decode()) if "phase-since" in raw else None
    except (KeyError, ValueError) as e:
        raise CaStoreError(f"Secret {where} does not hold a usable CA ({e}); restore it from backup, or delete it "
                           "to bootstrap a new CA (every workload certificate then needs reissuing)") from e
    return Stored(CaState(active, nxt, previous, since), secret.resource_version,
                  bool(secret.annotations.get(ROTATE_ANNOTATION)), secret.annotations)


def load_or_create_state(api: SecretApi, namespace: str, trust_domain: str,
                         clock: Callable[[], dt.datetime]) -> Stored:
    """Return the stored CA state, creating a CA if no operator has yet (safe under concurrent starts)."""
    secret = api.read_secret(namespace, SECRET_NAME)
    if secret is None:
        candidate = CaState(generate_root(trust_domain, clock()))
        api.create_secret(namespace, SECRET_NAME, encode(candidate), LABELS)
        secret = api.read_secret(namespace, SECRET_NAME)
        if secret is None:
            raise CaStoreError(f"Secret {namespace}/{SECRET_NAME} was created and then deleted; restart the operator")
    return decode(secret, f"{namespace}/{SECRET_NAME}")


def load_or_create(api: SecretApi, namespace: str, trust_domain: str,
                   clock: Callable[[], dt.datetime]) -> CertificateAuthority:
    """Return the signing CA, creating the Secret if no operator has yet."""
    return load_or_create_state(api, namespace, trust_domain, clock).state.active


def save(api: SecretApi, namespace: str, stored: Stored, state: CaState) -> bool:
    """Write a new state over `stored` (consuming a rotation request); False when another writer won."""
    annotations = {k: v for k, v in stored.annotations.items() if k != ROTATE_ANNOTATION}
    return api.replace_secret(namespace, SECRET_NAME,
                              StoredSecret(encode(state), annotations, stored.resource_version), LABELS)
