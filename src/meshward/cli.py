"""The `meshward` user CLI: the commands platform teams run by hand.

`meshward ca status` shows the mesh CA's roots and rotation phase; `meshward ca rotate`
asks the operator to rotate it (the same annotation a GitOps repository can set).
`meshward explain` compiles a pod's config from the cluster with the operator's own
functions (invalid policies left out, and named) and decides a request with the agent's
own pipeline, showing every rule. `meshward envoy-bootstrap` prints the Envoy bootstrap
that goes with a `meshward-sidecar`, to run the two without Kubernetes. `meshward inject`
prints manifests with the mesh injected into their opted-in pods (as the webhook would, for
pipelines that render manifests first); `meshward check` lists pods that opted in but run
without the mesh.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from meshward._version import __version__

if TYPE_CHECKING:  # imported where used: `meshward --version` stays instant
    from meshward.sidecar.domain.envoy import Endpoint

USAGE = ("usage: meshward [--version] {ca {status,rotate} | explain (--pod POD -n NS | --config FILE) "
         "[--method M] [--path P] [--peer SPIFFE] [--token JWT | --claims JSON] [--tcp --port N] "
         "| envoy-bootstrap --app PORT [--listen PORT] [--authz ADDR] [--sds unix:PATH | --cert F --key F --ca F] "
         "| inject -f FILE --image IMAGE | check} [--kubeconfig FILE]")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshward", usage=USAGE.removeprefix("usage: "),
                                description="Meshward's command line.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command")
    ca = sub.add_parser("ca", help="the mesh CA")
    ca.add_argument("action", choices=["status", "rotate"], help="status: roots and phase; rotate: start a rotation")
    ca.add_argument("--namespace", default="meshward-system", help="the operator's namespace (default meshward-system)")
    ca.add_argument("--kubeconfig", default=None, help="kubeconfig file (default $KUBECONFIG or ~/.kube/config)")
    ex = sub.add_parser("explain", help="how a workload's agent would decide a request, rule by rule")
    src = ex.add_mutually_exclusive_group(required=True)
    src.add_argument("--pod", help="the pod whose config to compile from the cluster (with --namespace)")
    src.add_argument("--config", help="a SidecarConfig file instead of the cluster")
    ex.add_argument("-n", "--namespace", default="default", help="the pod's namespace (default default)")
    ex.add_argument("--method", default="GET")
    ex.add_argument("--path", default="/")
    ex.add_argument("--host", default="")
    ex.add_argument("--port", type=int, default=None)
    ex.add_argument("--peer", default=None, help="the caller's SPIFFE ID (mTLS peer)")
    ex.add_argument("--tcp", action="store_true",
                    help="a TCP connection to --port instead of an HTTP request (only peer and port are known)")
    who = ex.add_mutually_exclusive_group()
    who.add_argument("--token", help="an end-user JWT, checked as the agent checks it but for its signature")
    who.add_argument("--claims", help='end-user claims as JSON, e.g. \'{"iss": "...", "sub": "alice"}\'; '
                                      "aud, iat and exp are filled in when missing")
    ex.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default cluster.local)")
    ex.add_argument("--kubeconfig", default=None, help="kubeconfig file (default $KUBECONFIG or ~/.kube/config)")
    eb = sub.add_parser("envoy-bootstrap", help="print the Envoy bootstrap that goes with a meshward-sidecar")
    eb.add_argument("--app", type=int, required=True, help="the app's port on 127.0.0.1 (where allowed requests go)")
    eb.add_argument("--listen", default="0.0.0.0:15006",
                    help="Envoy's inbound listener, host:port (default 0.0.0.0:15006)")
    eb.add_argument("--admin", default="unix:/var/run/meshward/envoy-admin.sock",
                    help="Envoy's admin address; a Unix socket is created mode 0600, out of the app's reach "
                         "(default unix:/var/run/meshward/envoy-admin.sock)")
    eb.add_argument("--authz", default="unix:/var/run/meshward/authz.sock",
                    help="the agent's ext_authz address, as its --http-listen/--grpc-listen (default "
                         "unix:/var/run/meshward/authz.sock)")
    eb.add_argument("--transport", choices=["http", "grpc"], default="http", help="ext_authz transport (default http)")
    tls = eb.add_mutually_exclusive_group()
    tls.add_argument("--sds", help="the agent's --sds-listen (unix:/path): mTLS with the workload certificate")
    tls.add_argument("--cert", help="mTLS with this certificate file (with --key and --ca)")
    eb.add_argument("--key", help="the certificate's private key file")
    eb.add_argument("--ca", help="the CA bundle client certificates must chain to")
    eb.add_argument("--node", default="meshward-workload", help="Envoy's node id (default meshward-workload)")
    eb.add_argument("--format", choices=["yaml", "json"], default="yaml")
    inj = sub.add_parser("inject", help="print manifests with the mesh injected into their opted-in pods")
    inj.add_argument("-f", "--filename", required=True, help="a YAML file of manifests ('-': stdin)")
    inj.add_argument("--image", required=True, help="the Meshward image the chart installed (its image.repository:tag)")
    inj.add_argument("--pull-policy", default="IfNotPresent", help="imagePullPolicy of the injected containers")
    inj.add_argument("--operator-namespace", default="meshward-system",
                     help="where the operator runs (default meshward-system)")
    inj.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default cluster.local)")
    inj.add_argument("--namespace-opted-in", action="store_true",
                     help="treat pods without the label as opted in (their namespace is labelled)")
    chk = sub.add_parser("check", help="list pods that opted in to the mesh but run without it")
    chk.add_argument("--operator-namespace", default="meshward-system",
                     help="where the operator runs (default meshward-system)")
    chk.add_argument("--kubeconfig", default=None, help="kubeconfig file (default $KUBECONFIG or ~/.kube/config)")
    return p


def _inject(args: argparse.Namespace) -> int:
    import yaml

    from meshward._version import __version__ as version
    from meshward.operator.domain.inject import InjectRefused, InjectSettings, inject_manifest

    settings = InjectSettings(image=args.image, operator_namespace=args.operator_namespace,
                              trust_domain=args.trust_domain, version=version, image_pull_policy=args.pull_policy)
    try:
        text = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text()
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except OSError as e:
        print(f"meshward: -f {args.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except yaml.YAMLError as e:
        print(f"meshward: -f {args.filename}: not YAML: {e}", file=sys.stderr)
        return 2
    out = []
    # The manifests' own Services: the ports they declare TCP are declared on the pods they select, as in the cluster.
    services = [d for d in docs if isinstance(d, dict) and d.get("kind") == "Service" and d.get("apiVersion") == "v1"]
    for n, doc in enumerate(docs):
        if not isinstance(doc, dict):
            print(f"meshward: -f {args.filename}: document {n + 1} is not a manifest", file=sys.stderr)
            return 2
        try:
            out.append(inject_manifest(doc, settings, args.namespace_opted_in, services))
        except InjectRefused as e:
            print(f"meshward: document {n + 1}: {e}", file=sys.stderr)
            return 2
    print(yaml.safe_dump_all(out, sort_keys=False), end="")
    return 0


def _check(args: argparse.Namespace) -> int:
    from meshward.operator.clients.kube import KubeClient, KubeError
    from meshward.operator.domain.destinations import ports_outside_mesh, tcp_declarations_pending
    from meshward.operator.domain.inject import INJECT_LABEL, is_injected, may_become_the_proxy, unprotected

    try:
        kube = KubeClient.from_kubeconfig(args.kubeconfig)
        pods = kube.list_pods(None, "")
        namespaces = set(kube.namespaces(f"{INJECT_LABEL}=enabled"))
        meshed = sorted({str(p.get("metadata", {}).get("namespace", "")) for p in pods if is_injected(p)})
        services = [svc for ns in meshed for svc in kube.list_services(ns)]
    except KubeError as e:
        print(f"meshward: {e}", file=sys.stderr)
        return 1
    bad = unprotected(pods, namespaces, args.operator_namespace)
    for key in bad:
        print(f"UNPROTECTED {key}: opted in to the mesh but runs without its sidecar (created while the webhook "
              "was bypassed, or labelled afterwards); restart it to inject it")
    for pod in pods:
        meta = pod.get("metadata", {})
        names = may_become_the_proxy(pod) if is_injected(pod) and not meta.get("deletionTimestamp") else []
        if names:
            print(f"WARNING {meta.get('namespace')}/{meta.get('name')}: container(s) {', '.join(names)} may run as "
                  "root with CAP_SETUID and so could switch to the mesh proxy's UID 1337, whose traffic is not "
                  "captured; set runAsNonRoot: true (or a non-zero runAsUser), or drop the SETUID capability")
    outside = ports_outside_mesh(pods)
    for key, ports in outside:
        print(f"OUTSIDE-MESH {key} port{'s' if len(ports) > 1 else ''} {','.join(map(str, ports))}: a declared "
              "container port excluded from capture (meshward.io/exclude-inbound-ports); plaintext reaches the "
              "app there from anyone and no AuthPolicy applies")
    for key, pending in tcp_declarations_pending(pods, services):
        print(f"RESTART {key}: {'; '.join(f'port {port} declared TCP by {by}' for port, by in pending.items())}, "
              "after the pod was created: its callers speak HTTP to it there until it restarts "
              "(kubectl rollout restart)")
    if not bad:
        print(f"ok: all {len(pods)} pods checked; none runs opted in without the mesh"
              + (f"; {len(outside)} leave declared ports outside it" if outside else ""))
    return 1 if bad else 0  # an excluded port is the pod's explicit choice: said, not failed


def _endpoint(text: str, flag: str) -> Endpoint:
    """An Envoy endpoint from `unix:/path` or `host:port`; SystemExit naming the flag otherwise."""
    from meshward.sidecar.domain.envoy import Endpoint

    if text.startswith("unix:/"):
        return Endpoint(unix=text.removeprefix("unix:"))
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SystemExit(f"meshward: {flag} {text!r}: use host:port or unix:/path")
    return Endpoint(host=host.strip("[]"), port=int(port))


def _admin_endpoint(text: str) -> Endpoint:
    """Envoy's admin address from --admin: a Unix socket only its own user may open (mode 0600)."""
    from meshward.sidecar.domain.envoy import ADMIN_SOCKET_MODE, Endpoint

    ep = _endpoint(text, "--admin")
    return Endpoint(unix=ep.unix, mode=ADMIN_SOCKET_MODE) if ep.unix else ep


