"""HTTP(S) GETs for JWKS and OIDC discovery documents, off the event loop.

Why stdlib http.client in a worker thread rather than aiohttp: fetches are rare
(minutes apart, or a rate-limited refetch), and aiohttp costs ~25 MB of RSS in
every sidecar. The event loop never blocks: each GET runs in `asyncio.to_thread`
with a timeout. Redirects are refused (a JWKS location must be configured, not
discovered by following hops), and documents are size-bounded.
"""

from __future__ import annotations

import asyncio
import http.client
import ssl
from urllib.parse import urlsplit

from meshward.sidecar.clients.errors import FetchError

# A JWKS or discovery document is small; anything bigger is refused, not buffered.
MAX_DOCUMENT_BYTES = 1 << 20


class HttpFetcher:
    """Fetches documents; TLS contexts are built once per CA file."""

    def __init__(self) -> None:
        self._contexts: dict[str | None, ssl.SSLContext] = {}

    def _ssl(self, ca_file: str | None) -> ssl.SSLContext:
        ctx = self._contexts.get(ca_file)
        if ctx is None:
            ctx = self._contexts[ca_file] = ssl.create_default_context(cafile=ca_file)
        return ctx

    def _get(self, url: str, ca_file: str | None, timeout: float) -> bytes:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise FetchError(f"GET {url}: not an http(s) URL")
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                               context=self._ssl(ca_file))
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("GET", path, headers={"accept": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise FetchError(f"GET {url}: HTTP {resp.status}")
            body = resp.read(MAX_DOCUMENT_BYTES + 1)
            if len(body) > MAX_DOCUMENT_BYTES:
                raise FetchError(f"GET {url}: document larger than {MAX_DOCUMENT_BYTES} bytes")
            return body
        except (OSError, http.client.HTTPException, ssl.SSLError) as e:
            raise FetchError(f"GET {url}: {type(e).__name__}: {e}") from e
        finally:
            conn.close()

    async def get(self, url: str, *, ca_file: str | None, timeout: float) -> bytes:
        """Return the body of a 200 response, or raise FetchError."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._get, url, ca_file, timeout), timeout + 1)
        except TimeoutError as e:
            raise FetchError(f"GET {url}: timed out after {timeout:g} s") from e

    async def close(self) -> None:
        """Nothing to release (connections are per request)."""
