"""Who a ServiceAccount token belongs to, asked of the API server (TokenReview) and remembered briefly.

Why its own engine: the signing service and the policy service both authenticate sidecars by their
projected, pod-bound token, and both must stop believing a token the moment the operator sees its
pod or ServiceAccount deleted. Positive reviews are cached REVIEW_CACHE_S by token hash (a rollout's
burst of renewals costs one API call per workload); a deletion drops the cached reviews of that pod
or ServiceAccount and leaves a tombstone, so a review the API server still answers from a lagging
cache cannot let the token in either.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Protocol

from meshward.operator.clients.kube import KubeError, TokenReviewResult

# The audience a workload's projected ServiceAccount token must be bound to.
AUDIENCE = "meshward"
# How long a positive TokenReview is reused (the token itself lives for minutes to hours).
REVIEW_CACHE_S = 10.0
# How long a deleted pod's or ServiceAccount's UID is refused regardless of what TokenReview says: longer
# than the API server takes to notice (seconds), far shorter than a projected token lives.
TOMBSTONE_S = 600.0
# Bounds memory: a flood of distinct tokens only ever costs this many entries.
MAX_CACHED = 10_000


class ReviewUnavailable(Exception):
    """The API server could not be asked; the caller answers UNAVAILABLE."""


class TokenReviewApi(Protocol):
    """The call reviews need (clients.kube.KubeClient)."""

    def token_review(self, token: str, audiences: list[str]) -> TokenReviewResult:
        """Authenticate a token."""
        ...


class TokenReviewer:
    """TokenReview with a short positive cache that deletions invalidate at once."""

    def __init__(self, kube: TokenReviewApi, monotonic: Callable[[], float], pool: Executor | None = None) -> None:
        self._kube = kube
        self._monotonic = monotonic
        self._pool = pool
        self._cache: dict[bytes, tuple[float, TokenReviewResult]] = {}
        self._tombstones: dict[str, float] = {}  # pod or ServiceAccount UID -> when it was deleted
        self.calls = 0

    def _dead(self, result: TokenReviewResult, now: float) -> bool:
        for uid in (result.pod_uid, result.uid):
            when = self._tombstones.get(uid) if uid else None
            if when is not None and now - when < TOMBSTONE_S:
                return True
        return False

    async def review(self, token: str) -> TokenReviewResult:
        """The API server's view of `token` for audience `meshward` (cached); raise ReviewUnavailable."""
        key = hashlib.sha256(token.encode()).digest()
        now = self._monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < REVIEW_CACHE_S:
            result = hit[1]
        else:
            self.calls += 1
            try:
                result = await asyncio.get_running_loop().run_in_executor(self._pool, self._kube.token_review,
                                                                          token, [AUDIENCE])
            except KubeError as e:
                raise ReviewUnavailable(f"cannot authenticate the token now: {e}") from e
            if result.authenticated:
                if len(self._cache) >= MAX_CACHED:
                    self._cache.clear()
                self._cache[key] = (now, result)
        if result.authenticated and self._dead(result, now):
            return TokenReviewResult(False, error="the token's pod or ServiceAccount was deleted")
        return result

    def _forget(self, matches: Callable[[TokenReviewResult], bool], uid: str) -> int:
        if uid:
            self._tombstones[uid] = self._monotonic()
        now = self._monotonic()
        for old in [u for u, t in self._tombstones.items() if now - t >= TOMBSTONE_S]:
            del self._tombstones[old]
        gone = [k for k, (_, r) in self._cache.items() if matches(r)]
        for k in gone:
            del self._cache[k]
        return len(gone)

    def forget_pod(self, namespace: str, name: str, uid: str = "") -> int:
        """A pod was deleted: its tokens are no good any more. Returns how many cached reviews were dropped."""
        return self._forget(lambda r: (r.pod_name == name and r.username.startswith(
            f"system:serviceaccount:{namespace}:")) or (bool(uid) and r.pod_uid == uid), uid)

    def forget_service_account(self, namespace: str, name: str, uid: str = "") -> int:
        """A ServiceAccount was deleted: likewise for every token of it."""
        return self._forget(lambda r: r.username == f"system:serviceaccount:{namespace}:{name}"
                            or (bool(uid) and r.uid == uid), uid)