def _envoy_bootstrap(args: argparse.Namespace) -> int:
    import json

    import yaml

    from meshward.sidecar.domain.envoy import (
        Endpoint,
        InboundConfig,
        SdsTls,
        Tls,
        build_inbound_bootstrap,
        check_bootstrap,
    )

    tls: Tls | SdsTls | None = None
    if args.sds:
        sds = _endpoint(args.sds, "--sds")
        if sds.unix is None:
            raise SystemExit("meshward: --sds: the agent serves SDS on a Unix socket only (unix:/path)")
        tls = SdsTls(sds)
    elif args.cert or args.key or args.ca:
        if not (args.cert and args.key and args.ca):
            raise SystemExit("meshward: --cert, --key and --ca go together")
        tls = Tls(args.cert, args.key, args.ca)
    boot = build_inbound_bootstrap(InboundConfig(
        listen=_endpoint(args.listen, "--listen"), admin=_admin_endpoint(args.admin), app=Endpoint(port=args.app),
        authz=_endpoint(args.authz, "--authz"), transport=args.transport, tls=tls, node=args.node))
    check_bootstrap(boot)
    print(json.dumps(boot, indent=2) if args.format == "json" else yaml.safe_dump(boot, sort_keys=False), end="")
    return 0


def _cluster_config(args: argparse.Namespace) -> tuple[dict[str, object], str, list[str]] | None:
    """The pod's config compiled from the cluster as the operator compiles it, its description and notes."""
    from meshward.operator.clients.kube import KubeClient
    from meshward.operator.domain.compile import (
        PolicyInvalid,
        policy_object,
        revocation_entries,
        validate,
        workload_config,
        workload_of,
    )
    from meshward.operator.domain.inject import INJECT_LABEL

    kube = KubeClient.from_kubeconfig(args.kubeconfig)
    pod = kube.read_pod(args.namespace, args.pod)
    if pod is None:
        print(f"meshward: no pod {args.namespace}/{args.pod}", file=sys.stderr)
        return None
    notes, valid = [], []
    for body in kube.list_custom("authpolicies", args.namespace):
        p = policy_object(body)
        try:
            validate(p)
            valid.append(p)
        except PolicyInvalid as e:
            notes.append(f"{p.key} generation {p.generation} is invalid ({e}); the operator keeps enforcing its "
                         "last valid generation, which the cluster does not store: this explanation leaves it out")
    revoked = [e for b in kube.list_custom("revocations") for e in revocation_entries(b)]
    neighbours = [workload_of(b) for b in kube.list_pods(args.namespace, f"{INJECT_LABEL}=enabled")]
    compiled = workload_config(workload_of(pod), valid, revoked, dt.datetime.now(dt.UTC), neighbours,
                               args.trust_domain)
    return (compiled.document, f"pod {args.namespace}/{args.pod} ({len(compiled.policies)} selecting policies)",
            notes)


