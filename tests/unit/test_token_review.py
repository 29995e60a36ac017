"""The TokenReview cache: positive reviews reused briefly, and never past the deletion of the token's pod or
ServiceAccount (a deleted pod's token still got certificates for up to 10 s).

The API server is a fake here (it counts calls and can keep answering "authenticated" after a deletion, as a
lagging API server cache does); the real TokenReview is exercised by tests/integration/test_issuance.py.
"""

from __future__ import annotations

import asyncio

import pytest

from meshward.operator.clients.kube import TokenReviewResult
from meshward.operator.engines.token_review import (
    REVIEW_CACHE_S,
    TOMBSTONE_S,
    PodToken,
    TokenRefused,
    TokenReviewer,
)

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


def pod_token(r: TokenReviewer, token: str) -> PodToken:
    return asyncio.run(r.pod_token(token))


def test_a_token_request_token_bound_to_no_pod_proves_no_pod() -> None:
    """`kubectl create token orders --audience meshward` (anyone who may create tokens for the ServiceAccount, or
    a leaked long-lived one): authenticated, right audience, but bound to no pod; the signer and the policy
    service both refuse it through this one check."""
    r = TokenReviewer(FakeApi(), Clock())
    with pytest.raises(TokenRefused, match="not bound to a pod") as err:
        pod_token(r, "sa-token")
    assert err.value.code == "PERMISSION_DENIED"
    assert pod_token(r, "pod-token") == PodToken("shop", "orders", "orders-1", "pod-uid-1")


def test_a_finished_pods_token_is_refused_while_the_pod_still_exists() -> None:
    """A Job's pod that Succeeded (or any Failed pod) stays in the API server, which keeps validating its token
    (it checks only that the bound pod exists): a token copied out of it must not get certificates."""
    api, clock = FakeApi(), Clock()
    r = TokenReviewer(api, clock)
    pod = {"metadata": {"namespace": "shop", "name": "orders-1", "uid": "pod-uid-1"}, "status": {"phase": "Running"}}
    r.pod_changed(pod)
    assert pod_token(r, "pod-token").pod == "orders-1"
    r.pod_changed({**pod, "status": {"phase": "Succeeded"}})
    with pytest.raises(TokenRefused, match="finished") as err:
        pod_token(r, "pod-token")  # the cached review is not reused
    assert err.value.code == "UNAUTHENTICATED"
    clock.now += TOMBSTONE_S + 1
    with pytest.raises(TokenRefused, match="finished"):
        pod_token(r, "pod-token")  # for as long as the pod exists, not for a tombstone's while
    r.forget_pod("shop", "orders-1", "pod-uid-1")
    with pytest.raises(TokenRefused):
        pod_token(r, "pod-token")  # deleted: the tombstone takes over


def test_a_pending_pods_token_is_accepted() -> None:
    """The agent is a native sidecar: it asks for its certificate while the pod is still Pending."""
    r = TokenReviewer(FakeApi(), Clock())
    r.pod_changed({"metadata": {"uid": "pod-uid-1"}, "status": {"phase": "Pending"}})
    assert pod_token(r, "pod-token").pod_uid == "pod-uid-1"
