"""The ServiceIdentity watch: every event goes to the identity directory and the status writer.

The directory answers the signing service (which ServiceAccounts are admitted) without an
API call per certificate; the status writer reports each ServiceIdentity (engines.status_reports)
and publishes the trust bundle in its namespace. No change handlers and no finalizers:
deleting a ServiceIdentity never waits for the operator (docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

import kopf

from meshward.operator.api.schema import GROUP, VERSION
from meshward.operator.engines.identity_directory import IdentityDirectory
from meshward.operator.engines.status_writer import StatusWriter


def register(registry: kopf.OperatorRegistry, directory: IdentityDirectory, statuses: StatusWriter) -> None:
    """Register the ServiceIdentity index on `registry`."""

    @kopf.on.event(GROUP, VERSION, "serviceidentities", id="index", registry=registry)
    async def index(type: str | None, body: kopf.Body, **_: Any) -> None:
        if statuses.track(type, body):
            directory.upsert(body)
        else:
            directory.remove(body)
