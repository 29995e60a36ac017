"""Context tokens on the hot path: the workload's minting key, and caches so hot users pay no signature.

The key and the trust roots come from the workload certificate the agent holds
(engines/certificate.py): parsed once per certificate and once per bundle, never
written anywhere. A minter's `x5c` chain is checked once per bundle (its leaf's
validity at every use), so a new token from a known minter costs one signature check
(measured: ~145 µs of ~310 µs). Hop proofs verified once are remembered by their digest
(which the chain computes anyway) for this bundle, their certificate's validity re-checked:
a proof travels on in every later token of its chain, and the app's token brings back to
the exchange the proofs its inbound check verified, so the exchange checks none again.
Verified tokens are cached by the SHA-256 of the raw token (the
binding to the peer, the audience and the expiry are re-checked on every hit, and a
new trust bundle empties the cache); minted tokens are cached per (what they were
minted from, audience) for at most half their life, so the receiver always has at
least half of it left. A token for a namespace (`.../sa/*`, docs/context-tokens.md) is cached
like any other: its key is what it was minted from and the destination as Envoy names it
(which fixes both its audience and its claims), and a hit re-checks the audience it names.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from meshward.sidecar.domain.certificate import WorkloadCert
from meshward.sidecar.domain.context import (
    ContextToken,
    MintingKey,
    chain_leaf,
    check_binding,
    check_unexpired,
    mint,
    roots_of,
    verify_context,
    verify_proof,
    x5c_of,
)

# Distinct users (or exchanges) remembered per cache; beyond that the least recently used are minted again.
DEFAULT_CACHE_SIZE = 4096
# Minting certificates remembered: a workload's callers are a handful of workloads, each a few pods.
CHAIN_CACHE_SIZE = 256
# Hop proofs remembered: about one per user and hop before this one per half lifetime, like the tokens.
PROOF_CACHE_SIZE = DEFAULT_CACHE_SIZE


class ContextKeys:
    """The workload's minting key and the mesh roots, from its current certificate."""

    def __init__(self, current: Callable[[], WorkloadCert | None]) -> None:
        self._current = current
        self._key: tuple[int, MintingKey] | None = None
        self._roots: tuple[bytes, tuple[x509.Certificate, ...]] = (b"", ())
        self.generation = 0  # moves when the trust bundle changes

    def minting(self) -> MintingKey | None:
        """The key to sign with, or None while the workload has no certificate."""
        cert = self._current()
        if cert is None:
            return None
        if self._key is None or self._key[0] != cert.serial:
            key = load_pem_private_key(cert.key_pem, password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise TypeError("the workload key is not an EC key")  # never: domain/certificate.py makes P-256 keys
            self._key = (cert.serial, MintingKey(cert.spiffe_id, key, x5c_of(cert.chain_pem),
                                                 cert.not_after.timestamp()))
        return self._key[1]

    def roots(self) -> tuple[x509.Certificate, ...]:
        """The trust bundle's certificates (old and new roots during a CA rotation)."""
        cert = self._current()
        bundle = cert.bundle_pem if cert is not None else b""
        if bundle != self._roots[0]:
            self._roots = (bundle, roots_of(bundle))
            self.generation += 1
        return self._roots[1]

    @property
    def spiffe_id(self) -> str | None:
        """The workload's SPIFFE ID, once it holds a certificate."""
        cert = self._current()
        return cert.spiffe_id if cert is not None else None


@dataclass(frozen=True, slots=True)
class Minted:
    """A minted token and until when a cache may hand it out."""

    token: str
    refresh_at: float


class _Lru:
    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
        return hit

    def put(self, key: Any, value: Any) -> None:
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


class ContextService:
    """Verifies and mints context tokens for one workload, with bounded caches."""

    def __init__(self, keys: ContextKeys, clock: Callable[[], float], cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        """Serve one config with `keys` (shared by every config's service) and the clock `clock`."""
        self.keys = keys
        self._clock = clock
        self._verified = _Lru(cache_size)
        self._minted = _Lru(cache_size)
        self._chains = _Lru(CHAIN_CACHE_SIZE)
        self._proofs = _Lru(PROOF_CACHE_SIZE)
        self._generation = -1

    def _leaf(self, x5c: Any, roots: Sequence[x509.Certificate], now: float) -> x509.Certificate:
        """`chain_leaf`, remembered per x5c for this bundle; the leaf's validity is checked at every use."""
        key = tuple(x5c) if isinstance(x5c, list) and all(isinstance(c, str) for c in x5c) else None
        hit: x509.Certificate | None = self._chains.get(key) if key is not None else None
        if hit is not None and hit.not_valid_before_utc.timestamp() <= now <= hit.not_valid_after_utc.timestamp():
            return hit
        leaf = chain_leaf(x5c, roots, now)
        if key is not None:
            self._chains.put(key, leaf)
        return leaf

    def _proof(self, raw: str, digest: str, roots: Sequence[x509.Certificate], now: float) -> Mapping[str, Any]:
        """`verify_proof`, remembered by the proof's digest for this bundle; its certificate's validity at every use."""
        hit: tuple[Mapping[str, Any], x509.Certificate] | None = self._proofs.get(digest)
        if hit is not None and hit[1].not_valid_before_utc.timestamp() <= now <= hit[1].not_valid_after_utc.timestamp():
            return hit[0]
        verified = verify_proof(raw, roots, now, self._leaf)
        self._proofs.put(digest, verified)
        return verified[0]

    def verify(self, raw: str, key: bytes, peer: str | None, audience: str, namespace_ok: bool = False
               ) -> tuple[ContextToken, dict[str, Any]]:
        """A context token from `peer` for `audience` (or its namespace, with `namespace_ok`), and a memo.

        The memo lives as long as the cache entry. `key` is the token's TokenCache.key (callers need it too: it
        is computed once). Raises ContextError naming the failed check.
        """
        roots = self.keys.roots()
        if self._generation != self.keys.generation:
            self._verified.entries.clear()
            self._chains.entries.clear()
            self._proofs.entries.clear()
            self._generation = self.keys.generation
        now = self._clock()
        hit: tuple[ContextToken, dict[str, Any]] | None = self._verified.get(key)
        if hit is not None:
            check_binding(hit[0].minter, hit[0].audience, peer, audience, namespace_ok)
            check_unexpired(hit[0].expires_at, now)
            return hit
        verified: tuple[ContextToken, dict[str, Any]] = (verify_context(raw, peer, audience, roots, now, self._leaf,
                                                                                self._proof, namespace_ok),
                                                         {})
        self._verified.put(key, verified)
        return verified

    def mint(self, source: bytes, audience: str, user_issuer: str, claims: Mapping[str, Any], act: Sequence[str],
             jti: str, ttl_s: float, not_after: float | None = None, proofs: Sequence[str] = ()) -> Minted | None:
        """A token for `audience` minted from `source` (a token key), cached for half its life; None without a key.

        One service serves one config: what a token carries (its claims, `act`, `proofs`: domain.context.mint)
        follows from its source, audience and the config.
        """
        key = self.keys.minting()
        if key is None:
            return None
        now = self._clock()
        cache_key = (source, audience, key.x5c[0])  # a new certificate (so a new key) mints anew
        hit: Minted | None = self._minted.get(cache_key)
        if hit is not None and hit.refresh_at > now:
            return hit
        token, exp = mint(key, audience, user_issuer, claims, act, jti, now, ttl_s, not_after, proofs)
        minted = Minted(token, now + (exp - now) / 2)
        self._minted.put(cache_key, minted)
        return minted