def _explain(args: argparse.Namespace) -> int:
    import json

    import yaml

    from meshward.operator.clients.kube import KubeError
    from meshward.sidecar.config.schema import ConfigError, parse_config
    from meshward.sidecar.domain.explain import render
    from meshward.sidecar.domain.request import CheckInput, connection, split_path
    from meshward.sidecar.domain.snapshot import compile_snapshot
    from meshward.sidecar.engines.explain import explain

    notes: list[str] = []
    try:
        if args.config:
            with open(args.config) as f:
                doc = yaml.safe_load(f)
            source = args.config
        else:
            found = _cluster_config(args)
            if found is None:
                return 1
            doc, source, notes = found
        snapshot = compile_snapshot(parse_config(doc))
        claims = json.loads(args.claims) if args.claims else None
        if claims is not None and not isinstance(claims, dict):
            raise ValueError("--claims must be a JSON object")
        if args.tcp and (args.token or args.claims or args.port is None):
            raise ValueError("--tcp explains a connection to --port: it needs --port and takes no --token or "
                             "--claims (a TCP connection carries no end user)")
    except (KubeError, OSError) as e:
        print(f"meshward: {e}", file=sys.stderr)
        return 1
    except (ConfigError, ValueError) as e:
        print(f"meshward: cannot explain: {e}", file=sys.stderr)
        return 1
    inp = connection(args.host, args.peer, args.port) if args.tcp else CheckInput(
        method=args.method.upper(), path=split_path(args.path), host=args.host, peer=args.peer, port=args.port)
    result = explain(snapshot, inp, token=args.token, claims=claims)
    print(f"config: {source}")
    for note in notes:
        print(f"note: {note}")
    print(render(result))
    return 0 if result.status == 200 else 3


