"""Envoy configuration Meshward generates: one pure builder, covered by golden files.

Why one builder: the agent, the injection webhook (later) and the tests must run
the same Envoy config, whose security properties are the point:
- `failure_mode_allow: false`, and errors or timeouts of the agent answer 503;
- every client-sent `x-meshward-*` header is removed before any filter runs
  (early header mutation), so the request attributes the HTTP transport passes in
  `x-meshward-authz-*` headers can only come from Envoy's own command operators;
- paths are normalized (RFC 3986 §6), slashes merged, escaped slashes unescaped
  and redirected, and a trailing dot dropped from the host, before authorization sees
  them;
- headers with an underscore in their name are dropped: WSGI/CGI (and PHP) apps read
  `x_meshward_sub` as `HTTP_X_MESHWARD_SUB`, the variable of Meshward's own header;
- the HTTP/1.1 ext_authz transport is the default (measured ~3x the gRPC rate);
- with SDS, the workload certificate and trust bundle come from the agent over a Unix
  socket and rotate without a restart; inbound admits any SPIFFE ID of the trust
  domain (policy decides who may call), outbound pins the exact SPIFFE ID of its peer;
- context tokens (docs/context-tokens.md): the wire header `x-meshward-context` is the
  one `x-meshward-*` header let through inbound (the agent verifies it); outbound, a
  request carrying the app's context header to a meshed address whose identities have
  one audience (one workload, or one namespace: domain/context.py, audience_for) is
  checked by the agent, which exchanges the token; toward anything else the header is
  removed (plaintext HTTP/1 to non-meshed addresses is recognized for that);
- every HTTP an app speaks goes through (HttpSettings, per workload): WebSocket upgrades on
  the inbound and outbound routes (authorized at the handshake like any request), no route
  timeout by default (the app's own timeouts rule, as under Istio: Envoy's default 15 s cut
  SSE, long polls and slow downloads), a stream idle timeout (5 minutes), HTTP/1.0 only
  when the workload asks for it (Envoy answers it 426 otherwise);
- Protocols: a request keeps the protocol the calling app spoke, on every hop. The connection managers' codec is
  AUTO (Envoy's default): the client's outbound listener takes HTTP/1.1 and HTTP/2 (gRPC, h2c with prior
  knowledge: the preface is detected). The mesh cluster and the server's `inbound_app` cluster follow the
  downstream's protocol (`use_downstream_protocol_config`), so an HTTP/2 request crosses the mTLS hop as HTTP/2
  and reaches the app as cleartext HTTP/2 with prior knowledge (what a gRPC server expects), and an HTTP/1.1
  request stays HTTP/1.1 on a connection of its own pool. The server's inbound needs no ALPN to tell them apart:
  no `alpn_protocols` is set on its TLS context, so none is negotiated and its AUTO codec reads the bytes (the
  HTTP/2 preface). Decided: HTTP/1.1 callers are never multiplexed onto HTTP/2 between the pods (Linkerd's way),
  so the HTTP/1.1 hop is exactly what it was (the same codec, pool and connection reuse; WebSocket upgrades and
  HTTP/1.0 unchanged); upgrading them was not measured and is not needed for correctness. An `Upgrade: h2c`
  request is HTTP/1.1 and stays so (Envoy strips the upgrade). Measured (tests/integration/test_grpc_routes.py):
  before, every RPC failed `UNAVAILABLE ... protocol error` and an h2c-only app answered 502;
- TCP (issue 20): to a port its workload declares TCP, every connection is tunnelled over mTLS as one HTTP/2
  POST (TCP_ALPN, TCP_TUNNEL_PATH), never sniffed; the receiving Envoy asks its agent about the connection (L4
  rules) and carries the bytes to the app; other ports refuse the ALPN (the constants' comment says why);
- both IP families where the pod has IPv6 (`ipv6`): the inbound and health listeners take
  connections on `[::]` as well as `0.0.0.0`, the outbound one on `[::1]` as well as
  `127.0.0.1` (where the kernel redirects the app's connections over IPv6, domain/capture.py),
  each as one listener with an additional address, so both families meet the same filter
  chains; meshed IPv6 addresses are matched by /128 prefixes like IPv4 ones by /32.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from meshward.sidecar.domain.capture import (
    INBOUND_PORT,
    OUTBOUND_LISTENER_DSCP,
    OUTBOUND_PORT,
    PROXY_DSCP,
    PROXY_HEALTH_PORT,
)
from meshward.sidecar.domain.context import WIRE_HEADER, audience_for, context_headers
from meshward.sidecar.domain.egress import Allowed, Egress, ordered

# Request attributes the HTTP transport receives as headers, set by Envoy itself.
ATTR_PEER = "x-meshward-authz-peer"
ATTR_PORT = "x-meshward-authz-port"
ATTR_HOST = "x-meshward-authz-host"
# Set only by the outbound listener: the destination's SPIFFE IDs, comma-separated (the check is a context exchange).
ATTR_DEST = "x-meshward-authz-dest"
# Set only by the inbound TCP chains (value L4_TCP): the check is for a TCP connection tunnelled over mTLS.
ATTR_L4 = "x-meshward-authz-l4"
L4_TCP = "tcp"
ATTRIBUTE_HEADERS = (ATTR_PEER, ATTR_PORT, ATTR_HOST, ATTR_DEST, ATTR_L4)
# TCP over mTLS (issue 20): the calling Envoy opens mTLS with this ALPN and tunnels the connection as one HTTP/2
# POST to this path (POST, not CONNECT: to the HTTP ext_authz transport it is an ordinary request); the receiving
# Envoy takes it only on a port the workload declares TCP, asks its agent (ATTR_L4), and carries the bytes to the
# app. ALPN `meshward-tcp` to any other port is refused: undeclared ports are HTTP's.
TCP_ALPN = "meshward-tcp"
TCP_TUNNEL_PATH = "/meshward.tcp"
# A tunnelled connection with no byte either way for this long is closed: tcp_proxy's own default (and Istio's),
# not the HTTP stream idle timeout (5 min), which would cut idle database connections.
TCP_IDLE_TIMEOUT_S = 3600.0
# How long a tunnel's request head may take to arrive (a caller's Envoy sends it at once).
TUNNEL_HEAD_TIMEOUT_S = 10.0
# Open tunnels one declared port takes (the connection_limit filter of its chain): an admitted peer holding idle
# tunnels crowds out that port's other callers at most, never the pod's HTTP, whose `inbound_app` cluster tunnels
# do not share (they have INBOUND_TCP_APP). A database's connection pool stays far below it.
TCP_TUNNELS_PER_PORT = 4096
OWNED_PREFIX = "x-meshward-"
# Deny responses carry these to the client; nothing else of the agent's response leaks.
CLIENT_HEADERS = ("www-authenticate", "content-type", "x-meshward-decision-id")
# Headers the agent reads besides its attributes (the token sources, request id and context token).
DEFAULT_ALLOWED_HEADERS = ("authorization", "cookie", "x-request-id", WIRE_HEADER)
# Headers the agent may set on the request to the app: its own, the app's context header (spec.context.header,
# any `x-` name), and `cookie` (rewritten without the cookie that carried the token).
UPSTREAM_HEADERS = ({"prefix": "x-"}, {"exact": "cookie"})
# The agent answers in well under a millisecond; a slow answer is a sick agent, and denies.
DEFAULT_AUTHZ_TIMEOUT_S = 0.5

Transport = Literal["http", "grpc"]


@dataclass(frozen=True)
class Endpoint:
    """Where something listens: a Unix socket path (with the mode Envoy creates it with) or a TCP host and port."""

    unix: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    mode: int | None = None

    def address(self) -> dict[str, Any]:
        """The Envoy `Address` of this endpoint."""
        if self.unix:
            return {"pipe": {"path": self.unix, **({"mode": self.mode} if self.mode is not None else {})}}
        return {"socket_address": {"address": self.host, "port_value": self.port}}


@dataclass(frozen=True)
class Tls:
    """Downstream mTLS: the workload's certificate and key, the trust bundle, client certs required."""

    cert_file: str
    key_file: str
    ca_file: str
    require_client_certificate: bool = True


