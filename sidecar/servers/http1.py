"""A minimal HTTP/1.1 server on asyncio + httptools: the ext_authz fast path and the admin port.

Why not a framework: Envoy's HTTP ext_authz transport needs exactly one thing, a
status line and a few headers per request on a keep-alive connection, at ~15k
requests per second from one Python process. Measured on this machine kind, ASGI
servers add tens of µs per request of framing we do not need, while asyncio with
the httptools parser (the one uvicorn uses) under uvloop reaches Envoy's native
jwt_authn rate. So: httptools parses, this module frames, and it stays small, fuzzed
(tests/unit/test_fuzz.py) and guarded against Slowloris (tests/unit/test_slowloris.py).

Handlers return a response synchronously on the fast path, or an awaitable when
they need I/O; while one is pending the connection stops reading, so responses
stay in request order.

A `ConnectionGuard` per server bounds what a client that never finishes can hold:
a request must arrive whole within HEADER_TIMEOUT_S of its first byte, and a new
connection's first request within HEADER_TIMEOUT_S of the connection (else 408 and
close), an idle connection (between requests) is closed after IDLE_TIMEOUT_S, and at most
MAX_CONNECTIONS are open (further ones are closed at once). Checked by one sweep a
second, not a timer per request: the hot path only reads a cached clock.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import cast

import httptools

log = logging.getLogger("meshward.sidecar.http")

# Envoy's own default limit for request headers is 60 KiB; beyond that a request is not from Envoy.
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 128
# ext_authz is configured without the request body; a small body is tolerated and ignored.
MAX_BODY_BYTES = 64 * 1024
# Envoy sends the same header names on every request of a connection: their lowercased
# text is remembered per connection (~0.07 µs a header instead of lower + decode), up to
# this many distinct names so a client cannot grow it without bound.
MAX_REMEMBERED_NAMES = 256
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
# Envoy sends a whole check request at once; 10 s to finish one is generous for any honest client and
# frees what a Slowloris client holds (300 half-sent connections used to hold the agent for ever).
HEADER_TIMEOUT_S = 10.0
# Envoy reuses its connections to the agent; one idle this long is a leftover (Envoy reconnects at once).
IDLE_TIMEOUT_S = 120.0
# Far above what one Envoy opens (a few per worker), far below the file descriptors a container gets.
MAX_CONNECTIONS = 1024
# How often the guard sweeps connections; also the precision of both timeouts.
SWEEP_S = 1.0


@dataclass(slots=True)
class Request:
    """One parsed request; header names lowercase, repeated headers joined with ', '."""

    method: str
    target: str
    headers: dict[str, str]
    # From this pod: a Unix socket, or TCP from a loopback address (the admin port's details are for these only).
    local: bool = False


@dataclass(slots=True)
class Response:
    """A response to frame; `head`, when set, is its status line and headers already serialized."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    head: bytes = b""


Handler = Callable[[Request], "Response | Awaitable[Response]"]


class ConnectionGuard:
    """Bounds connections per server: a head timeout, an idle timeout, and a maximum number."""

    def __init__(self, header_timeout_s: float = HEADER_TIMEOUT_S, idle_timeout_s: float = IDLE_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS, sweep_s: float = SWEEP_S) -> None:
        self.header_timeout_s = header_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.sweep_s = sweep_s
        self.connections: set[_Protocol] = set()
        self.refused = 0
        self.timed_out = 0
        self.now = 0.0  # the loop's clock, refreshed by every sweep

    def start(self, server: asyncio.Server) -> None:
        """Sweep every `sweep_s` seconds while `server` serves."""
        loop = asyncio.get_running_loop()
        self.now = loop.time()

        def sweep() -> None:
            self.now = loop.time()
            for conn in list(self.connections):
                conn.check(self.now, self)
            if server.is_serving():
                loop.call_later(self.sweep_s, sweep)

        loop.call_later(self.sweep_s, sweep)

    def admit(self, conn: _Protocol) -> bool:
        """Register a new connection, or refuse it when the limit is reached."""
        if len(self.connections) >= self.max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("connection refused: %d open (limit %d); %d refused so far", len(self.connections),
                            self.max_connections, self.refused)
            return False
        self.connections.add(conn)
        return True


def head(status: int, headers: list[tuple[str, str]]) -> bytes:
    """Serialize a status line and headers (values must already be free of CR/LF)."""
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
    for name, value in headers:
        parts.append(f"{name}: {value}\r\n".encode("latin-1", "replace"))
    return b"".join(parts)


# The end of the head of an allow (no body) on a kept-alive connection, the common case.
_EMPTY_KEEP_ALIVE = b"content-length: 0\r\n\r\n"


def frame(resp: Response, keep_alive: bool) -> bytes:
    """Serialize a response."""
    start = resp.head or head(resp.status, resp.headers)
    if keep_alive and not resp.body:
        return start + _EMPTY_KEEP_ALIVE
    return b"".join((start, b"content-length: %d\r\n" % len(resp.body),
                     b"\r\n" if keep_alive else b"connection: close\r\n\r\n", resp.body))


