"""A real, local Kubernetes control plane for development and integration tests.

Why: Meshward's operator, webhooks and identity service talk to the Kubernetes
API, and the machines we build on have no Docker engine (so no kind).  This
module starts etcd, kube-apiserver and kube-controller-manager from binaries
that `hack/build-control-plane` compiles from Go modules, on free loopback
ports, with every piece of state (PKI, etcd data, logs, kubeconfig, pids) in one
directory, so two clusters on one machine never collide and `down` leaves
nothing behind.

It is the dev tool behind `hack/cluster` and the pytest session fixture; it is
not part of the operator or the sidecar.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import http.client
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# A service CIDR is required by kube-apiserver; nothing routes to it here (no kubelet, no proxy).
SERVICE_CIDR = "10.0.0.0/24"
# The in-cluster issuer name; TokenRequest/TokenReview only need it to be stable per cluster.
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Cold start of kube-apiserver on 2 cores (CRD and RBAC bootstrap) takes 10-40 s; allow slack.
READY_TIMEOUT_S = 120.0
# How long processes get to exit on SIGTERM before SIGKILL.
STOP_GRACE_S = 10.0
STATE_FILE = "state.json"


class ClusterError(Exception):
    """The local control plane could not be started, queried or stopped."""


@dataclass(frozen=True)
class Binaries:
    """Paths of the control-plane programs."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path

    @classmethod
    def from_paths(cls, paths: Mapping[str, str]) -> Binaries:
        """From the `name=path` lines `hack/build-control-plane paths` prints, parsed into a mapping."""
        return cls(Path(paths["etcd"]), Path(paths["kube-apiserver"]), Path(paths["kube-controller-manager"]))

    def check(self) -> None:
        """Raise ClusterError naming the first binary that is missing."""
        for name, path in asdict(self).items():
            if not Path(path).is_file() or not os.access(path, os.X_OK):
                raise ClusterError(
                    f"{name.replace('_', '-')} not found at {path}: run hack/build-control-plane first"
                )


@dataclass(frozen=True)
class ClusterState:
    """What `up` wrote to STATE_FILE: enough for `status`, `down` and tests."""

    directory: str
    kubeconfig: str
    server: str
    etcd_url: str
    pids: dict[str, int]

    @classmethod
    def load(cls, directory: Path) -> ClusterState:
        """Read the state file of the cluster in `directory`."""
        path = directory / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ClusterError(f"no cluster state at {path}: is a cluster up in {directory}?") from e
        return cls(**data)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------- PKI


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_pki(pki: Path, now: dt.datetime) -> None:
    """Create the cluster CA, serving and client certificates and the ServiceAccount key."""
    pki.mkdir(parents=True, exist_ok=True)
    validity = dt.timedelta(days=30)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("meshward-local-cluster-ca"))
        .issuer_name(_name("meshward-local-cluster-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (pki / "ca.crt").write_bytes(_pem_cert(ca))
    (pki / "ca.key").write_bytes(_pem_key(ca_key))

    def leaf(stem: str, subject: x509.Name, server: bool) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            sans: list[x509.GeneralName] = [
                x509.DNSName(n)
                for n in ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                          "kubernetes.default.svc.cluster.local")
            ]
            sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "10.0.0.1")]
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        (pki / f"{stem}.crt").write_bytes(_pem_cert(cert))
        (pki / f"{stem}.key").write_bytes(_pem_key(key))

    leaf("apiserver", _name("kube-apiserver"), server=True)
    leaf("admin", _name("meshward-admin", "system:masters"), server=False)
    leaf("controller-manager", _name("system:kube-controller-manager"), server=False)

    sa_key = ec.generate_private_key(ec.SECP256R1())
    (pki / "sa.key").write_bytes(_pem_key(sa_key))
    (pki / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    for p in pki.iterdir():
        if p.suffix == ".key":
            p.chmod(0o600)


def kubeconfig(server: str, pki: Path, user: str, cluster_name: str) -> str:
    """Return a kubeconfig with the CA and the client certificate of `user` embedded."""

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster_name, "cluster": {
            "server": server, "certificate-authority-data": b64(pki / "ca.crt")}}],
        "users": [{"name": user, "user": {
            "client-certificate-data": b64(pki / f"{user}.crt"),
            "client-key-data": b64(pki / f"{user}.key")}}],
        "contexts": [{"name": cluster_name, "context": {"cluster": cluster_name, "user": user}}],
        "current-context": cluster_name,
    }
    return yaml.safe_dump(doc, sort_keys=False)


