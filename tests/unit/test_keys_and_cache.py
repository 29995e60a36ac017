"""The key store against a real HTTPS IdP, the token cache, token sources, and errors that deny."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from meshward.sidecar.clients.fetch import HttpFetcher
from meshward.sidecar.config.schema import Issuer, JwksSettings, TokenSource
from meshward.sidecar.domain.decision import Decision, Outcome
from meshward.sidecar.domain.jwt import VerifiedToken
from meshward.sidecar.domain.snapshot import extract_token
from meshward.sidecar.engines.keystore import KeyStore
from meshward.sidecar.engines.token_cache import TokenCache
from tests.support.idp import IdP
from tests.support.pki import TestCA
from tests.support.sidecar import Clock, config, harness, issuer, pipeline, policy, request


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdP]:
    i = IdP(TestCA(tmp_path_factory.mktemp("pki")))
    yield i
    i.close()


def issuer_cfg(idp: IdP, jwks_uri: str | None) -> Issuer:
    return Issuer(issuer=idp.issuer, audiences=("orders",), jwks_uri=jwks_uri, algorithms=frozenset({"RS256"}),
                  sources=(TokenSource(header="authorization", prefix="Bearer "),), ca_file=idp.ca_file)


def test_oidc_discovery_finds_the_jwks(idp: IdP) -> None:
    store = KeyStore({idp.issuer: issuer_cfg(idp, None)}, JwksSettings(), HttpFetcher(), time.monotonic)
    assert asyncio.run(store.refresh(idp.issuer)) is True
    assert store.ready
    assert store.keys_of(idp.issuer, idp.signer.kid)


def test_tls_to_the_idp_is_verified(idp: IdP) -> None:
    cfg = issuer_cfg(idp, idp.jwks_uri)
    cfg = Issuer(**{**cfg.__dict__, "ca_file": None})
    store = KeyStore({idp.issuer: cfg}, JwksSettings(timeout_s=2), HttpFetcher(), time.monotonic)
    assert asyncio.run(store.refresh(idp.issuer)) is False
    assert "CERTIFICATE_VERIFY_FAILED" in store.status()[idp.issuer]["last_error"]  # type: ignore[operator]
    assert not store.ready


def test_unknown_kid_refetches_are_rate_limited(idp: IdP) -> None:
    clock = Clock(1000.0)
    store = KeyStore({idp.issuer: issuer_cfg(idp, idp.jwks_uri)}, JwksSettings(min_refetch_s=5), HttpFetcher(), clock)

    async def flood() -> list[bool]:
        await store.refresh(idp.issuer)
        before = idp.jwks_requests
        # A scheduled refresh just ran; an unknown kid may still refetch at once (a new key).
        results = [await store.refetch_for_unknown_kid(idp.issuer, f"random-{n}") for n in range(50)]
        assert idp.jwks_requests == before + 1  # then the flood is held to minRefetchSeconds
        clock.now += 5
        results.append(await store.refetch_for_unknown_kid(idp.issuer, "random-x"))
        assert idp.jwks_requests == before + 2
        return results

    results = asyncio.run(flood())
    assert results == [True] + [False] * 49 + [True]


def test_concurrent_refetches_share_one_request(idp: IdP) -> None:
    store = KeyStore({idp.issuer: issuer_cfg(idp, idp.jwks_uri)}, JwksSettings(min_refetch_s=0), HttpFetcher(),
                     time.monotonic)

    async def burst() -> None:
        before = idp.jwks_requests
        assert all(await asyncio.gather(*(store.refresh(idp.issuer) for _ in range(20))))
        assert idp.jwks_requests == before + 1

    asyncio.run(burst())


def test_failed_fetch_keeps_the_last_good_keys(idp: IdP) -> None:
    store = KeyStore({idp.issuer: issuer_cfg(idp, idp.jwks_uri)}, JwksSettings(), HttpFetcher(), time.monotonic)
    assert asyncio.run(store.refresh(idp.issuer))
    gen = store.generation(idp.issuer)
    idp.down = True
    try:
        assert asyncio.run(store.refresh(idp.issuer)) is False
    finally:
        idp.down = False
    assert store.keys_of(idp.issuer, idp.signer.kid)
    assert store.generation(idp.issuer) == gen


def test_an_issuer_added_by_a_reload_gets_its_keys_at_once_not_at_the_next_refresh(idp: IdP) -> None:
    """Regression: a config pushed by the operator added an issuer; its keys waited for the 300 s refresh."""
    async def scenario() -> bool:
        store = KeyStore({}, JwksSettings(refresh_s=300), HttpFetcher(), time.monotonic)
        runner = asyncio.create_task(store.run())
        try:
            await asyncio.sleep(0)  # let the loop start its (long) wait
            store.update({idp.issuer: issuer_cfg(idp, idp.jwks_uri)}, JwksSettings(refresh_s=300))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not store.keys_of(idp.issuer, idp.signer.kid):
                await asyncio.sleep(0.01)
            return bool(store.keys_of(idp.issuer, idp.signer.kid))
        finally:
            runner.cancel()

    assert asyncio.run(scenario())


def test_an_unexpected_error_for_one_issuer_ends_neither_the_refresh_loop_nor_the_others(idp: IdP) -> None:
    """The real HTTP fetcher, wrapped to raise a non-FetchError (a bug) for one URL only."""
    class Buggy:
        def __init__(self) -> None:
            self.calls = 0
            self._real = HttpFetcher()

        async def get(self, url: str, *, ca_file: str | None, timeout: float) -> bytes:
            if url.endswith("/broken"):
                self.calls += 1
                raise RuntimeError("a bug")
            return await self._real.get(url, ca_file=ca_file, timeout=timeout)

    async def scenario() -> tuple[bool, int]:
        broken = Issuer(issuer="https://broken.example", audiences=("orders",), jwks_uri=f"{idp.jwks_uri}/broken",
                        algorithms=frozenset({"RS256"}), sources=(TokenSource(header="authorization", prefix="Bearer "),))
        fetcher = Buggy()
        store = KeyStore({idp.issuer: issuer_cfg(idp, idp.jwks_uri), broken.issuer: broken},
                         JwksSettings(min_refetch_s=0.05), fetcher, time.monotonic)
        runner = asyncio.create_task(store.run())
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and fetcher.calls < 3:  # the loop keeps retrying the broken one
                await asyncio.sleep(0.01)
            return bool(store.keys_of(idp.issuer, idp.signer.kid)) and not runner.done(), fetcher.calls
        finally:
            runner.cancel()

    alive, calls = asyncio.run(scenario())
    assert alive and calls >= 3


def vt(exp: float, issuer: str = "i") -> VerifiedToken:
    return VerifiedToken(issuer=issuer, claims={}, expires_at=exp, subject="s")


def test_token_cache_is_bounded_lru() -> None:
    cache = TokenCache(2, lambda: 0.0, lambda _i: 1)
    for n in range(3):
        cache.put(TokenCache.key(f"t{n}"), vt(100))
    assert len(cache) == 2
    assert cache.get(TokenCache.key("t0")) is None
    assert cache.get(TokenCache.key("t2")) is not None


def test_token_cache_never_serves_past_exp() -> None:
    clock = Clock(99.0)
    cache = TokenCache(10, clock, lambda _i: 1)
    cache.put(TokenCache.key("t"), vt(100))
    assert cache.get(TokenCache.key("t")) is not None
    clock.now = 100.0
    assert cache.get(TokenCache.key("t")) is None


def test_token_cache_drops_entries_when_the_key_set_changes() -> None:
    gen = {"i": 1}
    cache = TokenCache(10, lambda: 0.0, lambda i: gen[i])
    cache.put(TokenCache.key("t"), vt(100))
    gen["i"] = 2
    assert cache.get(TokenCache.key("t")) is None


def test_token_cache_keys_are_hashes_not_tokens() -> None:
    key = TokenCache.key("secret.token.value")
    assert len(key) == 32 and b"secret" not in key


@pytest.mark.parametrize(("sources", "headers", "expected"), [
    ((TokenSource(header="authorization", prefix="Bearer "),), {"authorization": "Bearer abc"}, "abc"),
    ((TokenSource(header="authorization", prefix="Bearer "),), {"authorization": "bearer abc"}, "abc"),
    ((TokenSource(header="authorization", prefix="Bearer "),), {"authorization": "Basic abc"}, None),
    ((TokenSource(header="x-token"),), {"x-token": " abc "}, "abc"),
    ((TokenSource(cookie="session"),), {"cookie": "a=1; session=abc; b=2"}, "abc"),
    ((TokenSource(cookie="session"),), {"cookie": "sessionx=abc"}, None),
    ((TokenSource(header="x-token"), TokenSource(cookie="session")), {"cookie": "session=c", "x-token": "h"}, "h"),
])
def test_token_sources(sources: tuple[TokenSource, ...], headers: dict[str, str], expected: str | None) -> None:
    assert extract_token(sources, headers)[0] == expected


def test_token_from_a_cookie_authenticates(idp: IdP) -> None:
    import json

    cfg = config(policy(jwt=[issuer(idp.issuer, fromCookies=["session"], jwksUri=idp.jwks_uri)],
                        rules=[{"name": "all"}]))
    p, _, _ = pipeline(cfg, jwks={idp.issuer: [idp.signer.jwk]}, clock=Clock(time.time()))
    d = p.decide_now(request(cookie=f"session={idp.token()}"), "http")
    assert isinstance(d, Decision) and d.outcome is Outcome.ALLOW, json.dumps(str(d))


class Exploding:
    def authorize(self, inp: Any, identity: Any) -> Any:
        raise RuntimeError("bug")


def test_an_internal_error_denies_with_503() -> None:
    broken = harness(config(policy(rules=[{"name": "all"}])), authorizer=Exploding()).pipeline
    d = broken.decide_now(request(), "http")
    assert isinstance(d, Decision)
    assert (d.outcome, d.wire.http, d.wire.grpc) == (Outcome.UNAVAILABLE, 503, 14)




def test_inline_keys_verify_tokens_with_no_fetch_at_all() -> None:
    """`jwks` inline (air-gapped clusters): the keys come from the config, nothing is fetched, and a token
    signed by another key is still refused."""
    import json as _json

    import jwt as pyjwt

    from tests.support.idp import SigningKey

    key, other = SigningKey("ES256"), SigningKey("ES256")
    inline = issuer(jwks=_json.dumps({"keys": [key.jwk]}))
    del inline["jwksUri"]
    h = harness(config(policy(jwt=[inline], rules=[{"name": "all"}])))
    assert asyncio.run(h.keys.refresh("https://idp.example.com")) and h.fetcher.docs == {}

    def token(signer: SigningKey) -> str:
        now = int(time.time())
        return pyjwt.encode({"iss": "https://idp.example.com", "aud": "orders", "sub": "alice", "iat": now,
                             "exp": now + 60}, signer.private, algorithm="ES256", headers={"kid": signer.kid})
    h.clock.now = time.time()
    assert asyncio.run(h.pipeline.decide(request(token=token(key)), "http")).outcome is Outcome.ALLOW
    assert asyncio.run(h.pipeline.decide(request(token=token(other)), "http")).outcome is Outcome.UNAUTHENTICATED


@pytest.mark.parametrize(("jwks", "says"), [
    ("not json", "is not JSON"),
    ('{"keys": []}', "at least one key"),
    ('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "private or symmetric key material"),
    ('{"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "d": "c"}]}', "private or symmetric"),
])
def test_inline_keys_must_be_a_public_jwks(jwks: str, says: str) -> None:
    from meshward.sidecar.config.schema import ConfigError, parse_config

    inline = issuer(jwks=jwks)
    del inline["jwksUri"]
    with pytest.raises(ConfigError, match="jwks") as e:
        parse_config(config(policy(jwt=[inline])))
    assert says in str(e.value)
    with pytest.raises(ConfigError, match="not both"):
        parse_config(config(policy(jwt=[issuer(jwks='{"keys": [{"kty": "EC"}]}')])))
