"""Slowloris against the agent's HTTP/1.1 ext_authz server: half-sent requests and idle connections cannot hold it.

Real sockets on loopback against the real server (asyncio + httptools); the guard's timeouts are shortened
to a second so the test runs in seconds, the mechanism is the one the agent runs with.
"""

from __future__ import annotations

import asyncio
import socket

from meshward.sidecar.servers.http1 import ConnectionGuard, Request, Response, serve_tcp


def _ok(_req: Request) -> Response:
    return Response(200)


async def _check(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /check HTTP/1.1\r\nhost: authz\r\n\r\n")
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    return int(line.split()[1])


async def _closed_by_server(sock: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing `sock`, or None if it is still open after `within` seconds."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    data = b""
    try:
        async with asyncio.timeout(within):
            while True:
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    return data
                data += chunk
    except TimeoutError:
        return None


def test_slowloris_half_sent_requests_are_cut_and_real_checks_keep_flowing() -> None:
    """300 connections that never finish their headers: a real check on Envoy's existing connection and on a new
    one is answered at once, and every half-sent connection gets 408 and is closed within the head timeout."""

    async def go() -> None:
        guard = ConnectionGuard(header_timeout_s=1.0, idle_timeout_s=60, sweep_s=0.2)
        server = await serve_tcp(_ok, "127.0.0.1", 0, guard)
        port = server.sockets[0].getsockname()[1]
        try:
            envoy_reader, envoy_writer = await asyncio.open_connection("127.0.0.1", port)
            attackers = []
            for _ in range(300):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(b"GET /x HTTP/1.1\r\nhost: authz\r\nx-slow: ")
                attackers.append(s)
            envoy_writer.write(b"GET /check HTTP/1.1\r\nhost: authz\r\n\r\n")
            await envoy_writer.drain()
            assert (await asyncio.wait_for(envoy_reader.readline(), 5)).startswith(b"HTTP/1.1 200")
            assert await _check(port) == 200
            answers = await asyncio.gather(*(_closed_by_server(s, 5) for s in attackers))
            assert all(a is not None and a.startswith(b"HTTP/1.1 408") for a in answers), answers[:3]
            assert guard.timed_out >= 300
            await asyncio.sleep(0)
            assert await _check(port) == 200
            envoy_writer.close()
        finally:
            server.close()

    asyncio.run(go())


def test_connections_beyond_the_limit_are_closed_at_once_and_slots_come_back() -> None:
    async def go() -> None:
        guard = ConnectionGuard(header_timeout_s=1.0, idle_timeout_s=60, max_connections=20, sweep_s=0.2)
        server = await serve_tcp(_ok, "127.0.0.1", 0, guard)
        port = server.sockets[0].getsockname()[1]
        try:
            held = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
            for s in held:
                s.sendall(b"GET /x HTTP/1.1\r\n")
            extra = socket.create_connection(("127.0.0.1", port))
            assert await _closed_by_server(extra, 5) == b""  # closed at once, nothing sent
            assert guard.refused >= 1
            # The held ones time out (408), their slots return, and checks are answered again.
            await asyncio.gather(*(_closed_by_server(s, 5) for s in held))
            assert await _check(port) == 200
        finally:
            server.close()

    asyncio.run(go())


def test_idle_connections_are_closed() -> None:
    async def go() -> None:
        guard = ConnectionGuard(header_timeout_s=5, idle_timeout_s=0.5, sweep_s=0.2)
        server = await serve_tcp(_ok, "127.0.0.1", 0, guard)
        port = server.sockets[0].getsockname()[1]
        try:
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
            answer = await _closed_by_server(s, 5)
            assert answer is not None and answer.startswith(b"HTTP/1.1 200")
            assert not guard.connections
        finally:
            server.close()

    asyncio.run(go())


def test_silent_connections_get_the_head_timeout_not_the_idle_one() -> None:
    """Connections that send nothing at all were idle connections (120 s), not half-sent requests (10 s): 1,100 of
    them from inside the pod held all 1,024 slots and Envoy's checks were reset. A connection's first request
    must begin and end within the head timeout; the slots come back and checks flow."""

    async def go() -> None:
        guard = ConnectionGuard(header_timeout_s=1.0, idle_timeout_s=60, max_connections=20, sweep_s=0.2)
        server = await serve_tcp(_ok, "127.0.0.1", 0, guard)
        port = server.sockets[0].getsockname()[1]
        try:
            silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(25)]  # 5 beyond the limit
            answers = await asyncio.gather(*(_closed_by_server(s, 5) for s in silent))
            assert all(a is not None for a in answers), "every silent connection is closed within the head timeout"
            assert await _check(port) == 200
        finally:
            server.close()

    asyncio.run(go())


def test_a_kept_alive_connection_between_checks_still_gets_the_idle_timeout() -> None:
    """Envoy's own connection, silent between two checks for longer than the head timeout, is not cut."""

    async def go() -> None:
        guard = ConnectionGuard(header_timeout_s=0.5, idle_timeout_s=60, sweep_s=0.1)
        server = await serve_tcp(_ok, "127.0.0.1", 0, guard)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(2):
                writer.write(b"GET /check HTTP/1.1\r\nhost: authz\r\n\r\n")
                await writer.drain()
                assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
                deadline = asyncio.get_running_loop().time() + 1.2  # the head timeout and two sweeps
                while guard.now < deadline:
                    await asyncio.sleep(0.1)
            writer.close()
        finally:
            server.close()

    asyncio.run(go())