@dataclass(frozen=True)
class SdsTls:
    """mTLS with the workload certificate and trust bundle served by the agent over SDS."""

    sds: Endpoint
    require_client_certificate: bool = True


@dataclass(frozen=True)
class Outbound:
    """A local plaintext listener whose requests go to one peer over mTLS, pinned to its SPIFFE ID."""

    name: str
    listen: Endpoint
    upstream: Endpoint
    peer: str
    # Recycle upstream connections after this many requests (None: Envoy's default, unlimited).
    max_requests_per_connection: int | None = None


# SDS resource names the agent serves (sidecar/servers/sds.py).
SDS_CERT, SDS_ROOTCA, SDS_BUNDLE = "default", "ROOTCA", "BUNDLE"


@dataclass(frozen=True)
class InboundConfig:
    """The inbound side of one workload's Envoy."""

    listen: Endpoint
    admin: Endpoint
    app: Endpoint
    authz: Endpoint
    transport: Transport = "http"
    tls: Tls | SdsTls | None = None
    # Envoy's node identity (SDS requires one); the webhook sets <namespace>/<pod>.
    node: str = "meshward-workload"
    outbound: tuple[Outbound, ...] = ()
    authz_timeout_s: float = DEFAULT_AUTHZ_TIMEOUT_S
    allowed_headers: tuple[str, ...] = DEFAULT_ALLOWED_HEADERS
    http: HttpSettings = field(default_factory=lambda: HttpSettings())


_HCM = "envoy.filters.network.http_connection_manager"

# A stream with no bytes either way for this long is reset: Envoy's and Istio's default, kept explicit so a workload
# can change it (meshward.io/stream-idle-timeout). A slow but flowing download or a chatty WebSocket never idles.
DEFAULT_STREAM_IDLE_TIMEOUT_S = 300.0
# Bounds of the per-workload timeouts (the injector refuses annotations outside them): a day is longer than any
# request a proxy should hold open, and under a second cuts ordinary requests.
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 1.0, 86_400.0


_DURATION = re.compile(r"(\d{1,6}(?:\.\d{1,3})?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, *, zero_is_none: bool = False) -> float:
    """Seconds of a duration written like Kubernetes' and Istio's (`30s`, `5m`, `1.5h`; `0` where `zero_is_none`).

    Raises ValueError saying the form and the bounds (MIN_TIMEOUT_S to MAX_TIMEOUT_S).
    """
    if zero_is_none and text.strip() in ("0", "0s"):
        return 0.0
    form = f"a duration from {MIN_TIMEOUT_S:g}s to {MAX_TIMEOUT_S / 3600:g}h like 30s, 5m or 1h" + \
        (" (0: none)" if zero_is_none else "")
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not {form}")
    seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if not MIN_TIMEOUT_S <= seconds <= MAX_TIMEOUT_S:
        raise ValueError(f"{text!r} is out of bounds: want {form}")
    return seconds


@dataclass(frozen=True)
class HttpSettings:
    """How one workload's Envoy treats HTTP streams, on its inbound and outbound routes alike.

    `route_timeout_s` 0 is no route timeout (Envoy's own default is 15 s from the end of the request to the end of
    the response: it cut SSE, long polls and slow clients' downloads); WebSocket sessions are never bounded by it,
    only by `stream_idle_timeout_s`. `accept_http10`: HTTP/1.0 requests (and 0.9) instead of Envoy's 426.
    """

    route_timeout_s: float = 0.0
    stream_idle_timeout_s: float = DEFAULT_STREAM_IDLE_TIMEOUT_S
    accept_http10: bool = False

    def hcm(self) -> dict[str, Any]:
        """The HTTP connection manager's settings for these (WebSocket upgrades are always on)."""
        return {"stream_idle_timeout": _duration(self.stream_idle_timeout_s),
                "http_protocol_options": {"accept_http_10": self.accept_http10},
                "upgrade_configs": [{"upgrade_type": "websocket"}]}

    def routes(self, match: dict[str, Any], action: dict[str, Any], **extra: Any) -> list[dict[str, Any]]:
        """The routes sending `match` to `action`: with the route timeout, and WebSocket upgrades without it."""
        def route(match: dict[str, Any], timeout_s: float) -> dict[str, Any]:
            # Copies: one object shared by two routes would be one YAML anchor in the golden files.
            return copy.deepcopy({"match": match, "route": {**action, "timeout": _duration(timeout_s)}, **extra})

        routes = [route(match, self.route_timeout_s)]
        if self.route_timeout_s:
            websocket = {**match, "headers": [*match.get("headers", []), {
                "name": "upgrade", "string_match": {"exact": "websocket", "ignore_case": True}}]}
            routes.insert(0, route(websocket, 0))
        return routes


def _router() -> dict[str, Any]:
    return {"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def _hcm(stat_prefix: str, route_config: dict[str, Any], http_filters: list[dict[str, Any]] | None = None,
         **settings: Any) -> dict[str, Any]:
    """An HTTP connection manager's typed config: its `settings`, `route_config`, then the filters (the router)."""
    return {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                     "HttpConnectionManager",
            "stat_prefix": stat_prefix, **settings, "route_config": route_config,
            "http_filters": http_filters if http_filters is not None else [_router()]}


def _to_cluster(name: str, host: str, cluster: str, http: HttpSettings) -> dict[str, Any]:
    """A route config sending every request to `cluster`."""
    return {"name": name, "virtual_hosts": [{"name": host, "domains": ["*"], "routes": http.routes(
        {"prefix": "/"}, {"cluster": cluster})}]}


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


_EXT_AUTHZ = "envoy.filters.http.ext_authz"


def _http_service(timeout_s: float, attributes: list[dict[str, str]], upstream: list[dict[str, str]]
                  ) -> dict[str, Any]:
    """The HTTP ext_authz transport to the agent: the request `attributes` Envoy adds, the headers it may set."""
    return {
        "server_uri": {"uri": "http://meshward-authz", "cluster": "meshward_authz", "timeout": _duration(timeout_s)},
        "authorization_request": {"headers_to_add": attributes},
        "authorization_response": {
            "allowed_upstream_headers": {"patterns": upstream},
            "allowed_client_headers": {"patterns": [{"exact": h} for h in CLIENT_HEADERS]},
        },
    }


def _ext_authz_filter(allowed_headers: tuple[str, ...], service: dict[str, Any]) -> dict[str, Any]:
    """The ext_authz filter, fail-closed, sending the agent `allowed_headers` over `service`."""
    return {"name": _EXT_AUTHZ, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "failure_mode_allow": False,
        "status_on_error": {"code": "ServiceUnavailable"},
        "include_peer_certificate": False,
        "allowed_headers": {"patterns": [{"exact": h} for h in allowed_headers]},
        **service}}


