"""Property-based fuzzing: garbage tokens, CheckRequests and HTTP bytes never escape as exceptions or allows."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshward.sidecar.domain.decision import Decision, Outcome
from meshward.sidecar.servers.authz_grpc import grpc_response, input_from_grpc, response_bytes
from meshward.sidecar.servers.authz_http import http_response
from meshward.sidecar.servers.http1 import MAX_HEADERS, MAX_REMEMBERED_NAMES, Request, Response, _Protocol
from tests.support.idp import SigningKey
from tests.support.sidecar import ISSUER, Clock, config, harness, issuer, policy, request

KEY = SigningKey("RS256", kid="k1")
# Unknown kids are rate-limited (a refetch just happened): decide_now must always answer.
PIPE = harness(config(policy(jwt=[issuer()], rules=[{"name": "all"}])), jwks={ISSUER: [KEY.jwk]},
               clock=Clock(1_800_000_000), kids_just_refetched=True).pipeline

b64 = st.binary(max_size=200).map(lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode())
json_segment = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                            lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                            max_leaves=10).map(lambda v: base64.urlsafe_b64encode(json.dumps(v).encode())
                                               .rstrip(b"=").decode())
tokens = st.one_of(
    st.text(max_size=400),
    st.tuples(b64, b64, b64).map(".".join),
    st.tuples(json_segment, json_segment, b64).map(".".join),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens)
def test_garbage_tokens_are_always_denied(tok: str) -> None:
    d = PIPE.decide_now(request(token=tok), "http")
    assert isinstance(d, Decision)
    assert d.outcome in (Outcome.UNAUTHENTICATED, Outcome.UNAVAILABLE), d


headers = st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=60), max_size=8)


@settings(max_examples=300, deadline=None)
@given(method=st.text(max_size=10), path=st.text(max_size=80), host=st.text(max_size=30), hdrs=headers,
       principal=st.text(max_size=60), port=st.integers(min_value=0, max_value=65535))
def test_arbitrary_check_requests_never_raise(method: str, path: str, host: str, hdrs: dict[str, str],
                                              principal: str, port: int) -> None:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = method, path, host
    for k, v in hdrs.items():
        http.headers[k] = v
    req.attributes.source.principal = principal
    req.attributes.destination.address.socket_address.port_value = port
    d = PIPE.decide_now(input_from_grpc(req), "grpc")
    assert isinstance(d, Decision)
    if "authorization" not in {k.lower() for k in hdrs}:
        assert d.outcome is not Outcome.ALLOW  # a token is required
    assert external_auth_pb2.CheckResponse.FromString(response_bytes(d)) == grpc_response(d)
    http_response(d)


header_text = st.text(max_size=300)  # past 127 bytes, so the length prefixes take two varint bytes
header_lists = st.lists(st.tuples(st.text(min_size=1, max_size=40), header_text), max_size=6)


@settings(max_examples=300, deadline=None)
@given(to_set=header_lists, to_remove=st.lists(st.text(min_size=1, max_size=200), max_size=6),
       ids=st.lists(st.text(min_size=1, max_size=80), min_size=1, max_size=3), cached=st.booleans(),
       outcome=st.sampled_from(list(Outcome)))
def test_grpc_response_bytes_encode_exactly_the_message(to_set: list[tuple[str, str]], to_remove: list[str],
                                                        ids: list[str], cached: bool, outcome: Outcome) -> None:
    """The hand-encoded CheckResponse is the message's own encoding, also when served from the wire cache."""
    cache: dict[str, bytes] | None = {} if cached else None
    for decision_id in ids:
        d = Decision(outcome, decision_id, "why", headers_to_set=to_set, headers_to_remove=to_remove,
                     deny_headers=[("www-authenticate", "Bearer")], wire_cache=cache)
        got = response_bytes(d)
        assert got == grpc_response(d).SerializeToString()
        assert external_auth_pb2.CheckResponse.FromString(got) == grpc_response(d)


class _Sink:
    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    def write(self, b: bytes) -> None:
        self.data += b

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("10.244.0.7", 40000) if name == "peername" else default


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_http1_server_survives_arbitrary_bytes(chunks: list[bytes]) -> None:
    """Random bytes in any chunking: every answer is a well-formed status line, nothing raises."""
    seen: list[Request] = []

    def handler(r: Request) -> Response:
        seen.append(r)
        return Response(200)

    proto = _Protocol(handler)
    sink = _Sink()
    proto.connection_made(sink)  # type: ignore[arg-type]
    for c in chunks:
        if sink.closed:
            break
        proto.data_received(c)
    for line in sink.data.split(b"\r\n\r\n"):
        if line:
            assert line.startswith(b"HTTP/1.1 ") or line == b""


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40),
       st.text(max_size=100))
