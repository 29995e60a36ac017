"""A subscriber that receives its configs and never acknowledges them: an agent stuck behind.

Runs as its own process (`python -m tests.support.silent_subscriber ...`) so that "the
agent is gone" is a real process exit closing a real connection. It gets a workload
certificate from the signing service with the given token (or `--sign-token`), subscribes as `--pod` with
`--token`, and
prints one line per message: `version <v>` (a config), `destinations <v>` (the destination map),
or `error <CODE> <details>` when refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import grpc

from tests.support.fleet import sign


async def run(args: argparse.Namespace) -> int:
    with open(args.bundle, "rb") as f:
        bundle = f.read()
    with open(args.token) as f:
        token = f.read().strip()
    with open(args.sign_token or args.token) as f:
        sign_token = f.read().strip()
    try:
        key, chain, roots = await sign(args.signer, args.server_name, bundle, sign_token, args.spiffe)
    except grpc.aio.AioRpcError as e:
        print("error", e.code().name, f"(signer) {e.details()}", flush=True)
        return 1
    creds = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)
    opts = [("grpc.ssl_target_name_override", args.server_name)]
    try:
        async with grpc.aio.secure_channel(args.policy, creds, options=opts) as ch:
            call = ch.stream_stream("/meshward.policy.v1.Policy/Subscribe",
                                    request_serializer=lambda d: json.dumps(d).encode(),
                                    response_deserializer=json.loads)(
                metadata=(("authorization", f"Bearer {token}"),))
            await call.write({"pod": args.pod})
            async for msg in call:
                if "destinations" in msg:
                    print("destinations", msg["destinations"]["version"], flush=True)
                else:
                    print("version", msg["version"], flush=True)
    except grpc.aio.AioRpcError as e:
        print("error", e.code().name, e.details(), flush=True)
        return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    for name in ("signer", "policy", "server-name", "bundle", "token", "spiffe", "pod"):
        ap.add_argument(f"--{name}", required=True)
    ap.add_argument("--sign-token", default="", help="the token for the signer, if not --token (the policy service's)")
    return asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
