"""The app's own probes, as the injector moved them behind the agent.

Under strict mTLS kubelet's plaintext probes would be refused by the pod's Envoy, so the
injector points them at the agent's admin port (never captured) under
`/app-health/<container>/<livez|readyz|startupz>` and hands the agent the originals in
an env var (JSON: path -> probe); the agent probes the app as kubelet would have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

Kind = Literal["httpGet", "tcpSocket", "grpc"]
# The agent's env var with the originals (the injector writes it, the agent reads it).
PROBES_ENV = "MESHWARD_APP_PROBES"


@dataclass(frozen=True)
class AppProbe:
    """One original probe: how to reach the app and how long to wait."""

    kind: Kind
    port: int
    path: str = "/"
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    service: str = ""
    timeout_s: float = 1.0


def parse_probes(text: str) -> dict[str, AppProbe]:
    """The probes in the injector's JSON (empty text: none); ValueError naming the entry that is malformed."""
    if not text.strip():
        return {}
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("the app probes must be a JSON object: path -> probe")  # noqa: TRY004
    out: dict[str, AppProbe] = {}
    for path, probe in doc.items():
        if not isinstance(path, str) or not path.startswith("/app-health/") or not isinstance(probe, dict):
            raise ValueError(f"app probe {path!r}: want /app-health/<container>/<kind> -> a probe")
        timeout = float(probe.get("timeoutSeconds") or 1)
        if isinstance(probe.get("httpGet"), dict):
            get = probe["httpGet"]
            headers = tuple((str(h.get("name", "")), str(h.get("value", ""))) for h in get.get("httpHeaders") or [])
            out[path] = AppProbe("httpGet", int(get["port"]), str(get.get("path") or "/"),
                                 str(get.get("scheme") or "HTTP").upper(), headers, timeout_s=timeout)
        elif isinstance(probe.get("tcpSocket"), dict):
            out[path] = AppProbe("tcpSocket", int(probe["tcpSocket"]["port"]), timeout_s=timeout)
        elif isinstance(probe.get("grpc"), dict):
            out[path] = AppProbe("grpc", int(probe["grpc"]["port"]), service=str(probe["grpc"].get("service") or ""),
                                 timeout_s=timeout)
        else:
            raise ValueError(f"app probe {path!r}: want httpGet, tcpSocket or grpc")  # noqa: TRY004
    return out


def grpc_health_request(service: str) -> bytes:
    """A `grpc.health.v1.HealthCheckRequest` for `service`, encoded by hand (field 1, a string)."""
    data = service.encode()
    return (b"\x0a" + _varint(len(data)) + data) if data else b""


def grpc_serving(response: bytes) -> bool:
    """Whether a `HealthCheckResponse` says SERVING (field 1 = 1)."""
    return response == b"\x08\x01"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