def test_http1_requests_round_trip(path: str, value: str) -> None:
    seen: list[Request] = []
    proto = _Protocol(lambda r: seen.append(r) or Response(204))  # type: ignore[func-returns-value]
    sink = _Sink()
    proto.connection_made(sink)  # type: ignore[arg-type]
    safe_value = "".join(ch for ch in value if " " <= ch <= "~").strip()
    proto.data_received(f"GET /{path} HTTP/1.1\r\nHost: x\r\nX-A: {safe_value}\r\n\r\n".encode())
    if seen:
        assert seen[0].target == f"/{path}"
        assert seen[0].headers["x-a"] == safe_value
        assert sink.data.startswith(b"HTTP/1.1 204")
    else:
        assert sink.data.startswith(b"HTTP/1.1 400")


def test_http1_limits_header_size() -> None:
    proto = _Protocol(lambda r: Response(200))
    sink = _Sink()
    proto.connection_made(sink)  # type: ignore[arg-type]
    proto.data_received(b"GET / HTTP/1.1\r\n" + b"".join(b"x-%d: %s\r\n" % (i, b"a" * 1000) for i in range(80)))
    assert sink.data.startswith(b"HTTP/1.1 431") and sink.closed


def test_http1_slow_decisions_keep_order() -> None:
    async def main() -> bytes:
        async def slow() -> Response:
            await asyncio.sleep(0)
            return Response(401)

        calls: list[Any] = []

        def handler(r: Request) -> Any:
            calls.append(r.target)
            return slow() if r.target == "/slow" else Response(200)

        proto = _Protocol(handler)
        sink = _Sink()
        proto.connection_made(sink)  # type: ignore[arg-type]
        proto.data_received(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        assert proto._pending is not None
        await proto._pending
        proto.data_received(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        return sink.data

    data = asyncio.run(main())
    assert data.index(b"401") < data.index(b"200")


_NAME = st.text(alphabet="abAB-", min_size=1, max_size=4)  # small: repeats in mixed case
_VALUE = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(_NAME, _VALUE), max_size=12), min_size=1, max_size=4))
def test_http1_headers_match_a_model_across_requests_on_one_connection(requests: list[list[tuple[str, str]]]) -> None:
    """Names lowercased, repeats joined with ', ' in order, on every request of a kept-alive connection."""
    seen: list[Request] = []
    proto = _Protocol(lambda r: seen.append(r) or Response(204))  # type: ignore[func-returns-value]
    proto.connection_made(_Sink())  # type: ignore[arg-type]
    expected: list[dict[str, str]] = []
    for headers in requests:
        model: dict[str, str] = {"host": "x"}
        for name, value in headers:
            key = name.lower()
            model[key] = value if key not in model else f"{model[key]}, {value}"
        expected.append(model)
        wire = "".join(f"{name}: {value}\r\n" for name, value in headers)
        proto.data_received(f"GET / HTTP/1.1\r\nHost: x\r\n{wire}\r\n".encode())
    assert [r.headers for r in seen] == expected


def test_http1_a_connection_sending_ever_new_header_names_is_still_parsed_right() -> None:
    """More distinct names than a connection remembers (MAX_REMEMBERED_NAMES): the rest are decoded each time."""
    seen: list[Request] = []
    proto = _Protocol(lambda r: seen.append(r) or Response(204))  # type: ignore[func-returns-value]
    proto.connection_made(_Sink())  # type: ignore[arg-type]
    batches = [[f"X-Name-{i}-{j}" for j in range(100)] for i in range(MAX_REMEMBERED_NAMES // 100 + 2)]
    for names in batches:
        proto.data_received(("GET / HTTP/1.1\r\n" + "".join(f"{n}: v-{n}\r\n" for n in names) + "\r\n").encode())
    assert [r.headers for r in seen] == [{n.lower(): f"v-{n}" for n in names} for names in batches]
    assert len(proto._names) == MAX_REMEMBERED_NAMES  # bounded, whatever the client sends


def test_http1_limits_header_count() -> None:
    proto = _Protocol(lambda r: Response(200))
    sink = _Sink()
    proto.connection_made(sink)  # type: ignore[arg-type]
    proto.data_received(b"GET / HTTP/1.1\r\n" + b"".join(b"x-%d: a\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n")
    assert sink.data.startswith(b"HTTP/1.1 431") and sink.closed
