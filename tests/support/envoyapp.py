"""An app that is Envoy answering every request itself, for pods: a C++ server that never bounds a benchmark,
speaks HTTP/1.1 and HTTP/2 (cleartext, as an app behind its sidecar does) and says which one reached it."""

from __future__ import annotations

import json
from typing import Any

# The response header naming the protocol the request reached the app with (`HTTP/1.1`, `HTTP/2`).
PROTOCOL_HEADER = "x-app-protocol"


def bootstrap(port: int = 8080) -> dict[str, Any]:
    """Envoy's bootstrap: one listener on `port`, 200 `ok` to everything, the request's protocol in a header."""
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
           "stat_prefix": "app",
           "route_config": {"virtual_hosts": [{"name": "app", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
                "response_headers_to_add": [{"header": {"key": PROTOCOL_HEADER, "value": "%PROTOCOL%"}}]}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return {"static_resources": {"listeners": [{
        "name": "app", "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}]}]}}


def manifests(ns: str, name: str, image: str, labels: dict[str, str], service_account: str) -> list[dict[str, Any]]:
    """A ConfigMap with the bootstrap, a Deployment running it from `image` (which has Envoy), and a Service."""
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-envoy", "namespace": ns},
         "data": {"envoy.json": json.dumps(bootstrap())}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
         "spec": {"selector": {"matchLabels": {"app": name}}, "template": {
             "metadata": {"labels": {"app": name, **labels}},
             "spec": {"serviceAccountName": service_account,
                      "volumes": [{"name": "cfg", "configMap": {"name": f"{name}-envoy"}}],
                      "containers": [{"name": "app", "image": image, "imagePullPolicy": "Never",
                                      "command": ["envoy", "-c", "/cfg/envoy.json", "--concurrency", "1",
                                                  "--log-level", "error", "--disable-hot-restart"],
                                      "ports": [{"containerPort": 8080}],
                                      "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}]}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
         "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}},
    ]