# ------------------------------------------------------------------ processes and waits


def wait_for(what: str, check: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes],
             log: Path, clock: Callable[[], float] = time.monotonic) -> None:
    """Poll `check` until it is true; fail fast with the log tail if the process dies."""
    deadline = clock() + timeout
    while clock() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"{what} exited with code {proc.returncode}; last log lines:\n{_tail(log)}")
        with contextlib.suppress(OSError, http.client.HTTPException, ssl.SSLError):
            if check():
                return
        # Poll interval of a condition wait, not a sleep standing in for one.
        time.sleep(0.2)
    raise ClusterError(f"{what} not ready after {timeout:.0f} s; last log lines:\n{_tail(log)}")


def _tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _https_ok(port: int, path: str, ctx: ssl.SSLContext) -> bool:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200
    finally:
        conn.close()


def _http_ok(port: int, path: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status == 200 and b'"true"' in body
    finally:
        conn.close()


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a control-plane process in its own session, output to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def admin_ssl_context(pki: Path) -> ssl.SSLContext:
    """Return a TLS context that trusts the cluster CA and presents the admin certificate."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return ctx


def up(directory: Path, binaries: Binaries, name: str = "meshward-local",
       progress: Callable[[str], None] = lambda _m: None) -> ClusterState:
    """Start etcd, kube-apiserver and kube-controller-manager; return when all are ready."""
    binaries.check()
    if (directory / STATE_FILE).exists():
        raise ClusterError(f"a cluster already has state in {directory}: run `hack/cluster down` first")
    directory.mkdir(parents=True, exist_ok=True)
    pki, logs = directory / "pki", directory / "logs"
    logs.mkdir(exist_ok=True)
    write_pki(pki, dt.datetime.now(dt.UTC))
    etcd_port, peer_port, api_port, kcm_port = (free_port() for _ in range(4))
    pids: dict[str, int] = {}
    procs: list[subprocess.Popen[bytes]] = []

    def record(nm: str, p: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        pids[nm] = p.pid
        procs.append(p)
        _write_state(directory, ClusterState(str(directory), str(directory / "kubeconfig"),
                                             f"https://127.0.0.1:{api_port}",
                                             f"http://127.0.0.1:{etcd_port}", pids))
        return p

    try:
        progress(f"starting etcd on 127.0.0.1:{etcd_port}")
        etcd = record("etcd", _start([
            str(binaries.etcd), "--name", "default", "--data-dir", str(directory / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer_port}",
            # A throwaway dev/test store: durability costs seconds per test run on slow disks.
            "--unsafe-no-fsync", "--log-level", "warn",
        ], logs / "etcd.log"))
        wait_for("etcd", lambda: _http_ok(etcd_port, "/health"), READY_TIMEOUT_S, etcd, logs / "etcd.log")

        progress(f"starting kube-apiserver on https://127.0.0.1:{api_port}")
        api = record("kube-apiserver", _start([
            str(binaries.kube_apiserver),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", f"--secure-port={api_port}", "--advertise-address=127.0.0.1",
            f"--cert-dir={directory / 'apiserver-certs'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # No kubelet runs, so nothing can serve the `kubernetes` Service's loopback endpoint.
            "--endpoint-reconciler-type=none",
            # Webhooks and aggregated APIs behind a Service are reached through its endpoints, never by DNS:
            # with no Service network here a DNS lookup of <svc>.<ns>.svc would leave this machine.
            "--enable-aggregator-routing=true",
            "--allow-privileged=true",
            "--profiling=false",
        ], logs / "kube-apiserver.log"))
        ctx = admin_ssl_context(pki)
        wait_for("kube-apiserver", lambda: _https_ok(api_port, "/readyz", ctx), READY_TIMEOUT_S, api,
                 logs / "kube-apiserver.log")
        server = f"https://127.0.0.1:{api_port}"
        (directory / "kubeconfig").write_text(kubeconfig(server, pki, "admin", name))
        (directory / "kubeconfig").chmod(0o600)
        kcm_kubeconfig = directory / "controller-manager.kubeconfig"
        kcm_kubeconfig.write_text(kubeconfig(server, pki, "controller-manager", name))

        progress("starting kube-controller-manager")
        kcm = record("kube-controller-manager", _start([
            str(binaries.kube_controller_manager),
            f"--kubeconfig={kcm_kubeconfig}",
            f"--authentication-kubeconfig={kcm_kubeconfig}",
            f"--authorization-kubeconfig={kcm_kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={kcm_port}",
            f"--cert-dir={directory / 'controller-manager-certs'}",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--leader-elect=false",
            "--controllers=*",
        ], logs / "kube-controller-manager.log"))
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        # The controller-manager serves /healthz with a self-signed certificate of its own.
        insecure.verify_mode = ssl.CERT_NONE
        wait_for("kube-controller-manager", lambda: _https_ok(kcm_port, "/healthz", insecure),
                 READY_TIMEOUT_S, kcm, logs / "kube-controller-manager.log")
    except BaseException:
        _stop_pids(pids)
        raise
    state = ClusterState.load(directory)
    progress("control plane ready")
    return state


def _write_state(directory: Path, state: ClusterState) -> None:
    tmp = directory / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.replace(directory / STATE_FILE)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _stop_pids(pids: dict[str, int], clock: Callable[[], float] = time.monotonic) -> None:
    """SIGTERM every process group, wait for them to exit, SIGKILL what remains."""
    # Stop in reverse start order: controller-manager, apiserver, then etcd.
    order = list(pids.items())[::-1]
    for _, pid in order:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = clock() + STOP_GRACE_S
    while clock() < deadline and any(_alive(pid) for _, pid in order):
        time.sleep(0.1)
    for _, pid in order:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def down(directory: Path, keep_logs: bool = False) -> None:
    """Stop the cluster in `directory` and remove its state (logs too unless `keep_logs`)."""
    state = ClusterState.load(directory)
    _stop_pids(state.pids)
    if keep_logs:
        for child in directory.iterdir():
            if child.name != "logs":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    else:
        shutil.rmtree(directory)


def status(directory: Path) -> dict[str, str]:
    """Return each component's state: `running`, `ready` or `stopped`."""
    state = ClusterState.load(directory)
    out = {name: ("running" if _alive(pid) else "stopped") for name, pid in state.pids.items()}
    if out.get("kube-apiserver") == "running":
        port = int(state.server.rsplit(":", 1)[1])
        with contextlib.suppress(OSError, http.client.HTTPException, ssl.SSLError):
            if _https_ok(port, "/readyz", admin_ssl_context(directory / "pki")):
                out["kube-apiserver"] = "ready"
    return out


# ------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Run `hack/cluster up|down|status`."""
    p = argparse.ArgumentParser(prog="hack/cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["up", "down", "status"])
    p.add_argument("--dir", type=Path, required=True, help="state directory of this cluster")
    p.add_argument("--etcd", type=Path, help="etcd binary (up)")
    p.add_argument("--kube-apiserver", type=Path, help="kube-apiserver binary (up)")
    p.add_argument("--kube-controller-manager", type=Path, help="kube-controller-manager binary (up)")
    args = p.parse_args(argv)
    directory: Path = args.dir.resolve()
    try:
        if args.command == "up":
            if not (args.etcd and args.kube_apiserver and args.kube_controller_manager):
                p.error("up needs --etcd, --kube-apiserver and --kube-controller-manager")
            state = up(directory, Binaries(args.etcd, args.kube_apiserver, args.kube_controller_manager),
                       progress=lambda m: print(f"[cluster] {m}", file=sys.stderr))
            print(f"[cluster] API server {state.server}; logs in {directory / 'logs'}", file=sys.stderr)
            print(f"export KUBECONFIG={state.kubeconfig}")
        elif args.command == "down":
            down(directory)
            print(f"[cluster] stopped and removed {directory}", file=sys.stderr)
        else:
            for component, st in status(directory).items():
                print(f"{component}: {st}")
            print(f"kubeconfig: {ClusterState.load(directory).kubeconfig}")
    except ClusterError as e:
        print(f"hack/cluster {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
