"""The admission webhook server on real sockets and real TLS: it answers reviews, never with a 500, refuses
what is not a review, and presents a new certificate on the next handshake once the CA re-issued it."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509

from meshward.operator.domain.inject import InjectSettings
from meshward.operator.webhooks.admission import AdmissionWebhooks, serve_webhooks
from tests.support.pki import CertFiles, TestCA


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _post(port: int, ca: Path, path: str, body: bytes) -> tuple[int, bytes, x509.Certificate]:
    ctx = ssl.create_default_context(cafile=str(ca))
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    ssl_obj = writer.get_extra_info("ssl_object")
    cert = x509.load_der_x509_certificate(ssl_obj.getpeercert(binary_form=True))
    writer.write(f"POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload, cert


def _pems(files: CertFiles) -> tuple[bytes, bytes]:
    return files.cert.read_bytes(), files.key.read_bytes()


@pytest.fixture
def pki(tmp_path: Path) -> tuple[TestCA, CertFiles, CertFiles]:
    ca = TestCA(tmp_path / "pki")
    return ca, ca.issue("first", dns=("localhost",)), ca.issue("second", dns=("localhost",))


async def _serving(current: Callable[[], tuple[bytes, bytes]]) -> AsyncIterator[int]:
    port = _free_port()
    hooks = AdmissionWebhooks(InjectSettings(image="localhost/meshward:t"), "cluster.local",
                              lambda: dt.datetime(2026, 6, 1, tzinfo=dt.UTC))
    runner = await serve_webhooks(hooks, f"127.0.0.1:{port}", current)
    try:
        yield port
    finally:
        await runner.cleanup()


POD_REVIEW = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
    "uid": "u-7", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE", "namespace": "shop",
    "object": {"metadata": {"name": "p", "labels": {"meshward.io/inject": "enabled"}},
               "spec": {"containers": [{"name": "app", "image": "x"}]}}}}


def test_reviews_are_answered_and_garbage_is_a_400_never_a_500(pki: tuple[TestCA, CertFiles, CertFiles]) -> None:
    ca, first, _ = pki

    async def scenario() -> None:
        async for port in _serving(lambda: _pems(first)):
            status, body, _ = await _post(port, ca.ca_file, "/inject/pod", json.dumps(POD_REVIEW).encode())
            answer = json.loads(body)
            assert status == 200 and answer["response"]["uid"] == "u-7" and answer["response"]["patchType"]
            for junk in (b"", b"{", b"[1]", b'{"kind": "AdmissionReview"}', bytes(range(256))):
                status, body, _ = await _post(port, ca.ca_file, "/inject/namespace", junk)
                assert status == 400 and body.startswith(b"meshward: "), (junk, status, body)
            status, _, _ = await _post(port, ca.ca_file, "/validate", b"x" * (9 * 1024 * 1024))
            assert status == 413
    asyncio.run(scenario())


def test_a_reissued_certificate_is_presented_on_the_next_handshake(pki: tuple[TestCA, CertFiles, CertFiles]) -> None:
    """After a CA rotation the operator's serving certificate changes under a running server: the next
    connection must see it without a restart (the caBundle already trusts both roots)."""
    ca, first, second = pki
    current = [_pems(first)]

    async def scenario() -> None:
        async for port in _serving(lambda: current[0]):
            _, _, before = await _post(port, ca.ca_file, "/validate", json.dumps(POD_REVIEW).encode())
            current[0] = _pems(second)
            _, _, after = await _post(port, ca.ca_file, "/validate", json.dumps(POD_REVIEW).encode())
            assert before.serial_number != after.serial_number
            assert after.serial_number == x509.load_pem_x509_certificate(_pems(second)[0]).serial_number
    asyncio.run(scenario())


POLICY_REVIEW = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
    "uid": "u-8", "kind": {"group": "meshward.io", "version": "v1alpha1", "kind": "AuthPolicy"},
    "operation": "CREATE", "namespace": "shop",
    "object": {"apiVersion": "meshward.io/v1alpha1", "kind": "AuthPolicy", "metadata": {"name": "p"},
               "spec": {"selector": {"matchLabels": {"app": "orders"}},
                        "rules": [{"name": "r", "when": ["request.path == '/x'"]}]}}}}


@pytest.mark.parametrize(("webhook", "path", "review"), [("validate_response", "/validate", POLICY_REVIEW),
                                                         ("inject_response", "/inject/pod", POD_REVIEW)])
def test_deciding_a_review_never_blocks_the_operators_loop(monkeypatch: pytest.MonkeyPatch, webhook: str, path: str,
                                                           review: dict[str, Any]) -> None:
    """Validating an AuthPolicy compiles its CEL (seconds for a large one) and injecting builds a patch, both on
    the loop that also streams every agent's config. The decision now waits until the loop has run another
    task: on the loop it would deadlock until the assertion failed (a 500)."""
    import meshward.operator.webhooks.admission as admission

    loop_ran = threading.Event()
    real = getattr(admission, webhook)

    def deciding(*args: Any, **kwargs: Any) -> Any:
        assert loop_ran.wait(10), "the event loop did not run while the review was being decided"
        return real(*args, **kwargs)

    monkeypatch.setattr(admission, webhook, deciding)

    async def scenario() -> tuple[int, dict[str, Any]]:
        hooks = AdmissionWebhooks(InjectSettings(image="localhost/meshward:t"), "cluster.local",
                                  lambda: dt.datetime(2026, 6, 1, tzinfo=dt.UTC))
        async with TestClient(TestServer(hooks.app(), host="127.0.0.1")) as client:
            asyncio.get_running_loop().call_later(0.05, loop_ran.set)
            answer = await asyncio.wait_for(client.post(path, data=json.dumps(review)), 20)
            return answer.status, await answer.json()

    status, answer = asyncio.run(scenario())
    assert status == 200 and answer["response"]["allowed"] is True, answer


def test_a_pod_is_injected_with_the_ports_its_services_declare_tcp_or_refused_when_they_cannot_be_listed() -> None:
    """The injection reads the Services of the pod's namespace (a collaborator: the operator lists them from the API
    server) and declares the ports they declare TCP for it; a listing that fails refuses the pod with a 503 naming
    the namespace (its controller retries): a pod is never created without ports its Services declare TCP, which
    would leave a server that speaks first hanging behind a declared Service. Reviews other than a Pod CREATE that
    opts in list nothing (an AuthPolicy, a pod that does not opt in)."""
    asked: list[str] = []
    failing = [False]

    async def services(namespace: str) -> list[dict[str, Any]]:
        asked.append(namespace)
        if failing[0]:
            raise RuntimeError("apiserver unavailable")
        return [{"metadata": {"name": "db"}, "spec": {"selector": {"meshward.io/inject": "enabled"},
                                                      "ports": [{"name": "sql", "port": 5432,
                                                                 "appProtocol": "postgresql"}]}}]

    async def scenario() -> list[dict[str, Any]]:
        hooks = AdmissionWebhooks(InjectSettings(image="localhost/meshward:t"), "cluster.local",
                                  lambda: dt.datetime(2026, 6, 1, tzinfo=dt.UTC), services=services)
        answers = []
        async with TestClient(TestServer(hooks.app(), host="127.0.0.1")) as client:
            unopted = json.loads(json.dumps(POD_REVIEW))
            unopted["request"]["object"]["metadata"]["labels"] = {"app": "x"}
            for path, review in (("/inject/pod", POD_REVIEW), ("/validate", POLICY_REVIEW),
                                 ("/inject/pod", unopted), ("/inject/pod", None)):
                if review is None:
                    failing[0], review = True, POD_REVIEW
                answer = await client.post(path, data=json.dumps(review))
                assert answer.status == 200
                answers.append((await answer.json())["response"])
        return answers

    injected, validated, passed, refused = asyncio.run(scenario())
    patch = json.loads(base64.b64decode(injected["patch"]))
    proxy = next(c for op in patch if op["path"] == "/spec/initContainers" for c in op["value"]
                 if c["name"] == "meshward-proxy")
    assert proxy["command"][proxy["command"].index("--tcp-ports") + 1] == "5432"
    assert validated["allowed"] is True and passed["allowed"] is True and "patch" not in passed
    assert refused["allowed"] is False and refused["status"]["code"] == 503
    assert "Services of namespace 'shop'" in refused["status"]["message"], refused
    assert "apiserver unavailable" in refused["status"]["message"]
    assert asked == ["shop", "shop"]  # the AuthPolicy review and the pod that does not opt in listed nothing