class _Protocol(asyncio.Protocol):
    """One connection."""

    def __init__(self, handler: Handler, guard: ConnectionGuard | None = None) -> None:
        self._handler = handler
        self._guard = guard = guard or ConnectionGuard()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._reset()
        self._pending: asyncio.Task[None] | None = None
        self._limit_status = 0
        self._names: dict[bytes, str] = {}
        # When the current request's first byte arrived (None: between requests), and the last activity. A new
        # connection counts as a request begun: one that never sends a byte gets the head timeout, not the idle
        # one (1,100 silent connections otherwise held every slot for 120 s).
        self._busy_since: float | None = guard.now
        self._last_active = guard.now
        self._local = False

    def _reset(self) -> None:
        self._url = b""
        # Raw (name, value) pairs, decoded into a dict once per request in on_message_complete.
        self._raw: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._body_bytes = 0

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._local = is_local_peer(transport.get_extra_info("peername"))
        if not self._guard.admit(self):
            self._transport.close()
            self._transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._guard.connections.discard(self)
        if self._pending is not None:
            self._pending.cancel()

    def check(self, now: float, guard: ConnectionGuard) -> None:
        """The guard's sweep: answer 408 to a request that is taking too long, close a long-idle connection."""
        if self._transport is None or self._pending is not None:
            return
        if self._busy_since is not None:
            if now - self._busy_since > guard.header_timeout_s:
                guard.timed_out += 1
                self._fail(408)
        elif now - self._last_active > guard.idle_timeout_s:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._busy_since is None:
            self._busy_since = self._guard.now
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400)
        except (httptools.HttpParserError, _TooLarge):
            # httptools wraps exceptions raised in callbacks; the limit that tripped is remembered.
            self._fail(self._limit_status or 400)

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called once per header: kept to an append (decoding them together costs less).
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES or len(self._raw) >= MAX_HEADERS:
            self._limit_status = 431
            raise _TooLarge
        self._raw.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY_BYTES:
            self._limit_status = 413
            raise _TooLarge

    def on_message_complete(self) -> None:
        req = Request(self._parser.get_method().decode("latin-1"), self._url.decode("latin-1"),
                      _headers(self._raw, self._names), self._local)
        keep_alive = self._parser.should_keep_alive()
        self._reset()
        self._busy_since = None
        self._last_active = self._guard.now
        try:
            result = self._handler(req)
        except Exception:
            log.exception("handler failed")
            result = Response(503)
        if isinstance(result, Response):
            self._send(result, keep_alive)
            return
        assert self._transport is not None
        self._transport.pause_reading()
        self._pending = asyncio.ensure_future(self._later(result, keep_alive))

    async def _later(self, result: Awaitable[Response], keep_alive: bool) -> None:
        try:
            resp = await result
        except Exception:
            log.exception("handler failed")
            resp = Response(503)
        self._pending = None
        self._send(resp, keep_alive)
        if self._transport is not None and keep_alive:
            self._transport.resume_reading()

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES:
            self._limit_status = 431
            raise _TooLarge

    def _send(self, resp: Response, keep_alive: bool) -> None:
        if self._transport is None:
            return
        self._transport.write(frame(resp, keep_alive))
        if not keep_alive:
            self._transport.close()

    def _fail(self, status: int) -> None:
        if self._transport is not None:
            self._transport.write(frame(Response(status), keep_alive=False))
            self._transport.close()


def is_local_peer(peer: object) -> bool:
    """Whether a connection's peer (asyncio's `peername`) is this pod: a Unix socket, or a loopback address."""
    if not isinstance(peer, tuple):
        return True  # a Unix socket's peer has no address ('' or None)
    try:
        ip = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _headers(raw: list[tuple[bytes, bytes]], names: dict[bytes, str]) -> dict[str, str]:
    """Header names lowercased (through `names`); a repeated header's values joined with ', ' in order."""
    headers: dict[str, str] = {}
    for name, value in raw:
        key = names.get(name)
        if key is None:
            key = name.lower().decode("latin-1")
            if len(names) < MAX_REMEMBERED_NAMES:
                names[name] = key
        text = value.decode("latin-1")
        prev = headers.get(key)
        headers[key] = text if prev is None else f"{prev}, {text}"
    return headers


class _TooLarge(Exception):
    """A request exceeded a limit; the protocol answers with `status` and closes."""


async def serve_tcp(handler: Handler, host: str, port: int, guard: ConnectionGuard | None = None) -> asyncio.Server:
    """Listen on host:port."""
    guard = guard or ConnectionGuard()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Protocol(handler, guard), host, port, reuse_address=True,
                                      backlog=1024)
    guard.start(server)
    return server


async def serve_unix(handler: Handler, path: str, guard: ConnectionGuard | None = None) -> asyncio.Server:
    """Listen on a Unix socket (removed first if stale)."""
    guard = guard or ConnectionGuard()
    if os.path.exists(path):
        os.unlink(path)
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: _Protocol(handler, guard), path, backlog=1024)
    guard.start(server)
    return server
