"""A bounded cache of verified tokens, so a hot token pays its signature check once.

Keyed by SHA-256 of the raw token (the raw token is never a key or a log field).
An entry is used only while the token has not expired and while its issuer's key
set is the one it was verified with: a key the IdP removed stops validating
cached tokens at the next JWKS fetch. Revocation is checked on every request,
outside the cache.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

from meshward.sidecar.domain.jwt import VerifiedToken


class TokenCache:
    """LRU of verified tokens bounded by entry count."""

    def __init__(self, size: int, clock: Callable[[], float], generation: Callable[[str], int]) -> None:
        self._size = size
        self._clock = clock
        self._generation = generation
        self._entries: OrderedDict[bytes, tuple[VerifiedToken, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(token: str) -> bytes:
        """The cache key of a raw token."""
        return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()

    def get(self, key: bytes) -> VerifiedToken | None:
        """The cached verification, if still valid."""
        hit = self._entries.get(key)
        if hit is None:
            return None
        token, gen = hit
        if token.expires_at <= self._clock() or gen != self._generation(token.issuer):
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return token

    def put(self, key: bytes, token: VerifiedToken) -> None:
        """Remember a verified token, evicting the least recently used beyond the bound."""
        if self._size <= 0:
            return
        self._entries[key] = (token, self._generation(token.issuer))
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget everything (config reload)."""
        self._entries.clear()
