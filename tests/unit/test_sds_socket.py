"""The workload's private key over SDS: a Unix socket of mode 0600 only, never a TCP port (attack: key over TCP)."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

import pytest

from meshward.sidecar.entrypoints.main import main
from meshward.sidecar.servers.sds import SecretDiscovery, serve_sds


@pytest.mark.parametrize("address", ["0.0.0.0:15099", "127.0.0.1:15099", "[::]:15099", "unix:relative.sock"])
def test_sds_on_tcp_is_a_startup_error(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--sds-listen 0.0.0.0:PORT` was accepted, and an unauthenticated FetchSecrets returned the private key."""
    with pytest.raises(SystemExit) as e:
        main(["--config", "x.yaml", "--identity-signer", "signer:15012", "--sds-listen", address])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--sds-listen" in err and "only on a Unix socket" in err and "private key" in err


def test_sds_socket_is_mode_0600(tmp_path: Path) -> None:
    """Only the agent's user (Envoy runs as the same one) may connect; no one else in the pod or on the node."""
    sock = tmp_path / "sds.sock"

    async def go() -> int:
        server = await serve_sds(SecretDiscovery(identity=Any, trust_domain="cluster.local"),  # type: ignore[arg-type]
                                 f"unix:{sock}")
        try:
            return stat.S_IMODE(sock.stat().st_mode)
        finally:
            await server.stop(None)

    assert asyncio.run(go()) == 0o600


def test_serve_sds_refuses_a_tcp_address() -> None:
    async def go() -> None:
        await serve_sds(SecretDiscovery(identity=Any, trust_domain="cluster.local"),  # type: ignore[arg-type]
                        "127.0.0.1:0")

    with pytest.raises(ValueError, match="Unix socket only"):
        asyncio.run(go())
