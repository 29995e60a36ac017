"""The TokenReview cache: positive reviews reused briefly, and never past the deletion of the token's pod or
ServiceAccount (a deleted pod's token still got certificates for up to 10 s).

The API server is a fake here (it counts calls and can keep answering "authenticated" after a deletion, as a
lagging API server cache does); the real TokenReview is exercised by tests/integration/test_issuance.py.
"""

from __future__ import annotations

import asyncio

from meshward.operator.clients.kube import TokenReviewResult
from meshward.operator.engines.token_review import REVIEW_CACHE_S, TOMBSTONE_S, TokenReviewer

POD_EXTRA = {"authentication.kubernetes.io/pod-name": ("orders-1",),
             "authentication.kubernetes.io/pod-uid": ("pod-uid-1",)}


class FakeApi:
    def __init__(self) -> None:
        self.calls = 0

    def token_review(self, token: str, audiences: list[str]) -> TokenReviewResult:
        self.calls += 1
        return TokenReviewResult(True, "system:serviceaccount:shop:orders", ("meshward",), "", "sa-uid-1",
                                 dict(POD_EXTRA) if token.startswith("pod") else {})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def review(r: TokenReviewer, token: str) -> TokenReviewResult:
    return asyncio.run(r.review(token))


def test_positive_reviews_are_cached_briefly() -> None:
    api, clock = FakeApi(), Clock()
    r = TokenReviewer(api, clock)
    assert review(r, "pod-token").pod_name == "orders-1"
    assert review(r, "pod-token").pod_uid == "pod-uid-1"
    assert api.calls == 1
    clock.now += REVIEW_CACHE_S + 0.1
    review(r, "pod-token")
    assert api.calls == 2


def test_a_deleted_pods_token_is_refused_at_once_even_if_the_api_server_still_says_yes() -> None:
    api, clock = FakeApi(), Clock()
    r = TokenReviewer(api, clock)
    assert review(r, "pod-token").authenticated
    assert r.forget_pod("shop", "orders-1", "pod-uid-1") == 1
    after = review(r, "pod-token")  # the fake API server still answers "authenticated"
    assert not after.authenticated and "deleted" in after.error
    assert api.calls == 2  # the cached review was dropped, not reused
    clock.now += TOMBSTONE_S + 1
    assert review(r, "pod-token").authenticated  # by then the API server itself refuses such tokens


def test_a_deleted_service_accounts_tokens_are_refused_at_once() -> None:
    api, clock = FakeApi(), Clock()
    r = TokenReviewer(api, clock)
    assert review(r, "plain-token").authenticated and review(r, "pod-token").authenticated
    assert r.forget_service_account("shop", "orders", "sa-uid-1") == 2
    assert not review(r, "plain-token").authenticated
    assert not review(r, "pod-token").authenticated


def test_another_namespaces_pod_of_the_same_name_is_not_affected() -> None:
    api, clock = FakeApi(), Clock()
    r = TokenReviewer(api, clock)
    review(r, "pod-token")
    assert r.forget_pod("other", "orders-1") == 0
    assert review(r, "pod-token").authenticated and api.calls == 1