def _ext_authz(transport: Transport, timeout_s: float, allowed_headers: tuple[str, ...],
               extra: tuple[dict[str, str], ...] = ()) -> dict[str, Any]:
    """The inbound ext_authz filter over `transport`; `extra` attributes Envoy adds over HTTP (gRPC: none)."""
    if transport == "grpc":
        service: dict[str, Any] = {"grpc_service": {"envoy_grpc": {"cluster_name": "meshward_authz"},
                                                    "timeout": _duration(timeout_s)}}
    else:
        service = {"http_service": _http_service(timeout_s, [
            {"key": ATTR_PEER, "value": "%DOWNSTREAM_PEER_URI_SAN%"},
            {"key": ATTR_PORT, "value": "%DOWNSTREAM_LOCAL_PORT%"},
            {"key": ATTR_HOST, "value": "%REQ(:AUTHORITY)%"},
            *extra,
        ], list(UPSTREAM_HEADERS))}
    return _ext_authz_filter(allowed_headers, service)


_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _protocol_options(config: dict[str, Any], **common: Any) -> dict[str, Any]:
    """A cluster's `typed_extension_protocol_options`: which HTTP it speaks upstream (`config`), and `common`."""
    return {_PROTOCOL_OPTIONS: {"@type": f"type.googleapis.com/{_PROTOCOL_OPTIONS}",
                                **({"common_http_protocol_options": common} if common else {}),
                                **copy.deepcopy(config)}}  # a copy: one object twice is a YAML anchor


# The mesh's hops (client Envoy -> server Envoy -> app) speak the protocol the app's client spoke: an HTTP/1.1
# request goes out on an HTTP/1.1 connection of its own pool, exactly as before HTTP/2 was carried; an HTTP/2
# request (gRPC, h2c) on an HTTP/2 connection (module docstring, "Protocols").
FOLLOW_DOWNSTREAM: dict[str, Any] = {"use_downstream_protocol_config": {
    "http_protocol_options": {}, "http2_protocol_options": {}}}


def _cluster(name: str, ep: Endpoint, http2: bool) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name, "type": "STATIC", "connect_timeout": "0.25s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": ep.address()}}]}]},
    }
    if http2:
        c["typed_extension_protocol_options"] = _protocol_options({"explicit_http_config": {
            "http2_protocol_options": {}}})
    return c


def _sds_secret(name: str) -> dict[str, Any]:
    return {"name": name, "sds_config": {"resource_api_version": "V3", "api_config_source": {
        "api_type": "GRPC", "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "meshward_sds"}}]}}}


def _downstream_tls(tls: Tls | SdsTls) -> dict[str, Any]:
    common: dict[str, Any] = {"tls_params": {"tls_minimum_protocol_version": "TLSv1_2"}}
    if isinstance(tls, SdsTls):
        common["tls_certificate_sds_secret_configs"] = [_sds_secret(SDS_CERT)]
        common["validation_context_sds_secret_config"] = _sds_secret(SDS_ROOTCA)
    else:
        common["tls_certificates"] = [{"certificate_chain": {"filename": tls.cert_file},
                                       "private_key": {"filename": tls.key_file}}]
        common["validation_context"] = {"trusted_ca": {"filename": tls.ca_file}}
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": tls.require_client_certificate,
        "common_tls_context": common}}


def _upstream_mtls(peers: list[dict[str, str]]) -> dict[str, Any]:
    """The transport socket of mTLS to an upstream: the workload certificate (SDS), its URI SAN one of `peers`."""
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
            "tls_certificate_sds_secret_configs": [_sds_secret(SDS_CERT)],
            "combined_validation_context": {
                "default_validation_context": {"match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": m} for m in peers]},
                "validation_context_sds_secret_config": _sds_secret(SDS_BUNDLE)},
        }}}


