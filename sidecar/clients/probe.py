"""Probes the app as kubelet would have: HTTP GET, a TCP connect, or the gRPC health check.

Called from the agent's admin port for the probes the injector moved there
(domain/probes.py). The agent runs as the proxy's user, so its connections to the
pod's own address reach the app directly (capture never redirects them). Success is
kubelet's: an HTTP status from 200 to 399, a completed connect, SERVING. HTTPS probes
are not verified, as kubelet does not verify them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import grpc

from meshward.sidecar.domain.probes import AppProbe, grpc_health_request, grpc_serving

USER_AGENT = "kube-probe/meshward"


async def probe(p: AppProbe, host: str) -> tuple[bool, str]:
    """Probe the app at `host`; (success, what happened)."""
    try:
        return await asyncio.wait_for(_probe(p, host), p.timeout_s)
    except TimeoutError:
        return False, f"no answer within {p.timeout_s:g} s"
    except (OSError, ValueError, grpc.aio.AioRpcError) as e:
        return False, f"{type(e).__name__}: {e}"


async def _probe(p: AppProbe, host: str) -> tuple[bool, str]:
    if p.kind == "grpc":
        async with grpc.aio.insecure_channel(f"{host}:{p.port}") as channel:
            answer = await channel.unary_unary("/grpc.health.v1.Health/Check")(grpc_health_request(p.service))
        return grpc_serving(answer), "SERVING" if grpc_serving(answer) else "not SERVING"
    context = None
    if p.kind == "httpGet" and p.scheme == "HTTPS":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(host, p.port, ssl=context)
    try:
        if p.kind == "tcpSocket":
            return True, "connected"
        headers = "".join(f"{k}: {v}\r\n" for k, v in p.headers)
        if not any(k.lower() == "host" for k, _ in p.headers):
            headers += f"host: {host}:{p.port}\r\n"
        writer.write(f"GET {p.path} HTTP/1.1\r\n{headers}user-agent: {USER_AGENT}\r\nconnection: close\r\n\r\n"
                     .encode())
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.decode("latin-1").split(" ", 2)
        code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        return 200 <= code < 400, f"HTTP {code}" if code else "not an HTTP answer"
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
