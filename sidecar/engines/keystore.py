"""The JWKS key store: keys fetched off the hot path, kept through IdP outages, never failing open.

Why: the hot path must look keys up with a dict access, never wait on the network
for a known key, and never accept a token because the IdP is unreachable.
- Each issuer's keys are fetched before the sidecar reports ready (discovery via
  `/.well-known/openid-configuration` when no `jwksUri` is configured) and
  refreshed on a schedule; keys given inline (`jwks`) are read from the config.
- A token with an unknown `kid` triggers one refetch per issuer at most every
  `minRefetchSeconds` (a flood of random kids cannot hammer the IdP); requests
  wait on that single in-flight fetch, never start their own.
- A failed fetch keeps the last good key set (an outage is not a reason to deny
  valid tokens, nor to accept invalid ones); an empty or unparseable JWKS is a
  failed fetch too. Keys removed by the IdP are gone after the next fetch.
- Every change bumps the issuer's generation, which invalidates cached tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives import serialization

from meshward.sidecar.clients.errors import FetchError
from meshward.sidecar.config.schema import Issuer, JwksSettings, url_problem
from meshward.sidecar.domain.jwt import PublicKey, parse_jwks

log = logging.getLogger("meshward.sidecar.jwks")


class Fetcher(Protocol):
    """Fetches a URL's body (the client layer implements it)."""

    async def get(self, url: str, *, ca_file: str | None, timeout: float) -> bytes:
        """Return the body of a 200 response or raise FetchError."""
        ...


@dataclass
class IssuerKeys:
    """One issuer's current keys and fetch bookkeeping."""

    issuer: Issuer
    by_kid: dict[str, list[PublicKey]] = field(default_factory=dict)
    keys: list[PublicKey] = field(default_factory=list)
    generation: int = 0
    loaded: bool = False
    last_attempt: float = float("-inf")
    # Rate limit of unknown-kid refetches, counted apart from scheduled refreshes: a refresh
    # that ran just before the IdP published a new key must not delay that key's first use.
    last_kid_refetch: float = float("-inf")
    last_success: float | None = None
    last_error: str = ""
    jwks_uri: str | None = None
    inflight: asyncio.Future[bool] | None = None


