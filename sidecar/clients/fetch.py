"""HTTP(S) GETs for JWKS and OIDC discovery documents (aiohttp, never blocking the event loop)."""

from __future__ import annotations

import ssl

import aiohttp

from meshward.sidecar.clients.errors import FetchError

# A JWKS or discovery document is small; anything bigger is refused, not buffered.
MAX_DOCUMENT_BYTES = 1 << 20


class HttpFetcher:
    """Fetches documents over one shared aiohttp session."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._contexts: dict[str | None, ssl.SSLContext] = {}

    def _ssl(self, ca_file: str | None) -> ssl.SSLContext:
        ctx = self._contexts.get(ca_file)
        if ctx is None:
            ctx = ssl.create_default_context(cafile=ca_file)
            self._contexts[ca_file] = ctx
        return ctx

    async def get(self, url: str, *, ca_file: str | None, timeout: float) -> bytes:
        """Return the body of a 200 response, or raise FetchError."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
        try:
            async with self._session.get(url, ssl=self._ssl(ca_file) if url.startswith("https") else False,
                                         timeout=aiohttp.ClientTimeout(total=timeout),
                                         allow_redirects=False) as resp:
                if resp.status != 200:
                    raise FetchError(f"GET {url}: HTTP {resp.status}")
                body = await resp.content.read(MAX_DOCUMENT_BYTES + 1)
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise FetchError(f"GET {url}: document larger than {MAX_DOCUMENT_BYTES} bytes")
                return body
        except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError) as e:
            raise FetchError(f"GET {url}: {type(e).__name__}: {e}") from e

    async def close(self) -> None:
        """Close the session."""
        if self._session is not None:
            await self._session.close()