def _ca(args: argparse.Namespace) -> int:
    # Imported here so `meshward --version` stays instant.
    from meshward.operator.clients.kube import KubeClient, KubeError
    from meshward.operator.engines.ca_store import ROTATE_ANNOTATION, SECRET_NAME, CaStoreError, decode

    try:
        kube = KubeClient.from_kubeconfig(args.kubeconfig)
        secret = kube.read_secret(args.namespace, SECRET_NAME)
        if secret is None:
            print(f"meshward: no Secret {args.namespace}/{SECRET_NAME}: is the operator installed in "
                  f"{args.namespace}? (--namespace)", file=sys.stderr)
            return 1
        stored = decode(secret, f"{args.namespace}/{SECRET_NAME}")
        if args.action == "rotate":
            if stored.state.phase != "steady":
                print(f"meshward: a rotation is already in phase {stored.state.phase}; nothing to do",
                      file=sys.stderr)
                return 1
            kube.annotate_secret(args.namespace, SECRET_NAME,
                                 {ROTATE_ANNOTATION: dt.datetime.now(dt.UTC).isoformat()})
            print("rotation requested: the operator stages a new root on its next check "
                  "(follow with: meshward ca status)")
            return 0
    except (KubeError, CaStoreError) as e:
        print(f"meshward: {e}", file=sys.stderr)
        return 1
    state = stored.state
    now = dt.datetime.now(dt.UTC)
    print(f"phase: {state.phase}" + (f" (since {state.since:%Y-%m-%dT%H:%M:%SZ})" if state.since else ""))
    for role, cert in (("next", state.next.cert if state.next else None), ("active", state.active.cert),
                       ("previous", state.previous)):
        if cert is not None:
            left = cert.not_valid_after_utc - now
            print(f"{role:9} serial {cert.serial_number:x}  expires {cert.not_valid_after_utc:%Y-%m-%d} "
                  f"({left.days} days left)  sha256 {base64.b16encode(cert.fingerprint(cert.signature_hash_algorithm)).decode()[:16]}")  # type: ignore[arg-type]  # noqa: E501
    if stored.rotation_requested:
        print("rotation requested; waiting for the operator")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code."""
    args = _parser().parse_args(argv)
    if args.version or args.command is None:
        print(f"meshward {__version__}")
        if not args.version:
            print(USAGE)
        return 0
    if args.command == "explain":
        return _explain(args)
    if args.command == "envoy-bootstrap":
        return _envoy_bootstrap(args)
    if args.command == "inject":
        return _inject(args)
    if args.command == "check":
        return _check(args)
    return _ca(args)


if __name__ == "__main__":
    sys.exit(main())
