"""A grpcio greeter in the shape of grpc's public helloworld example, and its client (python3-grpcio).

The service is helloworld.Greeter on port 50051: SayHello (unary), SayHelloStreamReply (server streaming) and
SayHelloBidiStream (bidi) as in grpc's examples/protos/helloworld.proto, plus SayHelloClientStream (client
streaming) and SayHelloSlowly (which works until its caller's deadline or cancellation ends the call). The
messages are helloworld's HelloRequest {string name = 1; string num_greetings = 2;} and HelloReply {string
message = 1;}, encoded by hand in protobuf's wire format (two string fields need no generated code), so any
helloworld client can call it. The server writes one JSON line per call to stdout: what it received and saw.

`greeter.py serve` | `greeter.py call TARGET NAME`: every case against TARGET, the results as one JSON object.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc

PORT = 50051
SERVICE = "helloworld.Greeter"
# A stream this long outlasts any test: the client cancels it after a few messages.
LONG_STREAM = 1000


# One writer at a time: the server's threads log concurrently, and print() writes a line and its newline
# separately, so lines interleaved ('{...}{...}\n\n') and a reader lost calls (123 of 2,190 under h2load).
_LOG = threading.Lock()


def log(**fields: object) -> None:
    """One JSON line on stdout, written whole (the tests and the benchmark read it with kubectl logs)."""
    line = json.dumps(fields, sort_keys=True) + "\n"
    with _LOG:
        sys.stdout.write(line)
        sys.stdout.flush()


def encode(fields: dict[int, str]) -> bytes:
    """Protobuf wire format of string fields (wire type 2: tag, varint length, UTF-8)."""
    out = bytearray()
    for number, value in sorted(fields.items()):
        data = value.encode()
        out.append(number << 3 | 2)
        n = len(data)
        while n >= 0x80:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        out.append(n)
        out += data
    return bytes(out)


def decode(data: bytes) -> dict[int, str]:
    """The string fields of a protobuf message (other wire types are not used by helloworld's messages)."""
    fields: dict[int, str] = {}
    i = 0
    while i < len(data):
        key = data[i]
        i += 1
        if key & 7 != 2:
            raise ValueError(f"field {key >> 3}: wire type {key & 7}, helloworld's messages have strings only")
        n = shift = 0
        while True:
            b = data[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        fields[key >> 3] = data[i:i + n].decode()
        i += n
    return fields


def hello_request(name: str, num_greetings: int | None = None) -> bytes:
    return encode({1: name, **({2: str(num_greetings)} if num_greetings is not None else {})})


def hello_reply(message: str) -> bytes:
    return encode({1: message})


# ------------------------------------------------------------------------------------------------ the server


def say_hello(request: bytes, context: grpc.ServicerContext) -> bytes:
    name = decode(request).get(1, "")
    log(rpc="SayHello", name=name)
    return hello_reply(f"Hello, {name}!")


def say_hello_stream_reply(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    fields = decode(request)
    name, count = fields.get(1, ""), int(fields.get(2) or 3)
    state = {"sent": 0, "done": False}

    def ended() -> None:
        # grpcio stops iterating a cancelled call's generator: its end is seen here, not after the loop.
        if not state["done"]:
            log(rpc="SayHelloStreamReply", name=name, asked=count, sent=state["sent"], cancelled=True)

    context.add_callback(ended)
    for i in range(count):
        if not context.is_active():
            return
        yield hello_reply(f"Hello number {i}, {name}!")
        state["sent"] += 1
        if count > 10:
            time.sleep(0.05)  # a long stream, for the cancellation case
    state["done"] = True
    log(rpc="SayHelloStreamReply", name=name, asked=count, sent=state["sent"], cancelled=False)


def say_hello_client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    names = [decode(r).get(1, "") for r in requests]
    log(rpc="SayHelloClientStream", names=names)
    return hello_reply(f"Hello, {' and '.join(names)}!")


def say_hello_bidi_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    names = []
    for r in requests:
        names.append(decode(r).get(1, ""))
        yield hello_reply(f"Hello, {names[-1]}!")
    log(rpc="SayHelloBidiStream", names=names)


def say_hello_slowly(request: bytes, context: grpc.ServicerContext) -> bytes:
    name = decode(request).get(1, "")
    remaining = context.time_remaining()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and context.is_active():
        time.sleep(0.01)  # the server's own work, until the call ends
    log(rpc="SayHelloSlowly", name=name, time_remaining=None if remaining is None else round(remaining, 3),
        cancelled=not context.is_active())
    return hello_reply(f"Hello at last, {name}!")


def serve() -> None:
    handlers = {
        "SayHello": grpc.unary_unary_rpc_method_handler(say_hello),
        "SayHelloStreamReply": grpc.unary_stream_rpc_method_handler(say_hello_stream_reply),
        "SayHelloClientStream": grpc.stream_unary_rpc_method_handler(say_hello_client_stream),
        "SayHelloBidiStream": grpc.stream_stream_rpc_method_handler(say_hello_bidi_stream),
        "SayHelloSlowly": grpc.unary_unary_rpc_method_handler(say_hello_slowly),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"0.0.0.0:{PORT}")
    server.start()
    log(serving=f"{SERVICE} on {PORT}")
    server.wait_for_termination()


# ------------------------------------------------------------------------------------------------ the client


def call(target: str, name: str) -> dict[str, object]:
    """Every case against `target`: the results, or the gRPC status code where the call ends in one."""
    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
    grpc.channel_ready_future(channel).result(timeout=20)

    def method(kind: str, rpc: str) -> grpc.UnaryUnaryMultiCallable:
        return getattr(channel, kind)(f"/{SERVICE}/{rpc}")  # type: ignore[no-any-return]

    results: dict[str, object] = {}
    reply = method("unary_unary", "SayHello")(hello_request(name), timeout=10)
    results["unary"] = decode(reply)[1]
    replies = method("unary_stream", "SayHelloStreamReply")(hello_request(name, 5), timeout=10)
    results["server_stream"] = [decode(r)[1] for r in replies]
    names = iter([hello_request(f"{name}-{i}") for i in range(3)])
    results["client_stream"] = decode(method("stream_unary", "SayHelloClientStream")(names, timeout=10))[1]
    # Bidi as a conversation: each request is sent only after the previous reply came back, so a hop that
    # buffered a stream until its end would hang here (and the timeout would say so).
    outbox: queue.Queue[bytes | None] = queue.Queue()
    conversation = method("stream_stream", "SayHelloBidiStream")(iter(outbox.get, None), timeout=10)
    heard = []
    for i in range(3):
        outbox.put(hello_request(f"{name}-{i}"))
        heard.append(decode(next(conversation))[1])
    outbox.put(None)
    heard += [decode(r)[1] for r in conversation]
    results["bidi"] = heard
    start = time.monotonic()
    try:
        method("unary_unary", "SayHelloSlowly")(hello_request(f"{name}-deadline"), timeout=1.0)
        results["deadline"] = "OK"
    except grpc.RpcError as e:
        results["deadline"] = e.code().name  # type: ignore[attr-defined]
    results["deadline_within_3s"] = time.monotonic() - start < 3
    stream = method("unary_stream", "SayHelloStreamReply")(hello_request(f"{name}-cancel", LONG_STREAM), timeout=30)
    got = [decode(next(stream))[1] for _ in range(3)]
    stream.cancel()  # type: ignore[attr-defined]
    try:
        got += [decode(r)[1] for r in stream]
        results["cancel"] = "OK"
    except grpc.RpcError as e:
        results["cancel"] = e.code().name  # type: ignore[attr-defined]
    results["cancel_received"] = len(got)
    channel.close()
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve()
    elif sys.argv[1:2] == ["call"] and len(sys.argv) == 4:
        print(json.dumps(call(sys.argv[2], sys.argv[3]), sort_keys=True))
    else:
        sys.exit("usage: greeter.py serve | call TARGET NAME")
