"""End-user JWT validation: strict parsing, safe defaults, keys only from the configured JWKS.

Why our own validator rather than `jwt.decode`: each safe default in docs/design.md must
hold by construction and be testable on its own, and the hot path must be cheap.
- Parsing is strict (RFC 7515 §3.1 compact form, base64url without padding or
  foreign characters, JSON objects without duplicate members) before anything
  is trusted.
- The algorithm comes from a per-issuer allow-list of asymmetric algorithms and
  must fit the key's type and curve, so `none` and HS*-with-a-public-key
  (CVE-2015-9235 style key confusion) cannot verify.
- Keys come only from the issuer's key set; `jku`, `x5u`, `jwk`, `x5c` headers are
  never read, and a `crit` header is rejected (RFC 7515 §4.1.11: we understand no
  extensions).
- `iss`, `aud` and `exp` are required; `nbf` and `iat` honoured with bounded skew.

Signature checks use `cryptography` directly; JWK parsing uses PyJWT's helpers.
Everything here is pure: the clock is an argument.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from meshward.sidecar.config.schema import Issuer

# The JOSE type of Meshward's own context tokens (domain/context.py): never an end-user token, whatever an issuer's
# tokenTypes say, so a context token captured in the mesh cannot be presented where an IdP token is expected.
CONTEXT_TYP = "meshward-context+jwt"
# The JOSE type of the hop proofs that travel behind a context token (domain/context.py): never an end-user token
# either, nor a context token.
HOP_TYP = "meshward-hop+jwt"
# RSA keys below this size are refused (NIST SP 800-131A: 2048 bits minimum).
MIN_RSA_BITS = 2048
# A `kid` is an opaque lookup key; anything longer is not one.
MAX_KID_LEN = 256
# Tokens without `kid` are tried against at most this many keys (bounded work per request).
MAX_KEYS_WITHOUT_KID = 4

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"256": hashes.SHA256, "384": hashes.SHA384,
                                                  "512": hashes.SHA512}
_EC_CURVES = {"ES256": ("secp256r1", 32), "ES384": ("secp384r1", 48)}
_B64URL = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class JwtError(Exception):
    """The token is not acceptable; `reason` is safe to show the client (no token contents)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownKey(JwtError):
    """The token names a `kid` this issuer's key set does not have (maybe yet)."""

    def __init__(self, issuer: str, kid: str | None) -> None:
        super().__init__("signing key not found")
        self.issuer = issuer
        self.kid = kid


@dataclass(frozen=True, slots=True)
class PublicKey:
    """One verification key from a JWKS."""

    kid: str | None
    kty: str             # RSA, EC, OKP
    curve: str | None    # secp256r1 / secp384r1 / Ed25519 / Ed448
    key: Any             # a cryptography public key object


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """A structurally valid, not yet verified, compact JWS."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token whose signature and claims were checked."""

    issuer: str
    claims: Mapping[str, Any]
    expires_at: float
    subject: str
    # For a user from a context token: the workloads the call passed through, most recent first (RFC 8693 act).
    act: tuple[str, ...] = ()
    # Per-token results derived under one config (identity headers, subject hash); the
    # token cache lives and dies with its config, so this memo never outlives it.
    memo: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def jti(self) -> str | None:
        """The token id, if any."""
        v = self.claims.get("jti")
        return v if isinstance(v, str) else None

    @property
    def sid(self) -> str | None:
        """The session id, if any."""
        v = self.claims.get("sid")
        return v if isinstance(v, str) else None


# ------------------------------------------------------------------------- parsing


def _b64decode(segment: str, what: str) -> bytes:
    raw = segment.encode("ascii", "strict") if segment.isascii() else None
    if raw is None or not raw or not _B64URL.issuperset(raw):
        raise JwtError(f"malformed token: {what} is not base64url")
    if len(raw) % 4 == 1:
        raise JwtError(f"malformed token: {what} has an impossible base64url length")
    try:
        return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except (binascii.Error, ValueError) as e:
        raise JwtError(f"malformed token: {what} is not base64url") from e


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise JwtError("malformed token: duplicate member in JSON")
        out[k] = v
    return out


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8", "strict"), object_pairs_hook=_no_duplicates)
    except JwtError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise JwtError(f"malformed token: {what} is not JSON") from e
    if not isinstance(value, dict):
        raise JwtError(f"malformed token: {what} is not a JSON object")
    return value


