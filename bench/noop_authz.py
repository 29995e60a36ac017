"""Baseline (c): ext_authz servers that allow everything, on the same stacks Meshward uses.

`python bench/noop_authz.py http unix:/path` or `python bench/noop_authz.py grpc 127.0.0.1:port`.
They measure the transport's own cost, so Meshward's pipeline cost is the difference.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import uvloop
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import status_pb2

from meshward.sidecar.servers.authz_grpc import serve_grpc
from meshward.sidecar.servers.http1 import Response, serve_unix

OK = Response(200)


OK_GRPC = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0),
                                         ok_response=external_auth_pb2.OkHttpResponse()).SerializeToString()


async def noop_check(request: Any, context: Any) -> bytes:
    return OK_GRPC


async def main(kind: str, addr: str) -> None:
    # Keep a reference: a grpc.aio server that is garbage-collected stops serving.
    server: Any = (await serve_unix(lambda _r: OK, addr.removeprefix("unix:")) if kind == "http"
                   else await serve_grpc(noop_check, addr))
    await asyncio.Event().wait()
    del server


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[3] == "asyncio":
        asyncio.run(main(sys.argv[1], sys.argv[2]))
    else:
        uvloop.run(main(sys.argv[1], sys.argv[2]))