def _outbound(out: Outbound, http: HttpSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    cluster = _cluster(f"outbound_{out.name}", out.upstream, http2=False)
    cluster["transport_socket"] = _upstream_mtls([{"exact": out.peer}])
    common = {} if out.max_requests_per_connection is None else \
        {"max_requests_per_connection": out.max_requests_per_connection}
    cluster["typed_extension_protocol_options"] = _protocol_options(FOLLOW_DOWNSTREAM, **common)
    name = f"outbound_{out.name}"
    hcm = _hcm(name, _to_cluster(name, out.name, name, http), **http.hcm())
    listener = {"name": name, "address": out.listen.address(), "filter_chains": [{"filters": [
        {"name": _HCM, "typed_config": hcm}]}]}
    return listener, cluster


def owned_except(kept: str) -> str:
    """An RE2 regex (no lookahead) matching every `x-meshward-*` header name but `kept`."""
    rest = kept.removeprefix(OWNED_PREFIX)
    if rest == kept or not re.fullmatch(r"[a-z0-9]+", rest):
        raise ValueError(f"{kept!r} is not an {OWNED_PREFIX}<letters and digits> header")
    alternatives = [f"{rest[:i]}[^{rest[i]}].*" for i in range(len(rest))]  # differs at character i
    alternatives += [rest[:i] for i in range(len(rest))] + [f"{rest}.+"]  # a prefix of it, or longer
    return f"{OWNED_PREFIX}(?:{'|'.join(alternatives)})"


def _inbound_hcm(authz: dict[str, Any], cluster: str, http: HttpSettings) -> dict[str, Any]:
    """The inbound HTTP connection manager: header and path hygiene, then ext_authz, then `cluster`.

    A WebSocket handshake is a GET like any other to ext_authz: refused, it never upgrades.
    """
    return _hcm(
        "inbound", _to_cluster("inbound", "app", cluster, http), [authz, _router()],
        **http.hcm(),
        common_http_protocol_options={"headers_with_underscores_action": "DROP_HEADER"},
        strip_trailing_host_dot=True,
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action="UNESCAPE_AND_REDIRECT",
        early_header_mutation_extensions=[{
            "name": "envoy.http.early_header_mutation.header_mutation",
            "typed_config": {
                "@type": ("type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3."
                          "HeaderMutation"),
                "mutations": [{"remove_on_match": {"key_matcher": {"safe_regex": {
                    "regex": owned_except(WIRE_HEADER)}}}}],
            },
        }],
    )


def build_inbound_bootstrap(cfg: InboundConfig) -> dict[str, Any]:
    """Return the Envoy bootstrap (as data) for a workload's inbound listener and its outbound peers."""
    if cfg.outbound and not isinstance(cfg.tls, SdsTls):
        raise ValueError("outbound listeners need the workload certificate: set tls=SdsTls(...)")
    hcm = _inbound_hcm(_ext_authz(cfg.transport, cfg.authz_timeout_s, cfg.allowed_headers), "app", cfg.http)
    chain: dict[str, Any] = {"filters": [{"name": _HCM, "typed_config": hcm}]}
    if cfg.tls is not None:
        chain["transport_socket"] = _downstream_tls(cfg.tls)
    listeners = [{"name": "inbound", "address": cfg.listen.address(), "filter_chains": [chain]}]
    clusters = [_cluster("meshward_authz", cfg.authz, http2=cfg.transport == "grpc"),
                {**_cluster("app", cfg.app, http2=False),
                 "typed_extension_protocol_options": _protocol_options(FOLLOW_DOWNSTREAM)}]
    if isinstance(cfg.tls, SdsTls):
        clusters.append(_cluster("meshward_sds", cfg.tls.sds, http2=True))
    for out in cfg.outbound:
        listener, cluster = _outbound(out, cfg.http)
        listeners.append(listener)
        clusters.append(cluster)
    return {
        "node": {"id": cfg.node, "cluster": cfg.node},
        "admin": {"address": cfg.admin.address()},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


# ------------------------------------------------------------------------------ an injected pod's Envoy


@dataclass(frozen=True)
class PodProxy:
    """The Envoy of an injected pod: everything it needs comes from the agent over Unix sockets."""

    node: str  # <namespace>/<pod>
    socket_dir: str = "/var/run/meshward"
    # Accept plaintext (no peer principal) next to mTLS: only while a workload migrates.
    inbound_plaintext: bool = False
    transport: Transport = "http"
    authz_timeout_s: float = DEFAULT_AUTHZ_TIMEOUT_S
    allowed_headers: tuple[str, ...] = DEFAULT_ALLOWED_HEADERS
    http: HttpSettings = field(default_factory=lambda: HttpSettings())
    # The pod has IPv6 (decided at start: binding `[::]` fails where it is off): the listeners take it too.
    ipv6: bool = False
    # The ports the workload declares TCP (meshward.io/tcp-ports): only they take tunnelled connections.
    tcp_ports: tuple[int, ...] = ()


# Envoy's admin interface in an injected pod: a Unix socket in the agent's socket directory, created mode 0600
# (Envoy runs as PROXY_UID). Never TCP: on 127.0.0.1 the app could read /certs, /config_dump and /clusters, and
# POST /logging, /drain_listeners or /quitquitquit; the socket directory is mounted by the mesh's containers only.
# Tooling reads it from Envoy's own container (tests/e2e/conftest.py, envoy_admin).
ENVOY_ADMIN_SOCKET = "envoy-admin.sock"
ADMIN_SOCKET_MODE = 0o600
# The pod's inbound and health listeners take connections on every address of the pod (capture sends them there).
ANY_ADDRESS = "0.0.0.0"  # noqa: S104
# ... and, where the pod has IPv6, on every IPv6 address: a second socket (IPV6_V6ONLY, Envoy's default without
# `ipv4_compat`, so it does not collide with the IPv4 one on the same port).
ANY_ADDRESS_6 = "::"
# The outbound listener's addresses: the kernel redirects a connection the pod opens to its family's loopback.
LOOPBACK, LOOPBACK_6 = "127.0.0.1", "::1"


def _addresses(host: str, host6: str, port: int, ipv6: bool, dscp: tuple[int, str] | None = None
               ) -> dict[str, Any]:
    """A listener's `address` on `host`, and where `ipv6`, the `additional_addresses` on `host6`, same port.

    `dscp` (value, why) marks the listener's sockets, with each family's own option.
    """
    out: dict[str, Any] = {"address": Endpoint(host=host, port=port).address()}
    if dscp is not None:
        out["socket_options"] = [_tos(*dscp)]
    if ipv6:
        extra: dict[str, Any] = {"address": Endpoint(host=host6, port=port).address()}
        if dscp is not None:  # an additional address's options replace the listener's
            extra["socket_options"] = {"socket_options": [_tclass(*dscp)]}
        out["additional_addresses"] = [extra]
    return out
# Open downstream connections one pod's Envoy accepts (inbound, outbound and health together).
MAX_DOWNSTREAM_CONNECTIONS = 20_000
# Where captured connections go: the address they were sent to (Envoy's own connections are never captured).
PASSTHROUGH, INBOUND_APP, XDS = "passthrough", "inbound_app", "meshward_sds"
# Tunnelled TCP to the app: its own cluster, so tunnels never use up the HTTP cluster's connection budget, and
# thresholds no lower than the listener's own limit (Envoy's default circuit breaker is 1,024 connections).
INBOUND_TCP_APP = "inbound_tcp_app"


def _original_dst() -> dict[str, Any]:
    """The listener filter that restores the address a connection was sent to before capture redirected it."""
    return {"name": "envoy.filters.listener.original_dst", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}


def _http_inspector(skip_ports: Sequence[int] = ()) -> dict[str, Any]:
    """The HTTP inspector, off for `skip_ports` (declared TCP somewhere: their connections are never sniffed).

    Why off there, not only unused: a client that writes a line and half-closes at once (`printf 'GET k' |
    socat`) was reset while the inspector still waited for more bytes (measured on kind), and a server that speaks
    first would wait out its timeout (SNIFF_TIMEOUT_S) for nothing.
    """
    out: dict[str, Any] = {"name": "envoy.filters.listener.http_inspector", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}}
    ranges = [{"destination_port_range": {"start": p, "end": p + 1}} for p in sorted(set(skip_ports))]
    if len(ranges) == 1:
        out["filter_disabled"] = ranges[0]
    elif ranges:
        out["filter_disabled"] = {"or_match": {"rules": ranges}}
    return out


def _tls_inspector() -> dict[str, Any]:
    return {"name": "envoy.filters.listener.tls_inspector", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}


# Linux's IPPROTO_IP/IP_TOS and IPPROTO_IPV6/IPV6_TCLASS: the socket options that mark a pod Envoy's sockets, one
# per family (an IPv4 socket refuses IPV6_TCLASS; IP_TOS on an IPv6 socket marks IPv4-mapped packets only).
_SOL_IP, _IP_TOS = 0, 1
_SOL_IPV6, _IPV6_TCLASS = 41, 67


def _tos(dscp: int, why: str) -> dict[str, Any]:
    """A socket option setting IP_TOS to `dscp` before bind (marks IPv4 packets)."""
    return {"description": why, "level": _SOL_IP, "name": _IP_TOS, "int_value": dscp << 2, "state": "STATE_PREBIND"}


def _tclass(dscp: int, why: str) -> dict[str, Any]:
    """A socket option setting IPV6_TCLASS to `dscp` before bind (marks IPv6 packets; IPv6 sockets only)."""
    return {"description": why, "level": _SOL_IPV6, "name": _IPV6_TCLASS, "int_value": dscp << 2,
            "state": "STATE_PREBIND"}


def _original_dst_cluster(name: str, ipv6: bool) -> dict[str, Any]:
    """A cluster to the address a captured connection was sent to, its sockets marked as the proxy's.

    The mark (PROXY_DSCP) is how the pod's capture rules track Envoy's connections apart from the app's, which share
    their 4-tuples (domain/capture.py); a socket keeps it after Envoy closes it. Where the pod has IPv6, each family
    gets its own option: Envoy picks the source address of the destination's family (both any-address, port 0, and
    Envoy sets IP_BIND_ADDRESS_NO_PORT, so the kernel still chooses address and port at connect, as without a bind;
    seen with strace) and applies that address's options; without IPv6 no source is bound.
    """
    why = "the proxy's DSCP (meshward capture tracks these connections apart)"
    bind: dict[str, Any] = {"socket_options": [_tos(PROXY_DSCP, why)]}
    if ipv6:
        bind = {"source_address": {"address": ANY_ADDRESS, "port_value": 0}, **bind,
                "extra_source_addresses": [{"address": {"address": ANY_ADDRESS_6, "port_value": 0},
                                            "socket_options": {"socket_options": [_tclass(PROXY_DSCP, why)]}}]}
    return {"name": name, "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "1s",
            "upstream_bind_config": bind}


def _xds_source() -> dict[str, Any]:
    return {"resource_api_version": "V3", "api_config_source": {
        "api_type": "GRPC", "transport_api_version": "V3", "grpc_services": [{"envoy_grpc": {"cluster_name": XDS}}]}}


def _tcp_authz(transport: Transport, timeout_s: float) -> dict[str, Any]:
    """The ext_authz filter of a TCP tunnel: the agent is told it decides a connection (ATTR_L4).

    Over gRPC the marker is a context extension of the route (`_tcp_tunnel_chain`). Envoy wants at least one
    allowed header; the agent reads none of a tunnel's (servers/authz_http.py), and the app gets its bytes only.
    """
    return _ext_authz(transport, timeout_s, ("x-request-id",), ({"key": ATTR_L4, "value": L4_TCP},))


def _tcp_tunnel_chain(port: int, tls: SdsTls, transport: Transport, timeout_s: float) -> dict[str, Any]:
    """The inbound chain of declared TCP port `port`: mTLS (ALPN TCP_ALPN), the tunnel's POST decided as a connection.

    Allowed, the tunnel's bytes go to the app (Envoy's CONNECT termination, with `allow_post`).
    """
    route: dict[str, Any] = {
        "match": {"path": TCP_TUNNEL_PATH, "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]},
        "route": {"cluster": INBOUND_TCP_APP, "timeout": "0s",
                  "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {"allow_post": True}}]}}
    if transport == "grpc":
        route["typed_per_filter_config"] = {_EXT_AUTHZ: {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            "check_settings": {"context_extensions": {ATTR_L4: L4_TCP}}}}
    routes = {"name": f"inbound_tcp|{port}", "virtual_hosts": [{"name": "tunnel", "domains": ["*"], "routes": [
        route, {"match": {"prefix": "/"}, "direct_response": {"status": 404}}]}]}
    # One tunnel per mTLS connection, as honest callers send (tcp_cluster): a peer multiplexing thousands of
    # tunnels on one connection would escape the listener's connection limit. Its request head within 10 s.
    hcm = _hcm(f"inbound_tcp_{port}", routes, [_tcp_authz(transport, timeout_s), _router()],
               codec_type="HTTP2", stream_idle_timeout=_duration(TCP_IDLE_TIMEOUT_S),
               request_headers_timeout=_duration(TUNNEL_HEAD_TIMEOUT_S),
               http2_protocol_options={"max_concurrent_streams": 1},
               common_http_protocol_options={"max_requests_per_connection": 1},
               upgrade_configs=[{"upgrade_type": "CONNECT"}])
    tls_socket = _downstream_tls(tls)
    tls_socket["typed_config"]["common_tls_context"]["alpn_protocols"] = [TCP_ALPN]
    return {"name": f"inbound_tcp|{port}",
            "filter_chain_match": {"destination_port": port, "transport_protocol": "tls",
                                   "application_protocols": [TCP_ALPN]},
            "transport_socket": tls_socket, "filters": [
                {"name": "envoy.filters.network.connection_limit", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit",
                    "stat_prefix": f"inbound_tcp_{port}", "max_connections": TCP_TUNNELS_PER_PORT}},
                {"name": _HCM, "typed_config": hcm}]}


def _refused_tcp_chain() -> dict[str, Any]:
    """ALPN TCP_ALPN to a port the workload does not declare TCP: closed at once, nothing answered (no TLS either)."""
    return {"name": "inbound_tcp_refused",
            "filter_chain_match": {"transport_protocol": "tls", "application_protocols": [TCP_ALPN]},
            "filters": [{"name": "envoy.filters.network.direct_response", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.direct_response.v3.Config"}}]}


def build_pod_bootstrap(p: PodProxy) -> dict[str, Any]:
    """The Envoy bootstrap of an injected pod: inbound (mTLS, ext_authz), health, and outbound from the agent's xDS."""
    hcm = _inbound_hcm(_ext_authz(p.transport, p.authz_timeout_s, p.allowed_headers), INBOUND_APP, p.http)
    sds = SdsTls(Endpoint(unix=f"{p.socket_dir}/sds.sock"))
    chains: list[dict[str, Any]] = [{
        "filter_chain_match": {"transport_protocol": "tls"},
        "transport_socket": _downstream_tls(sds),
        "filters": [{"name": _HCM, "typed_config": hcm}]}]
    chains += [_tcp_tunnel_chain(port, sds, p.transport, p.authz_timeout_s) for port in p.tcp_ports]
    chains.append(_refused_tcp_chain())
    if p.inbound_plaintext:
        chains.append({"filter_chain_match": {"transport_protocol": "raw_buffer"},
                       "filters": [{"name": _HCM, "typed_config": {**hcm, "stat_prefix": "inbound_plaintext"}}]})
    # Kubelet's probe of Envoy: the admin's /ready and nothing else of the admin, over its socket.
    health = _hcm("health", {"name": "health", "virtual_hosts": [{"name": "health", "domains": ["*"], "routes": [
        {"match": {"path": "/healthz/ready"}, "route": {"cluster": "envoy_admin", "prefix_rewrite": "/ready"}},
        {"match": {"prefix": "/"}, "direct_response": {"status": 404}}]}]})
    listeners = [
        {"name": "inbound", **_addresses(ANY_ADDRESS, ANY_ADDRESS_6, INBOUND_PORT, p.ipv6),
         "listener_filters": [_original_dst(), _tls_inspector()], "filter_chains": chains},
        {"name": "health", **_addresses(ANY_ADDRESS, ANY_ADDRESS_6, PROXY_HEALTH_PORT, p.ipv6),
         "filter_chains": [{"filters": [{"name": _HCM, "typed_config": health}]}]},
    ]
    admin = f"{p.socket_dir}/{ENVOY_ADMIN_SOCKET}"
    clusters = [
        _cluster("meshward_authz", Endpoint(unix=f"{p.socket_dir}/authz.sock"), http2=p.transport == "grpc"),
        _cluster(XDS, Endpoint(unix=f"{p.socket_dir}/sds.sock"), http2=True),
        _cluster("envoy_admin", Endpoint(unix=admin), http2=False),
        {**_original_dst_cluster(INBOUND_APP, p.ipv6),
         "typed_extension_protocol_options": _protocol_options(FOLLOW_DOWNSTREAM)},
        _original_dst_cluster(PASSTHROUGH, p.ipv6),
    ]
    if p.tcp_ports:
        clusters.append({**_original_dst_cluster(INBOUND_TCP_APP, p.ipv6), "circuit_breakers": {"thresholds": [
            {"max_connections": MAX_DOWNSTREAM_CONNECTIONS, "max_pending_requests": MAX_DOWNSTREAM_CONNECTIONS,
             "max_requests": MAX_DOWNSTREAM_CONNECTIONS}]}})
    return {
        "node": {"id": p.node, "cluster": p.node},
        "admin": {"address": Endpoint(unix=admin, mode=ADMIN_SOCKET_MODE).address()},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "dynamic_resources": {"lds_config": _xds_source(), "cds_config": _xds_source()},
        # A bound on open downstream connections: a flood exhausts Envoy's limit, not the pod's memory.
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": ("type.googleapis.com/envoy.extensions.resource_monitors."
                                       "downstream_connections.v3.DownstreamConnectionsConfig"),
                             "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS}}]},
    }


@dataclass(frozen=True)
class Destination:
    """A meshed address (a pod IP or a Service's cluster IP): who answers there, and how its ports are reached.

    `plaintext_ports` are left uncaptured at the destination; `tcp_ports` are declared TCP there (every connection
    to them tunnelled over mTLS with TCP_ALPN, never sniffed).
    """

    identities: tuple[str, ...]
    plaintext_ports: tuple[int, ...] = ()
    tcp_ports: tuple[int, ...] = ()


def parse_destinations(doc: Any) -> dict[str, Destination]:
    """The operator's destination map (`{ip: {"identities": [...], "plaintextPorts": [...]}}`), IPv4 and IPv6.

    Each key is taken in its canonical form (`fd00::a`, never `FD00:0::000A`). Raises ValueError naming the entry
    that is malformed.
    """
    if not isinstance(doc, dict):
        raise ValueError(f"destinations must be a mapping, got {type(doc).__name__}")  # noqa: TRY004
    out: dict[str, Destination] = {}
    for ip, entry in doc.items():
        ids = entry.get("identities") if isinstance(entry, dict) else None
        ports = entry.get("plaintextPorts", []) if isinstance(entry, dict) else None
        tcp = entry.get("tcpPorts", []) if isinstance(entry, dict) else None
        address = canonical_address(ip)
        if address is None or not isinstance(ids, list) or \
                not all(isinstance(i, str) and i.startswith("spiffe://") for i in ids) or \
                not all(isinstance(x, list) and all(isinstance(p, int) and 0 < p < 65536 for p in x)
                        for x in (ports, tcp)):
            raise ValueError(f"destinations[{ip!r}]: want an IPv4 or IPv6 address (no zone) -> "
                             "{identities: [spiffe://...], plaintextPorts: [port...], tcpPorts: [port...]}")
        out[address] = Destination(tuple(ids), tuple(ports or ()), tuple(tcp or ()))
    return out


def canonical_address(text: Any) -> str | None:
    """`text` as a canonical IPv4 or IPv6 address; None if it is not one, or has a zone (`fe80::1%eth0`).

    A zone names an interface of the sender's own pod: no other pod's Envoy can match or dial it.
    """
    if not isinstance(text, str) or "%" in text:
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def own_addresses(text: str) -> frozenset[str]:
    """The pod's own addresses, canonical, from `status.podIPs` as the downward API writes it (comma-separated)."""
    return frozenset(a for a in (canonical_address(t.strip()) for t in text.split(",")) if a)


def _identity_matcher(identity: str) -> dict[str, str]:
    """The SAN matcher of one identity of the map: exact, or `.../ns/<ns>/sa/*` for any workload of a namespace."""
    if identity.endswith("/sa/*"):
        return {"prefix": identity[:-1]}
    return {"exact": identity}


def _stat_name(name: str) -> str:
    """A cluster's name for stats: its `/` and `:` (a SPIFFE ID has both) replaced by `_`."""
    return name.replace("/", "_").replace(":", "_")


def _mesh_cluster(name: str, identities: tuple[str, ...], ipv6: bool) -> dict[str, Any]:
    """An outbound cluster: to the original destination, mTLS, the peer's SPIFFE ID one of `identities`."""
    return {**_original_dst_cluster(name, ipv6), "alt_stat_name": _stat_name(name),
            "transport_socket": _upstream_mtls([_identity_matcher(i) for i in identities]),
            "typed_extension_protocol_options": _protocol_options(FOLLOW_DOWNSTREAM)}


def tcp_cluster(name: str, identities: tuple[str, ...], ipv6: bool) -> dict[str, Any]:
    """An outbound TCP cluster: to the original destination, mTLS with ALPN TCP_ALPN pinned like `_mesh_cluster`'s.

    HTTP/2 carries the tunnel (one POST per connection); one stream per mTLS connection, so an app's connection
    never waits behind another's flow control, and each is one connection at the receiving side as Istio has it.
    """
    mtls = _upstream_mtls([_identity_matcher(i) for i in identities])
    mtls["typed_config"]["common_tls_context"]["alpn_protocols"] = [TCP_ALPN]
    return {**_original_dst_cluster(name, ipv6), "alt_stat_name": _stat_name(name),
            "transport_socket": mtls, "typed_extension_protocol_options": _protocol_options(
                {"explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 1}}})}


def tcp_tunnel(cluster: str) -> dict[str, Any]:
    """The network filter carrying a connection to `cluster` as one POST to TCP_TUNNEL_PATH.

    Its authority is the original destination's address, which the receiving agent sees as the host.
    """
    return {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": _stat_name(cluster), "cluster": cluster,
        "idle_timeout": _duration(TCP_IDLE_TIMEOUT_S),
        "tunneling_config": {"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%", "use_post": True,
                             "post_path": TCP_TUNNEL_PATH}}}


def _exchange_filter(destination: str, header: str) -> dict[str, Any]:
    """The outbound ext_authz filter: the agent exchanges the app's context token (in `header`) for `destination`.

    `destination` is the address's identities, comma-separated (SPIFFE IDs hold no comma): the agent derives
    the audience and the claims from them, and Envoy sets it, so an app cannot choose either.
    """
    return _ext_authz_filter((header, "x-request-id"), {"http_service": _http_service(
        DEFAULT_AUTHZ_TIMEOUT_S, [{"key": ATTR_DEST, "value": destination}], [{"exact": WIRE_HEADER}])})


def _mesh_routes(cluster: str, destination: str | None, header: str, http: HttpSettings) -> dict[str, Any]:
    """Everything to `cluster`, through the context exchange when `destination` has one audience.

    Requests carrying `header` go through the exchange; the others, and every request to a group without one
    audience (identities of several namespaces), lose the context headers.
    """
    carriers = list(context_headers(header))
    if destination is None:
        config = _to_cluster(cluster, cluster, cluster, http)
        config["request_headers_to_remove"] = carriers
        return config
    off = {_EXT_AUTHZ: {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                        "disabled": True}}
    to = {"cluster": cluster}
    return {"name": cluster, "virtual_hosts": [{"name": cluster, "domains": ["*"], "routes": [
        *http.routes({"prefix": "/", "headers": [{"name": header, "present_match": True}]}, to),
        *http.routes({"prefix": "/"}, to, typed_per_filter_config=off, request_headers_to_remove=carriers),
    ]}]}


def _prefixes(ips: list[str]) -> list[dict[str, Any]]:
    return [{"address_prefix": ip, "prefix_len": 128 if ":" in ip else 32} for ip in ips]


def _mesh_chain(cluster: str, ips: list[str], port: int | None, destination: str | None, header: str,
                http: HttpSettings) -> dict[str, Any]:
    filters = [_exchange_filter(destination, header), _router()] if destination else None
    hcm = _hcm("outbound", _mesh_routes(cluster, destination, header, http), filters, **http.hcm())
    match: dict[str, Any] = {"prefix_ranges": _prefixes(ips)}
    if port is not None:
        match["destination_port"] = port
    return {"name": f"{cluster}|{port or '*'}", "filter_chain_match": match,
            "filters": [{"name": _HCM, "typed_config": hcm}]}


def _tcp_chain(cluster: str, ips: list[str], port: int) -> dict[str, Any]:
    """Every connection to a declared TCP port of `ips`: tunnelled over mTLS to `cluster`."""
    return {"name": f"{cluster}|{port}", "filter_chain_match": {"prefix_ranges": _prefixes(ips),
                                                               "destination_port": port},
            "filters": [tcp_tunnel(cluster)]}


def _exchange_destination(identities: tuple[str, ...]) -> str | None:
    """What the exchange is told of a destination group (its identities), or None when they have no one audience.

    One workload, several of one namespace (a Service over several ServiceAccounts) or another namespace's
    `.../sa/*`: a context token can be minted for them (docs/context-tokens.md).
    """
    return ",".join(identities) if audience_for(identities) is not None else None


# How long the outbound listener waits for a client's first bytes to tell plaintext HTTP/1 (whose context header
# it removes) from anything else: a client speaks first in HTTP, so this delays only protocols where the server
# speaks first (MySQL, SMTP, SSH) to addresses the mesh does not cover; exclude such ports from capture
# (meshward.io/exclude-outbound-ports) to spare them the wait.
SNIFF_TIMEOUT_S = 1.0


def _plaintext_http(header: str, http: HttpSettings, name: str = "passthrough_http",
                    match: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plaintext HTTP/1 to a non-meshed address (`match`: which): passed on unchanged but for the context headers.

    Never a route timeout (the mesh has no say in how long a call outside it takes); HTTP/1.0 as the workload says.
    Each request is logged to the agent (EGRESS_LOG: its metrics by destination).
    """
    route = {"name": "passthrough_http", "request_headers_to_remove": list(context_headers(header)),
             "virtual_hosts": [{"name": "passthrough_http", "domains": ["*"], "routes": [
                 {"match": {"prefix": "/"}, "route": {"cluster": PASSTHROUGH, "timeout": "0s"}}]}]}
    router = _router()
    router["typed_config"]["suppress_envoy_headers"] = True
    hcm = _hcm("passthrough_http", route, [router], generate_request_id=False,
               server_header_transformation="PASS_THROUGH", access_log=[_egress_log("http")], **http.hcm())
    return {"name": name, "filter_chain_match": {**(match or {}), "application_protocols": ["http/1.0", "http/1.1"]},
            "filters": [{"name": _HCM, "typed_config": hcm}]}


# Connections (and plaintext HTTP requests) leaving the mesh are logged to the agent over gRPC (Envoy's access log
# service, on the agent's xDS socket): its per-destination counters, and the audit line of each refused connection
# (sidecar/engines/egress.py). The log name tells the agent which kind of entry it reads: a refused connection's
# entry names no upstream cluster (none was picked), so refusals have a log of their own.
EGRESS_LOG = "meshward_egress"
EGRESS_REFUSED_LOG = "meshward_egress_refused"
# The cluster of a connection a locked pod may not make: no endpoint, so Envoy closes the app's connection at once
# and nothing leaves the pod (Istio's BlackHoleCluster).
EGRESS_REFUSED = "egress_refused"


def _egress_log(kind: Literal["tcp", "http"], refused: bool = False) -> dict[str, Any]:
    """The access log of a chain leaving the mesh (or refusing to): to the agent's access log service."""
    message = "TcpGrpcAccessLogConfig" if kind == "tcp" else "HttpGrpcAccessLogConfig"
    return {"name": f"envoy.access_loggers.{kind}_grpc", "typed_config": {
        "@type": f"type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.{message}",
        "common_config": {"log_name": EGRESS_REFUSED_LOG if refused else EGRESS_LOG, "transport_api_version": "V3",
                          "grpc_service": {"envoy_grpc": {"cluster_name": XDS}}}}}


def _passthrough_tcp(name: str, cluster: str, match: dict[str, Any] | None = None) -> dict[str, Any]:
    """A chain (or the default one, without `match`) carrying connections out of the mesh to `cluster`, logged."""
    chain: dict[str, Any] = {"name": name, "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": name, "cluster": cluster, "access_log": [_egress_log("tcp", cluster == EGRESS_REFUSED)]}}]}
    if match is not None:
        chain["filter_chain_match"] = match
    return chain


def _allowed_here(egress: Egress, port: int | None, meshed_here: set[str]) -> list[str]:
    """The allowed networks that apply at `port` (None: the port-less chains), but the meshed addresses there."""
    nets = {a.network for a in egress.allow if a.port is None or a.port == port}
    return sorted(n for n in nets if n.split("/")[0] not in meshed_here or n.split("/")[1] not in ("32", "128"))


def _cidrs(networks: list[str]) -> list[dict[str, Any]]:
    return [{"address_prefix": n.split("/")[0], "prefix_len": int(n.split("/")[1])} for n in networks]


def _leaving_chains(egress: Egress, port: int | None, meshed: Mapping[str, Destination], header: str,
                    http: HttpSettings) -> list[dict[str, Any]]:
    """The chains out of the mesh at `port` (None: port-less): open, HTTP anywhere; locked, to the allowed only."""
    match: dict[str, Any] = {} if port is None else {"destination_port": port}
    suffix = "" if port is None else f"|{port}"
    if not egress.locked:
        return [_plaintext_http(header, http, f"passthrough_http{suffix}", match or None)]
    meshed_here = {ip for ip, d in meshed.items() if port is None or port not in d.plaintext_ports}
    allowed = _allowed_here(egress, port, meshed_here)
    if not allowed:
        return []
    match["prefix_ranges"] = _cidrs(allowed)
    return [_plaintext_http(header, http, f"passthrough_http{suffix}", copy.deepcopy(match)),
            _passthrough_tcp(f"passthrough{suffix}", PASSTHROUGH, match)]


def outbound_resources(destinations: Mapping[str, Destination], own_ip: str = "",
                       context_header: str = WIRE_HEADER, http: HttpSettings | None = None, ipv6: bool = False,
                       egress: Egress | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The outbound listener and its clusters (LDS, CDS) for the meshed `destinations` (by IPv4 and IPv6 address).

    A connection to a meshed address goes out over mTLS to one of its identities; any other (non-meshed
    addresses, a meshed address's plaintext ports, this pod's own address) passes through untouched, but for
    the app's `context_header` (and the wire header), which only a meshed address of one audience (one
    workload or one namespace) receives, exchanged. `own_ip`: this pod's addresses, comma-separated (its
    `status.podIPs`). `http`: the workload's stream settings (HttpSettings' defaults if None). `ipv6`: the pod has
    IPv6, so the listener takes the app's connections redirected to `[::1]` too. `egress` locked: of the non-meshed
    addresses only this pod's own, a meshed address's plaintext ports and the allowed networks pass; every other
    connection goes to EGRESS_REFUSED (closed at once, logged).
    """
    http = http or HttpSettings()
    egress = egress or Egress()
    own = own_addresses(own_ip)
    meshed = {ip: d for ip, d in destinations.items() if ip not in own and d.identities}
    groups: dict[tuple[str, ...], list[str]] = {}
    for ip in sorted(meshed):
        groups.setdefault(tuple(sorted(set(meshed[ip].identities))), []).append(ip)
    names = {ids: "outbound|" + ",".join(ids) for ids in groups}
    if egress.locked:  # what a locked pod still reaches outside mTLS: itself, and meshed addresses' plaintext ports
        plain = {Allowed.host(ip, p) for ip, d in meshed.items() for p in d.plaintext_ports}
        mine = {Allowed.host(ip) for ip in own}
        egress = Egress(True, ordered([*egress.allow, *plain, *mine]))
    # Envoy matches the destination port first and never falls back to port-less chains for a port some chain
    # names: so every plaintext, TCP or allowed port gets a copy of the meshed chains, without the addresses that
    # leave it plain or declare it TCP; to those, every connection is tunnelled (TCP_ALPN), whatever its bytes look
    # like (Envoy's HTTP inspector takes a line such as `hello x` for HTTP: measured, such a client was reset).
    ports = sorted({p for d in meshed.values() for p in (*d.plaintext_ports, *d.tcp_ports)}
                   | {a.port for a in egress.allow if a.port is not None})
    chains = [_mesh_chain(names[ids], ips, None, _exchange_destination(ids), context_header, http)
              for ids, ips in groups.items()]
    tunnelled: set[tuple[str, ...]] = set()
    for port in ports:
        for ids, ips in groups.items():
            kept = [ip for ip in ips if port not in meshed[ip].plaintext_ports]
            tcp = [ip for ip in kept if port in meshed[ip].tcp_ports]
            other = [ip for ip in kept if ip not in tcp]
            if tcp:  # every byte to a declared TCP port is TCP (as Istio's declared ports): never sniffed as HTTP
                tunnelled.add(ids)
                chains.append(_tcp_chain(_tcp_name(ids), tcp, port))
            if other:
                chains.append(_mesh_chain(names[ids], other, port, _exchange_destination(ids), context_header, http))
        chains += _leaving_chains(egress, port, meshed, context_header, http)
    chains += _leaving_chains(egress, None, meshed, context_header, http)
    default = _passthrough_tcp("egress_refused", EGRESS_REFUSED) if egress.locked else \
        _passthrough_tcp("passthrough", PASSTHROUGH)
    # Its sockets' DSCP, copied by the kernel into a reset answering them: capture keeps those in the app's
    # conntrack zone (domain/capture.py).
    listener = {"name": "outbound", **_addresses(LOOPBACK, LOOPBACK_6, OUTBOUND_PORT, ipv6, (
                    OUTBOUND_LISTENER_DSCP, "the app's side (meshward capture's conntrack zones)")),
                "listener_filters": [_original_dst(), _http_inspector(sorted({p for d in meshed.values()
                                                                               for p in d.tcp_ports}))],
                "listener_filters_timeout": _duration(SNIFF_TIMEOUT_S), "continue_on_listener_filters_timeout": True,
                "filter_chains": chains, "default_filter_chain": default}
    clusters = [*(_mesh_cluster(names[ids], ids, ipv6) for ids in groups),
                *(tcp_cluster(_tcp_name(ids), ids, ipv6) for ids in groups if ids in tunnelled)]
    if egress.locked:
        clusters.append({"name": EGRESS_REFUSED, "type": "STATIC", "connect_timeout": "1s",
                         "load_assignment": {"cluster_name": EGRESS_REFUSED, "endpoints": []}})
    return [listener], clusters


def _tcp_name(identities: tuple[str, ...]) -> str:
    """The TCP cluster of a destination group."""
    return "outbound_tcp|" + ",".join(identities)


# The typed messages of every extension the builder uses: envoy-data-plane resolves `@type`s only for the
# modules imported (a registry by import). Off the hot path: imported when a bootstrap is checked.
_TYPED_MODULES = (
    "envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3",
    "envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3",
    "envoy_data_plane.envoy.extensions.filters.http.router.v3",
    "envoy_data_plane.envoy.extensions.transport_sockets.tls.v3",
    "envoy_data_plane.envoy.extensions.upstreams.http.v3",
    "envoy_data_plane.envoy.extensions.http.early_header_mutation.header_mutation.v3",
    "envoy_data_plane.envoy.extensions.filters.listener.original_dst.v3",
    "envoy_data_plane.envoy.extensions.filters.listener.tls_inspector.v3",
    "envoy_data_plane.envoy.extensions.filters.listener.http_inspector.v3",
    "envoy_data_plane.envoy.extensions.filters.network.tcp_proxy.v3",
    "envoy_data_plane.envoy.extensions.filters.network.direct_response.v3",
    "envoy_data_plane.envoy.extensions.filters.network.connection_limit.v3",
    "envoy_data_plane.envoy.extensions.access_loggers.grpc.v3",
    "envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3",
)


def check_bootstrap(bootstrap: dict[str, Any]) -> None:
    """Parse a bootstrap into Envoy's typed messages (envoy-data-plane).

    Raises ValueError naming a misspelled, misplaced or mistyped field, before Envoy ever sees it.
    """
    import importlib
    import warnings

    with warnings.catch_warnings():
        # envoy-data-plane's generated models use a decorator form pydantic 2.12 deprecates: theirs to change.
        warnings.simplefilter("ignore", DeprecationWarning)
        for module in _TYPED_MODULES:
            importlib.import_module(module)
        from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

    try:
        Bootstrap().from_dict(bootstrap)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"not a valid Envoy bootstrap: {e}") from e