def parse(token: str, max_bytes: int) -> ParsedToken:
    """Split and decode a compact JWS strictly; nothing in it is trusted yet."""
    if len(token) > max_bytes:
        raise JwtError("token too large")
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError("malformed token: expected three segments")
    h, p, s = parts
    header = _json_object(_b64decode(h, "header"), "header")
    claims = _json_object(_b64decode(p, "payload"), "payload")
    signature = _b64decode(s, "signature")
    return ParsedToken(header, claims, f"{h}.{p}".encode("ascii"), signature)


# ----------------------------------------------------------------------------- keys


def parse_jwks(document: bytes) -> list[PublicKey]:
    """Return the signature keys of a JWKS document; skip symmetric, encryption and unusable keys."""
    doc = json.loads(document)
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWKS: expected an object with a 'keys' list")  # noqa: TRY004 - a document problem
    out: list[PublicKey] = []
    for jwk in doc["keys"]:
        if not isinstance(jwk, dict):
            continue
        kty, use = jwk.get("kty"), jwk.get("use")
        kid = jwk.get("kid") if isinstance(jwk.get("kid"), str) else None
        if use not in (None, "sig"):
            continue
        try:
            if kty == "RSA":
                rsa_key = RSAAlgorithm.from_jwk(jwk)
                rsa_pub = rsa_key.public_key() if isinstance(rsa_key, rsa.RSAPrivateKey) else rsa_key
                if rsa_pub.key_size >= MIN_RSA_BITS:
                    out.append(PublicKey(kid, "RSA", None, rsa_pub))
            elif kty == "EC":
                ec_key = ECAlgorithm.from_jwk(jwk)
                ec_pub = ec_key.public_key() if isinstance(ec_key, ec.EllipticCurvePrivateKey) else ec_key
                out.append(PublicKey(kid, "EC", ec_pub.curve.name, ec_pub))
            elif kty == "OKP":
                ok_key = OKPAlgorithm.from_jwk(jwk)
                if isinstance(ok_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
                    ok_key = ok_key.public_key()
                curve = "Ed25519" if isinstance(ok_key, ed25519.Ed25519PublicKey) else "Ed448"
                out.append(PublicKey(kid, "OKP", curve, ok_key))
            # "oct" (symmetric) keys are never used: HS* is not an allowed algorithm.
        except Exception:  # noqa: S112 - one bad key must not discard the others
            continue
    return out


def key_fits(alg: str, key: PublicKey) -> bool:
    """Whether `key` may verify `alg` (type and curve must match exactly)."""
    if alg[:2] in ("RS", "PS"):
        return key.kty == "RSA"
    if alg in _EC_CURVES:
        return key.kty == "EC" and key.curve == _EC_CURVES[alg][0]
    if alg == "EdDSA":
        return key.kty == "OKP"
    return False


def verify_signature(alg: str, key: PublicKey, signing_input: bytes, signature: bytes) -> bool:
    """Check one signature; False on any mismatch."""
    try:
        if alg[:2] == "RS":
            key.key.verify(signature, signing_input, padding.PKCS1v15(), _HASHES[alg[2:]]())
        elif alg[:2] == "PS":
            h = _HASHES[alg[2:]]()
            key.key.verify(signature, signing_input,
                           padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size), h)
        elif alg in _EC_CURVES:
            size = _EC_CURVES[alg][1]
            if len(signature) != 2 * size:
                return False
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            key.key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(_HASHES[alg[2:]]()))
        elif alg == "EdDSA":
            key.key.verify(signature, signing_input)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# --------------------------------------------------------------------------- claims


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    v = claims.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise JwtError(f"claim {name} is not a number")
    return float(v)


