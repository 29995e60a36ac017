"""A real identity provider for tests: signing keys, a JWKS served over HTTPS, key rotation, outages."""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.support.pki import TestCA


class SigningKey:
    def __init__(self, alg: str = "RS256", kid: str | None = None) -> None:
        self.alg = alg
        self.kid = kid or uuid.uuid4().hex[:12]
        if alg.startswith(("RS", "PS")):
            self.private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.jwk = json.loads(RSAAlgorithm.to_jwk(self.private.public_key()))
        elif alg == "ES384":
            self.private = ec.generate_private_key(ec.SECP384R1())
            self.jwk = json.loads(ECAlgorithm.to_jwk(self.private.public_key()))
        else:
            self.private = ec.generate_private_key(ec.SECP256R1())
            self.jwk = json.loads(ECAlgorithm.to_jwk(self.private.public_key()))
        self.jwk.update({"kid": self.kid, "use": "sig", "alg": alg})


class IdP:
    """Issues tokens and serves /.well-known/openid-configuration and /jwks.json over HTTPS."""

    def __init__(self, ca: TestCA | None, audience: str = "orders") -> None:
        """Serve over HTTPS with a certificate from `ca`, or plain HTTP on loopback when `ca` is None."""
        self.audience = audience
        certs = ca.issue("idp", dns=("localhost",), ips=("127.0.0.1",)) if ca else None
        self.ca_file = str(certs.ca) if certs else ""
        self.keys: list[SigningKey] = [SigningKey("RS256")]
        self.signer = self.keys[0]
        self.down = False
        self.jwks_requests = 0
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if idp.down:
                    self.send_response(503)
                    self.end_headers()
                    return
                if self.path == "/jwks.json":
                    idp.jwks_requests += 1
                    body = json.dumps({"keys": [k.jwk for k in idp.keys]}).encode()
                elif self.path == "/.well-known/openid-configuration":
                    body = json.dumps({"issuer": idp.issuer, "jwks_uri": f"{idp.issuer}/jwks.json"}).encode()
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if certs is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(certs.cert), str(certs.key))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.issuer = f"{'https' if certs else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/jwks.json"

    def token(self, *, key: SigningKey | None = None, ttl: float = 300, headers: dict[str, Any] | None = None,
              **claims: Any) -> str:
        key = key or self.signer
        now = time.time()
        body: dict[str, Any] = {"iss": self.issuer, "aud": self.audience, "sub": "alice", "iat": int(now),
                                "exp": int(now + ttl), "jti": uuid.uuid4().hex}
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key.private, algorithm=key.alg, headers={"kid": key.kid, **(headers or {})})

    def rotate(self) -> SigningKey:
        """Publish a new key and sign with it; the old key stays published (the usual overlap)."""
        new = SigningKey(self.signer.alg)
        self.keys.append(new)
        self.signer = new
        return new

    def retire(self, key: SigningKey) -> None:
        self.keys = [k for k in self.keys if k.kid != key.kid]
