"""A WebSocket echo server on port 8083 and a client that holds a session, both with python3-websockets.

`websocket.py serve`: echoes every message; one JSON line on stdout per session when it ends (messages
received, how long it lasted, the close code). `websocket.py talk URL MESSAGES EVERY`: sends MESSAGES text
messages EVERY seconds apart, waits for each echo, closes normally, and prints what it saw as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import websockets

PORT = 8083


async def echo(ws: websockets.WebSocketServerProtocol) -> None:
    """Echo the session's messages until it closes."""
    start, received = time.monotonic(), 0
    try:
        async for message in ws:
            received += 1
            await ws.send(message)
    except websockets.ConnectionClosed:
        pass
    print(json.dumps({"kind": "websocket", "path": ws.path, "received": received, "close_code": ws.close_code,
                      "held_s": round(time.monotonic() - start, 1)}, sort_keys=True), flush=True)


async def serve() -> None:
    async with websockets.serve(echo, "0.0.0.0", PORT):  # noqa: S104 - a pod's server
        await asyncio.Future()


async def talk(url: str, messages: int, every: float) -> dict[str, object]:
    """Send `messages` messages `every` seconds apart over one session; what came back."""
    start, echoed = time.monotonic(), 0
    async with websockets.connect(url, open_timeout=10, close_timeout=10) as ws:
        for i in range(messages):
            if i:
                await asyncio.sleep(every)
            await ws.send(f"message {i}")
            if await asyncio.wait_for(ws.recv(), timeout=10) == f"message {i}":
                echoed += 1
        await ws.close()
        code = ws.close_code
    return {"sent": messages, "echoed": echoed, "close_code": code, "held_s": round(time.monotonic() - start, 1)}


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(serve())
    elif sys.argv[1:2] == ["talk"] and len(sys.argv) == 5:
        print(json.dumps(asyncio.run(talk(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))), sort_keys=True))
    else:
        sys.exit("usage: websocket.py serve | talk URL MESSAGES EVERY")
