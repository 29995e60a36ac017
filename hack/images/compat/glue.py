"""Server-sent events and a long poll on port 8082 (python3 stdlib glue: nginx and Apache hold neither by themselves).

GET /sse/<name>?events=N&every=S: a text/event-stream of N events, one every S seconds, then the end of the
response (chunked HTTP/1.1, as SSE servers send it). GET /poll/<name>?wait=S: the answer after S seconds, as a
long poll whose event comes late. Each response writes one JSON line to stdout when it ends: what the server
sent and whether the client was still there.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = 8082
# The most a request may ask for: the tests hold 60 s; a typo must not hold a pod's thread for hours.
MAX_WAIT_S = 600.0


def log(**fields: object) -> None:
    """One JSON line on stdout (the tests read it with kubectl logs)."""
    sys.stdout.write(json.dumps(fields, sort_keys=True) + "\n")
    sys.stdout.flush()


class Glue(BaseHTTPRequestHandler):
    """SSE and long polls."""

    protocol_version = "HTTP/1.1"
    server_version = "compat-glue/1"

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        if url.path.startswith("/sse/"):
            self._sse(url.path, int(query.get("events", "12")), min(float(query.get("every", "5")), MAX_WAIT_S))
        elif url.path.startswith("/poll/"):
            self._poll(url.path, min(float(query.get("wait", "60")), MAX_WAIT_S))
        else:
            body = b"glue: /sse/<name> or /poll/<name>\n"
            self.send_response(404 if url.path != "/ready" else 200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def _sse(self, path: str, events: int, every: float) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        start, sent = time.monotonic(), 0
        try:
            for i in range(events):
                time.sleep(every)
                self._chunk(f"id: {i}\nevent: tick\ndata: tick {i}\n\n".encode())
                sent += 1
            self._chunk(b"")
            complete = True
        except OSError:
            complete = False
            self.close_connection = True
        log(kind="sse", path=path, sent=sent, complete=complete, held_s=round(time.monotonic() - start, 1),
            protocol=self.request_version)

    def _poll(self, path: str, wait: float) -> None:
        start = time.monotonic()
        time.sleep(wait)
        body = json.dumps({"event": "late", "waited_s": wait}).encode() + b"\n"
        try:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            complete = True
        except OSError:
            complete = False
            self.close_connection = True
        log(kind="poll", path=path, complete=complete, held_s=round(time.monotonic() - start, 1),
            protocol=self.request_version)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


class Server(ThreadingHTTPServer):
    """socketserver's listen backlog is 5; threads die with the server."""

    request_queue_size = 128
    daemon_threads = True


if __name__ == "__main__":
    Server(("0.0.0.0", PORT), Glue).serve_forever()  # noqa: S104 - a pod's server
