"""The agent's side of identity: token parsing, the CSR it sends, what it accepts back, when it renews."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os

import pytest
from cryptography.hazmat.primitives import serialization

from meshward.operator.domain.ca import check_csr, generate_root, issue_leaf, random_serial
from meshward.sidecar.domain.certificate import (
    BACKOFF_MAX_S,
    TokenUnreadable,
    accept,
    build_csr,
    new_key,
    renewal_delay,
    retry_delay,
    service_account_of,
)

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
ME = "spiffe://cluster.local/ns/shop/sa/orders"


def token(claims: dict[str, object]) -> str:
    def b64(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")

    return f"{b64({'alg': 'RS256'})}.{b64(claims)}.sig"


def test_service_account_comes_from_the_projected_token() -> None:
    assert service_account_of(token({"sub": "system:serviceaccount:shop:orders"})) == ("shop", "orders")


@pytest.mark.parametrize("bad", ["not-a-jwt", token({"sub": "alice"}), token({"sub": "system:serviceaccount:shop"}),
                                 token({"sub": "system:node:worker-1"})])
def test_tokens_that_name_no_service_account_are_refused_before_any_request(bad: str) -> None:
    with pytest.raises(TokenUnreadable):
        service_account_of(bad)


def issued(ttl: dt.timedelta, key: object = None, spiffe: str = ME) -> tuple[object, bytes, bytes]:
    ca = generate_root("cluster.local", NOW)
    key = key or new_key()
    csr = check_csr(build_csr(key, spiffe), spiffe)  # type: ignore[arg-type]
    leaf = issue_leaf(ca, csr, spiffe, ttl, NOW, random_serial(os.urandom))
    return key, leaf.public_bytes(serialization.Encoding.PEM), ca.cert_pem()


def test_the_agents_csr_passes_the_cas_checks_and_the_result_is_accepted() -> None:
    key, chain, bundle = issued(dt.timedelta(hours=1))
    cert = accept(ME, chain, bundle, key, NOW)  # type: ignore[arg-type]
    assert cert.spiffe_id == ME and cert.not_after == NOW + dt.timedelta(hours=1)


def test_a_certificate_for_another_key_is_not_accepted() -> None:
    """A confused or malicious signer answering with someone else's certificate must not be served."""
    _, chain, bundle = issued(dt.timedelta(hours=1))
    with pytest.raises(ValueError, match="not for this workload's key"):
        accept(ME, chain, bundle, new_key(), NOW)


def test_a_certificate_for_another_identity_is_not_accepted() -> None:
    other = "spiffe://cluster.local/ns/shop/sa/admin"
    key, chain, bundle = issued(dt.timedelta(hours=1), spiffe=other)
    with pytest.raises(ValueError, match="expected"):
        accept(ME, chain, bundle, key, NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize("rand", [0.0, 0.5, 0.999])
def test_renewal_is_due_at_40_to_60_percent_counted_from_receipt_not_the_backdated_not_before(rand: float) -> None:
    key, chain, bundle = issued(dt.timedelta(seconds=30))
    cert = accept(ME, chain, bundle, key, NOW)  # type: ignore[arg-type]
    assert cert.not_before < NOW  # the CA backdates by a minute
    delay = renewal_delay(cert, NOW, rand)
    assert 12 <= delay <= 18


def test_retries_back_off_but_never_past_a_tenth_of_what_is_left() -> None:
    assert retry_delay(0, 0.999, None, NOW) < 1
    assert retry_delay(30, 0.999, None, NOW) <= BACKOFF_MAX_S
    key, chain, bundle = issued(dt.timedelta(seconds=40))
    cert = accept(ME, chain, bundle, key, NOW)  # type: ignore[arg-type]
    assert retry_delay(30, 0.999, cert, NOW) <= 4.0


def test_an_unexpected_signer_error_does_not_end_renewal() -> None:
    """The signer collaborator raises a RuntimeError once (standing in for a bug; the real client wraps every
    gRPC failure in SignerError), then signs with a real CA: the manager must retry and publish."""
    import asyncio
    import time
    from typing import Any

    from prometheus_client import CollectorRegistry

    from meshward.sidecar.engines.certificate import IdentityManager

    ca = generate_root("cluster.local", NOW)

    class Signer:
        calls = 0

        async def sign(self, token: str, csr_pem: bytes) -> dict[str, Any]:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("a bug")
            leaf = issue_leaf(ca, check_csr(csr_pem, ME), ME, dt.timedelta(hours=1), NOW, random_serial(os.urandom))
            return {"certificateChain": leaf.public_bytes(serialization.Encoding.PEM).decode(),
                    "trustBundle": ca.cert_pem().decode()}

    async def scenario() -> tuple[int, bool]:
        signer = Signer()
        m = IdentityManager(signer, lambda: token({"sub": "system:serviceaccount:shop:orders"}), "cluster.local",
                            lambda: NOW, lambda: 0.0, CollectorRegistry())
        runner = asyncio.create_task(m.run())
        try:
            deadline = time.monotonic() + 10
            while m.current is None and time.monotonic() < deadline and not runner.done():
                await asyncio.sleep(0.01)
            return signer.calls, m.current is not None
        finally:
            runner.cancel()

    calls, published = asyncio.run(scenario())
    assert calls == 2 and published
