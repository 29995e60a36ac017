"""Stopping what the handler modules started at start-up, the same way for each."""

from __future__ import annotations

import asyncio
import contextlib

import grpc


async def shutdown(tasks: list[asyncio.Task[None]], server: grpc.aio.Server | None, grace_s: float) -> None:
    """Cancel `tasks` and wait for them, then stop `server` letting in-flight calls finish for `grace_s`."""
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t
    if server is not None:
        await server.stop(grace=grace_s)
