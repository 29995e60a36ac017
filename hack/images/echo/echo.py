"""A tiny HTTP echo app for Meshward's tests on real pods (stdlib only).

GET/POST anything: 200 with a JSON body naming this pod and echoing the request (method, path,
headers), so a test sees exactly what reached the app. `/call?url=URL` calls URL, forwarding the
headers an app is expected to forward (trace and Meshward context headers) as a meshed app calling
onward would (`&context=0`: all but the context header), and answers with that call's status and
body (502 if it could not connect), so a chain of calls reports its last hop. `/status/<code>` answers with that code.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Headers an app forwards on its onward calls, as it forwards trace context.
FORWARDED = ("traceparent", "tracestate", "x-request-id", "x-meshward-context")


class Echo(BaseHTTPRequestHandler):
    """Echo the request, or call onward."""

    server_version = "meshward-echo/1"

    def _send(self, code: int, doc: object) -> None:
        self._raw(code, json.dumps(doc, sort_keys=True).encode())

    def _raw(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length).decode(errors="replace") if length else ""
        if url.path == "/call":
            query = urllib.parse.parse_qs(url.query)
            target = query.get("url", [""])[0]
            forwarded = FORWARDED if query.get("context", ["1"])[0] != "0" else FORWARDED[:-1]
            headers = {h: v for h in forwarded if (v := self.headers.get(h))}
            request = urllib.request.Request(target, headers=headers)  # noqa: S310 - a test app
            try:
                with urllib.request.urlopen(request, timeout=10) as r:  # noqa: S310
                    self._raw(r.status, r.read())
            except urllib.error.HTTPError as e:
                self._raw(e.code, e.read())
            except OSError as e:
                self._send(502, {"error": str(e)})
            return
        code = 200
        if url.path.startswith("/status/") and url.path[8:].isdigit():
            code = int(url.path[8:])
        self._send(code, {"pod": socket.gethostname(), "method": self.command, "path": self.path,
                          "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})

    do_GET = do_POST = do_PUT = do_DELETE = _handle

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


class Server(ThreadingHTTPServer):
    """socketserver's listen backlog is 5: a chain of apps under load overflows it and connections get reset."""

    request_queue_size = 128


class DualStackServer(Server):
    """Listens on `::` for IPv6 and IPv4 alike, as many apps do."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main() -> None:
    """Serve on $PORT (default 8080) until killed: IPv4 only, or both families with HOST=::."""
    port = int(os.environ.get("PORT", "8080"))
    if os.environ.get("HOST") == "::":
        DualStackServer(("::", port), Echo).serve_forever()
    Server(("", port), Echo).serve_forever()


if __name__ == "__main__":
    main()