def check_header(token: ParsedToken, issuer: Issuer) -> str:
    """Validate the JOSE header against the issuer's policy; return the algorithm."""
    h = token.header
    if "crit" in h:
        raise JwtError("unsupported critical header parameter")
    alg = h.get("alg")
    if not isinstance(alg, str) or alg not in issuer.algorithms:
        raise JwtError("signing algorithm not allowed")
    kid = h.get("kid")
    if kid is not None and (not isinstance(kid, str) or not kid or len(kid) > MAX_KID_LEN):
        raise JwtError("malformed key id")
    typ = h.get("typ")
    if isinstance(typ, str) and typ.lower().removeprefix("application/") in (CONTEXT_TYP, HOP_TYP):
        raise JwtError("a Meshward context token or hop proof is not an end-user token")
    if typ is not None and (not isinstance(typ, str) or
                            typ.lower().removeprefix("application/") not in issuer.token_types):
        raise JwtError("token type not accepted (not an access token)")
    return alg


def check_claims(claims: Mapping[str, Any], issuer: Issuer, now: float) -> float:
    """Validate time and audience claims; return `exp`."""
    skew = issuer.clock_skew_s
    exp = _number(claims, "exp")
    if exp is None:
        raise JwtError("token has no expiry")
    if exp <= now - skew:
        raise JwtError("token expired")
    nbf = _number(claims, "nbf")
    if nbf is not None and nbf > now + skew:
        raise JwtError("token not yet valid")
    iat = _number(claims, "iat")
    if iat is not None and iat > now + skew:
        raise JwtError("token issued in the future")
    if exp - (iat if iat is not None else now) > issuer.max_lifetime_s + skew:
        raise JwtError("token lifetime too long")
    aud = claims.get("aud")
    if isinstance(aud, str):
        auds: Sequence[Any] = (aud,)
    elif isinstance(aud, list) and aud:
        auds = aud
    else:
        raise JwtError("token has no audience")
    if not any(isinstance(a, str) and a in issuer.audiences for a in auds):
        raise JwtError("token audience not accepted")
    sub = claims.get("sub")
    if sub is not None and not isinstance(sub, str):
        raise JwtError("claim sub is not a string")
    return exp


def _checked(token: ParsedToken, issuers: Mapping[str, Issuer], now: float) -> tuple[str, str, float]:
    """Issuer, header and claims checks: (iss, alg, exp) of an acceptable-but-for-its-signature token."""
    iss = token.claims.get("iss")
    if not isinstance(iss, str) or iss not in issuers:
        raise JwtError("token issuer not trusted")
    issuer = issuers[iss]
    alg = check_header(token, issuer)
    return iss, alg, check_claims(token.claims, issuer, now)


def _verified(token: ParsedToken, iss: str, exp: float) -> VerifiedToken:
    sub = token.claims.get("sub")
    return VerifiedToken(issuer=iss, claims=token.claims, expires_at=exp, subject=sub if isinstance(sub, str) else "")


def verify_unsigned(token: ParsedToken, issuers: Mapping[str, Issuer], keys_of: Any, now: float) -> VerifiedToken:
    """Every check of `verify` but the signature (for `meshward explain` only, never a real request).

    Explain answers "what if this token were genuine", through the same identity phase as the agent.
    """
    iss, _, exp = _checked(token, issuers, now)
    return _verified(token, iss, exp)


def verify(token: ParsedToken, issuers: Mapping[str, Issuer], keys_of: Any, now: float) -> VerifiedToken:
    """Verify a parsed token: issuer, header, claims, then the signature with the issuer's keys.

    `keys_of(issuer, kid)` returns the issuer's candidate keys (all keys when kid is None)
    or None when the kid is unknown.
    """
    iss, alg, exp = _checked(token, issuers, now)
    kid = token.header.get("kid")
    candidates = keys_of(iss, kid)
    if candidates is None:
        raise UnknownKey(iss, kid if isinstance(kid, str) else None)
    fitting = [k for k in candidates if key_fits(alg, k)][:MAX_KEYS_WITHOUT_KID if kid is None else None]
    if not fitting:
        raise JwtError("no key of the issuer fits the signing algorithm")
    if not any(verify_signature(alg, k, token.signing_input, token.signature) for k in fitting):
        raise JwtError("invalid signature")
    return _verified(token, iss, exp)
