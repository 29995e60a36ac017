"""Who a ServiceAccount token belongs to, asked of the API server (TokenReview) and remembered briefly.

Why its own engine: the signing service and the policy service both authenticate sidecars by their
projected, pod-bound token (`pod_token`, one check for both), and both must stop believing a token the
moment the operator sees its pod or ServiceAccount deleted, or its pod finished. Positive reviews are
cached REVIEW_CACHE_S by token hash (a rollout's burst of renewals costs one API call per workload); a
deletion drops the cached reviews of that pod or ServiceAccount and leaves a tombstone, so a review the
API server still answers from a lagging cache cannot let the token in either. A pod that finished
(phase Succeeded or Failed) is refused for as long as it exists: the API server still validates its
tokens (it checks only that the bound pod exists, with that UID), but no container of it runs to need one.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

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


# Pod phases in which no container runs any more (and none will): their tokens are refused.
FINISHED_PHASES = ("Succeeded", "Failed")


class ReviewUnavailable(Exception):
    """The API server could not be asked; the caller answers UNAVAILABLE."""


class TokenRefused(Exception):
    """A token that does not prove a running pod; `code` is the gRPC status name to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PodToken:
    """What a pod's projected token proves: its ServiceAccount, and the pod (name and UID) it is bound to."""

    namespace: str
    service_account: str
    pod: str
    pod_uid: str


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
        self._finished: set[str] = set()  # UIDs of pods that exist but finished
        self.calls = 0

    def _dead(self, result: TokenReviewResult, now: float) -> bool:
        if result.pod_uid and result.pod_uid in self._finished:
            return True
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
            return TokenReviewResult(False, error="the token's pod finished or was deleted, or its ServiceAccount was")
        return result

    async def pod_token(self, token: str) -> PodToken:
        """Review `token` and return the pod it proves; TokenRefused names what is missing.

        Valid for audience `meshward`, a ServiceAccount's, and bound to a pod that exists (the API server checks
        its UID) and has not finished. A TokenRequest token bound to no pod (`kubectl create token`) proves only
        that someone could create tokens for the ServiceAccount, so it is refused.
        """
        if not token:
            raise TokenRefused("UNAUTHENTICATED", "no ServiceAccount token: send the pod's projected token "
                                                  f"(audience {AUDIENCE!r}) as 'authorization: Bearer <token>'")
        try:
            review = await self.review(token)
        except ReviewUnavailable as e:
            raise TokenRefused("UNAVAILABLE", str(e)) from e
        if not review.authenticated:
            raise TokenRefused("UNAUTHENTICATED", f"token rejected by the API server: {review.error}")
        if AUDIENCE not in review.audiences:
            raise TokenRefused("UNAUTHENTICATED", f"token is not bound to the audience {AUDIENCE!r}")
        parts = review.username.split(":")
        if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
            raise TokenRefused("PERMISSION_DENIED", f"{review.username!r} is not a ServiceAccount")
        if not review.pod_name or not review.pod_uid:
            raise TokenRefused("PERMISSION_DENIED", "the token is not bound to a pod: send the pod's projected "
                                                    "ServiceAccount token, not a TokenRequest one")
        return PodToken(parts[2], parts[3], review.pod_name, review.pod_uid)

    def pod_changed(self, pod: Mapping[str, Any]) -> None:
        """A pod was added or changed: once it finished, its tokens are refused (and its cached reviews dropped)."""
        meta = pod.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        if uid and (pod.get("status") or {}).get("phase") in FINISHED_PHASES and uid not in self._finished:
            self._finished.add(uid)
            for k in [k for k, (_, r) in self._cache.items() if r.pod_uid == uid]:
                del self._cache[k]

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
        self._finished.discard(uid)  # the tombstone takes over
        return self._forget(lambda r: (r.pod_name == name and r.username.startswith(
            f"system:serviceaccount:{namespace}:")) or (bool(uid) and r.pod_uid == uid), uid)

    def forget_service_account(self, namespace: str, name: str, uid: str = "") -> int:
        """A ServiceAccount was deleted: likewise for every token of it."""
        return self._forget(lambda r: r.username == f"system:serviceaccount:{namespace}:{name}"
                            or (bool(uid) and r.uid == uid), uid)