class KeyStore:
    """Holds every configured issuer's verification keys."""

    def __init__(self, issuers: Mapping[str, Issuer], settings: JwksSettings, fetcher: Fetcher,
                 clock: Callable[[], float], on_fetch: Callable[[str, bool], None] = lambda _i, _ok: None,
                 rng: random.Random | None = None) -> None:
        self._settings = settings
        self._fetcher = fetcher
        self._clock = clock
        self._on_fetch = on_fetch
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._issuers: dict[str, IssuerKeys] = {}
        # Set when a reload adds an issuer: its keys are fetched at once, not at the next scheduled refresh.
        self._new_issuer = asyncio.Event()
        self.update(issuers, settings)

    # ------------------------------------------------------------------ hot path (sync)

    def keys_of(self, issuer: str, kid: str | None) -> list[PublicKey] | None:
        """Keys for `kid` (every key when kid is None), or None when unknown or not loaded."""
        st = self._issuers.get(issuer)
        if st is None or not st.loaded:
            return None
        if kid is None:
            return st.keys
        return st.by_kid.get(kid)

    def generation(self, issuer: str) -> int:
        """A number that changes whenever the issuer's key set changes."""
        st = self._issuers.get(issuer)
        return st.generation if st else -1

    def loaded(self, issuer: str) -> bool:
        """Whether the issuer's keys were fetched at least once."""
        st = self._issuers.get(issuer)
        return bool(st and st.loaded)

    def may_refetch(self, issuer: str) -> bool:
        """Whether an unknown kid may trigger a refetch now (one in flight, or none within minRefetchSeconds)."""
        st = self._issuers.get(issuer)
        if st is None:
            return False
        return st.inflight is not None or self._clock() - st.last_kid_refetch >= self._settings.min_refetch_s

    @property
    def ready(self) -> bool:
        """True once every issuer's keys were fetched at least once."""
        return all(st.loaded for st in self._issuers.values())

    def status(self) -> dict[str, dict[str, object]]:
        """Per-issuer state for the readiness endpoint."""
        return {i: {"loaded": st.loaded, "keys": len(st.keys), "last_error": st.last_error}
                for i, st in self._issuers.items()}

    # ---------------------------------------------------------------------- updates

    def update(self, issuers: Mapping[str, Issuer], settings: JwksSettings) -> None:
        """Adopt a new issuer set (config reload): keep keys of issuers whose definition is unchanged."""
        self._settings = settings
        new: dict[str, IssuerKeys] = {}
        for name, cfg in issuers.items():
            old = self._issuers.get(name)
            if old is not None and old.issuer.jwks_uri == cfg.jwks_uri and old.issuer.ca_file == cfg.ca_file \
                    and old.issuer.jwks == cfg.jwks:
                old.issuer = cfg
                new[name] = old
            else:
                new[name] = IssuerKeys(cfg)
                self._new_issuer.set()
        self._issuers = new

    async def refresh(self, issuer: str) -> bool:
        """Fetch the issuer's keys now (single-flight); True when a good key set was installed."""
        st = self._issuers.get(issuer)
        if st is None:
            return False
        if st.inflight is not None:
            return await asyncio.shield(st.inflight)
        loop = asyncio.get_running_loop()
        st.inflight = loop.create_future()
        ok = False
        try:
            ok = await self._fetch(st)
        finally:
            fut, st.inflight = st.inflight, None
            fut.set_result(ok)
        return ok

    async def refetch_for_unknown_kid(self, issuer: str, kid: str | None = None) -> bool:
        """Refetch because a token named an unknown kid, unless such a refetch ran within minRefetchSeconds.

        A fetch already in flight is joined first; if it brought the kid, no new fetch is made.
        """
        st = self._issuers.get(issuer)
        if st is None:
            return False
        if st.inflight is not None:
            await asyncio.shield(st.inflight)
            if kid is not None and kid in st.by_kid:
                return True
        if self._clock() - st.last_kid_refetch < self._settings.min_refetch_s:
            return False
        st.last_kid_refetch = self._clock()
        return await self.refresh(issuer)

    async def _fetch(self, st: IssuerKeys) -> bool:
        st.last_attempt = self._clock()
        timeout = self._settings.timeout_s
        try:
            if st.issuer.jwks is not None:  # keys inline in the config: nothing to fetch
                uri = "the inline jwks"
                keys = parse_jwks(st.issuer.jwks.encode())
            else:
                uri = st.issuer.jwks_uri or st.jwks_uri or await self._discover(st, timeout)
                keys = parse_jwks(await self._fetcher.get(uri, ca_file=st.issuer.ca_file, timeout=timeout))
            if not keys:
                raise FetchError(f"JWKS at {uri} has no usable signature keys")
        except (FetchError, ValueError) as e:
            st.last_error = str(e)[:300]
            log.warning("JWKS fetch for %s failed, keeping %d last good keys: %s", st.issuer.issuer,
                        len(st.keys), st.last_error)
            self._on_fetch(st.issuer.issuer, False)
            return False
        by_kid: dict[str, list[PublicKey]] = {}
        for k in keys:
            if k.kid is not None:
                by_kid.setdefault(k.kid, []).append(k)
        changed = [(k.kid, k.kty, k.curve, _fingerprint(k)) for k in keys] != \
                  [(k.kid, k.kty, k.curve, _fingerprint(k)) for k in st.keys]
        st.by_kid, st.keys = by_kid, keys
        if changed:
            st.generation += 1
        st.loaded = True
        st.last_success = self._clock()
        st.last_error = ""
        self._on_fetch(st.issuer.issuer, True)
        return True

    async def _discover(self, st: IssuerKeys, timeout: float) -> str:
        url = st.issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            doc = json.loads(await self._fetcher.get(url, ca_file=st.issuer.ca_file, timeout=timeout))
        except ValueError as e:
            raise FetchError(f"OIDC discovery at {url} is not JSON") from e
        if not isinstance(doc, dict) or doc.get("issuer") != st.issuer.issuer:
            found = doc.get("issuer") if isinstance(doc, dict) else None
            raise FetchError(f"OIDC discovery at {url} names issuer {found!r}, not the configured "
                             f"{st.issuer.issuer!r}; configure the issuer exactly as the IdP spells it "
                             "(a trailing slash counts)")
        uri = doc.get("jwks_uri")
        if not isinstance(uri, str):
            raise FetchError(f"OIDC discovery at {url} has no jwks_uri")
        problem = url_problem(uri)
        if problem:
            # The same rules as a configured jwksUri: the discovery document is no more trusted than config.
            raise FetchError(f"OIDC discovery at {url}: jwks_uri {uri!r} {problem}")
        st.jwks_uri = uri
        return uri

    async def run(self) -> None:
        """Load every issuer, then refresh on schedule (with ±10% jitter) until cancelled."""
        while True:
            self._new_issuer.clear()
            issuers = list(self._issuers)
            results = await asyncio.gather(*(self.refresh(i) for i in issuers), return_exceptions=True)
            for issuer, r in zip(issuers, results, strict=True):
                if isinstance(r, Exception):  # a bug must not end refreshes; the last good keys stay
                    log.error("refreshing the keys of %s failed; keeping the last good ones", issuer, exc_info=r)
            pending = [i for i, st in self._issuers.items() if not st.loaded]
            # Until every issuer has keys, retry quickly (bounded by minRefetchSeconds).
            delay = (self._settings.min_refetch_s if pending else self._settings.refresh_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_issuer.wait(), delay * self._rng.uniform(0.9, 1.1))


def _fingerprint(k: PublicKey) -> int:
    return hash(k.key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
