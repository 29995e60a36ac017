"""Context tokens: the end user, minimized and re-signed for exactly one next workload.

Why our own format and checks (docs/context-tokens.md has the threat model): a context
token must be useless anywhere but the one connection it was minted for, and no
shared signing key may exist in the mesh. So:
- it is signed with the minting workload's own key, the one behind its mTLS
  certificate, and that certificate (with any intermediates) travels in `x5c`; the
  receiver trusts it only if it chains to the mesh trust bundle, and only for the
  SPIFFE ID in its URI SAN;
- `iss` is the minter's SPIFFE ID and must equal the mTLS peer of the connection it
  arrives on (a token captured anywhere cannot be replayed from another workload);
- `aud` is exactly one SPIFFE ID, the receiver's own, or, when the minter knows no single
  receiver (another namespace, whose ServiceAccounts it must not learn; a Service of several
  ServiceAccounts), its namespace's `spiffe://<td>/ns/<ns>/sa/*` (`audience_for`): then any
  workload of that namespace accepts it, still only straight from the minter;
- `typ` is fixed and the algorithm is ES256 only (workload keys are P-256): an
  end-user token cannot pass for a context token, nor the reverse (end-user
  validation never reads `x5c` and rejects this `typ`), and no `alg` can be swapped;
- it lives at most MAX_TTL_S and carries only the claims the receiver's policies
  reference, plus `sub`, the end user's issuer (`user_iss`), an RFC 8693 `act` chain
  of the workloads the call passed through and `jti` = the minting decision's id;
- every `act` entry is proven, not asserted: behind the token, separated by `~` (as
  SD-JWT carries its disclosures), travel the hop proofs of the path, one per entry,
  each a small JWS signed by that workload's own key ("I passed this user to that
  workload"), linked by SHA-256 digests from the token down to the first hop. A proof
  carries no end-user claims, so minimization holds for every later hop; docs/context-
  tokens.md says why this design and not another.

Everything here is pure: keys, roots and the clock are arguments.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from meshward.sidecar.domain.jwt import CONTEXT_TYP, HOP_TYP, JwtError, ParsedToken, parse

# The header a context token travels in between two Envoys (an app reads and forwards spec.context.header,
# by default the same name). Under Meshward's own prefix, yet let through inbound: it is verified, never trusted.
WIRE_HEADER = "x-meshward-context"
# Workload keys are ECDSA P-256 (domain/certificate.py): one algorithm, so none can be substituted.
CONTEXT_ALG = "ES256"
# The claim carrying the end user's issuer (`iss` is the minting workload).
USER_ISS = "user_iss"
# The claim linking a token (or a hop proof) to the hop proof right behind it: SHA-256 of that proof, base64url.
PROOF_DIGEST = "prf"
# Claims Meshward sets itself: never copied from the end-user token (operator/api/schema.py lists the same).
RESERVED = frozenset({"iss", "aud", "exp", "nbf", "iat", "jti", "act", USER_ISS, PROOF_DIGEST})
# Between a context token and its hop proofs, and between proofs: not in the base64url alphabet nor a JWS
# separator, and SD-JWT's choice for its disclosures (RFC 9901).
PROOF_SEPARATOR = "~"
# The bound and the CRD's maximum for spec.context.ttl.
MAX_TTL_S = 60.0
# Clocks of two pods on one cluster agree within seconds; more would stretch a token's life.
CLOCK_SKEW_S = 5.0
# A mesh chain is a leaf and at most a few intermediates; more is not ours.
MAX_X5C = 4
# The last path segment of a namespace audience: "any ServiceAccount of that namespace", as the destination map
# names another namespace's workloads (operator/domain/destinations.py). Never a ServiceAccount name (RFC 1123
# subdomains have no `*`), so a namespace audience is never a workload's own SPIFFE ID.
ANY_SERVICE_ACCOUNT = "*"
# The longest call path a user travels with context, in workloads: each one adds a hop proof (~1.4 KB, measured
# in docs/performance.md) to the header every later hop and app receives, and a signature check to every later
# hop's first sight of it. Eight keeps the header under ~13 KB (Envoy's limit for all request headers: 60 KiB)
# and bounds a forged token's work to nine signature checks; real call paths in one namespace are a few hops.
# Not configurable: it is what every receiver accepts, so no one policy may widen it.
MAX_ACT_DEPTH = 8
# Context tokens are small (a certificate and a few claims): bound the work a forged one can cause.
MAX_CONTEXT_BYTES = 8 * 1024
# A hop proof is a certificate and eight short claims (~1.4 KB); twice the mesh's largest x5c leaves room.
MAX_PROOF_BYTES = 4 * 1024


class ContextError(JwtError):
    """A context token is not acceptable; `reason` names the check (no token contents)."""


@dataclass(frozen=True, slots=True)
class ContextToken:
    """A verified context token."""

    minter: str                 # iss: the SPIFFE ID that signed it
    audience: str               # aud: the workload it is for, or that workload's namespace (`.../sa/*`)
    user_issuer: str
    subject: str
    claims: Mapping[str, Any]   # the end-user claims it carries (sub included), none of RESERVED
    act: tuple[str, ...]        # the workloads the call passed through, most recent first, each one proven
    jti: str
    issued_at: float
    expires_at: float
    # The hop proofs that prove `act`, one per entry in the same order, as they arrived (a token minted from this
    # one carries them on).
    proofs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MintingKey:
    """A workload's identity as a signer: its SPIFFE ID, private key, and chain in `x5c` form."""

    spiffe_id: str
    key: ec.EllipticCurvePrivateKey
    x5c: tuple[str, ...]
    # The certificate's NotAfter: no token outlives the certificate that vouches for it.
    not_after: float = float("inf")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def context_headers(app_header: str) -> tuple[str, ...]:
    """The headers a context token travels in: the app's (spec.context.header) and the wire header."""
    return tuple(dict.fromkeys((app_header, WIRE_HEADER)))


def act_claim(chain: Sequence[str]) -> dict[str, Any] | None:
    """RFC 8693 §4.1 `act` for a chain of workloads, most recent first (the current actor outermost)."""
    out: dict[str, Any] | None = None
    for actor in reversed(chain):
        out = {"sub": actor, **({"act": out} if out else {})}
    return out


def act_chain(claim: Any) -> tuple[str, ...]:
    """The chain an `act` claim names, most recent first; raise ContextError if it is malformed."""
    out: list[str] = []
    while claim is not None:
        if not isinstance(claim, dict) or not isinstance(claim.get("sub"), str) or set(claim) - {"sub", "act"}:
            raise ContextError("context token: malformed act claim")
        out.append(claim["sub"])
        if len(out) > MAX_ACT_DEPTH:
            raise ContextError("context token: act chain too long")
        claim = claim.get("act")
    return tuple(out)


def namespace_audience(spiffe_id: str) -> str | None:
    """`spiffe://<td>/ns/<ns>/sa/*` for a workload's `spiffe://<td>/ns/<ns>/sa/<sa>` (or its namespace's); else None."""
    if not spiffe_id.startswith("spiffe://"):
        return None
    parts = spiffe_id[len("spiffe://"):].split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not all(parts):
        return None
    return f"spiffe://{parts[0]}/ns/{parts[2]}/sa/{ANY_SERVICE_ACCOUNT}"


def audience_for(identities: Sequence[str]) -> str | None:
    """The one audience a token for a destination of these identities takes, or None when there is none.

    One exact SPIFFE ID: itself. Several, or another namespace's `.../sa/*`, all of one namespace: that
    namespace's audience. Identities of several namespaces (which one address never has: a Service selects
    pods of its own namespace) or not of the `ns/<ns>/sa/<sa>` form: None (no user crosses).
    """
    if len(identities) == 1 and not identities[0].endswith(f"/sa/{ANY_SERVICE_ACCOUNT}"):
        return identities[0]
    audiences = {namespace_audience(i) for i in identities}
    if len(audiences) != 1:
        return None
    return audiences.pop()


def minimized(user_claims: Mapping[str, Any], wanted: Iterable[str]) -> dict[str, Any]:
    """The claims of `user_claims` named in `wanted` (and `sub`), never a reserved one."""
    keep = {"sub", *wanted} - RESERVED
    return {k: v for k, v in user_claims.items() if k in keep}


def proof_digest(proof: str) -> str:
    """SHA-256 of a hop proof as it travels (its compact form), base64url: what the token before it signs."""
    return _b64url(hashlib.sha256(proof.encode("ascii")).digest())


def _sign(key: MintingKey, typ: str, payload: Mapping[str, Any]) -> str:
    header = {"alg": CONTEXT_ALG, "typ": typ, "x5c": list(key.x5c)}
    signing_input = f"{_b64url(_json(header))}.{_b64url(_json(payload))}"
    r, s = decode_dss_signature(key.key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def mint(key: MintingKey, audience: str, user_issuer: str, claims: Mapping[str, Any], act: Sequence[str],
         jti: str, now: float, ttl_s: float, not_after: float | None = None,
         proofs: Sequence[str] = ()) -> tuple[str, float]:
    """Sign a context token for `audience`; return it, followed by its hop proofs, and its expiry.

    `claims` must already be minimized; its `sub` is the end user. The token expires after `ttl_s`
    (at most MAX_TTL_S) or at `not_after` (the token it was exchanged from), whichever is first.
    `proofs` are the hop proofs of the token it is minted from, one per workload of `act` but the first
    when that one is this workload (an exchange: this workload passes the user on, and proves it with a
    hop proof of its own for `audience`), else one per workload of `act` (the app's token: the chain as
    received). Raises ContextError when the chain would exceed MAX_ACT_DEPTH.
    """
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"context ttl must be within (0, {MAX_TTL_S:.0f}] seconds, got {ttl_s}")
    acting = len(act) == len(proofs) + 1 and act[0] == key.spiffe_id
    if not acting and len(act) != len(proofs):
        raise ValueError(f"act names {len(act)} workloads but {len(proofs)} hop proofs are given: an exchange "
                         "names this workload first and passes the proofs it received, an app's token passes both")
    if len(act) > MAX_ACT_DEPTH:
        raise ContextError(f"context token: the call path is longer than {MAX_ACT_DEPTH} workloads, the most a "
                           "context token carries")
    exp = int(min(now + ttl_s, key.not_after, not_after if not_after is not None else float("inf")))
    common = {"aud": audience, "iss": key.spiffe_id, "user_iss": user_issuer, "jti": jti, "iat": int(now), "exp": exp}
    if acting:
        proof = dict(common, sub=claims.get("sub"))
        if proofs:
            proof[PROOF_DIGEST] = proof_digest(proofs[0])
        proofs = (_sign(key, HOP_TYP, proof), *proofs)
    payload: dict[str, Any] = {k: v for k, v in claims.items() if k not in RESERVED}
    payload.update(common)
    chain = act_claim(act)
    if chain is not None:
        payload["act"] = chain
        payload[PROOF_DIGEST] = proof_digest(proofs[0])
    return PROOF_SEPARATOR.join((_sign(key, CONTEXT_TYP, payload), *proofs)), float(exp)


def _certificates(x5c: Any) -> list[x509.Certificate]:
    if not isinstance(x5c, list) or not 0 < len(x5c) <= MAX_X5C or not all(isinstance(c, str) for c in x5c):
        raise ContextError("context token: x5c must list the minting workload's certificate chain")
    out = []
    for c in x5c:
        try:
            out.append(x509.load_der_x509_certificate(base64.b64decode(c, validate=True)))
        except (ValueError, binascii.Error) as e:
            raise ContextError("context token: x5c holds a malformed certificate") from e
    return out


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _current(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def chain_leaf(x5c: Any, roots: Sequence[x509.Certificate], now: float) -> x509.Certificate:
    """The leaf of `x5c` once it chains, through x5c's CA certificates, to one of `roots` at time `now`."""
    certs = _certificates(x5c)
    at = dt.datetime.fromtimestamp(now, dt.UTC)
    leaf, intermediates = certs[0], [c for c in certs[1:] if _is_ca(c)]
    if _is_ca(leaf) or not _current(leaf, at):
        raise ContextError("context token: the minting certificate is not a current workload certificate")
    cert = leaf
    for _ in range(MAX_X5C + 1):
        for root in roots:
            if root.subject == cert.issuer and _directly_issued(cert, root):
                return leaf
        parent = next((i for i in intermediates if i.subject == cert.issuer and _current(i, at)
                       and _directly_issued(cert, i)), None)
        if parent is None:
            break
        cert = parent
    raise ContextError("context token: the minting certificate does not chain to the mesh trust bundle")


def _directly_issued(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return _is_ca(issuer)


def _spiffe_of(leaf: x509.Certificate) -> str:
    try:
        uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        raise ContextError("context token: the minting certificate names no single SPIFFE ID")
    return str(uris[0])


def _signature_ok(leaf: x509.Certificate, token: ParsedToken) -> bool:
    key = leaf.public_key()
    sig = token.signature
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1" or len(sig) != 64:
        return False
    try:
        key.verify(encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")),
                   token.signing_input, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _number(claims: Mapping[str, Any], name: str) -> float:
    v = claims.get(name)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ContextError(f"context token: claim {name} is missing or not a number")
    return float(v)


def accepted_audience(aud: Any, audience: str, namespace_ok: bool) -> bool:
    """Whether `aud` names this workload (`audience`), or, when `namespace_ok`, this workload's namespace."""
    return isinstance(aud, str) and (aud == audience or (namespace_ok and aud == namespace_audience(audience)))


def check_binding(minter: Any, aud: Any, peer: str | None, audience: str, namespace_ok: bool = False) -> None:
    """The token is from the peer of this connection (its minter) and for this workload; else ContextError.

    With `namespace_ok`, a token for this workload's namespace (`.../ns/<ns>/sa/*`) is for this workload too.
    """
    if not isinstance(minter, str) or not peer or minter != peer:
        raise ContextError("context token: not minted by the peer of this connection")
    if not accepted_audience(aud, audience, namespace_ok):
        raise ContextError("context token: audience is not this workload" + (" nor its namespace"
                                                                               if namespace_ok else ""))


def check_unexpired(exp: float, now: float) -> None:
    """The token has not expired (within CLOCK_SKEW_S); else ContextError."""
    if exp <= now - CLOCK_SKEW_S:
        raise ContextError("context token: expired")


def check_bound(token: ParsedToken, peer: str | None, audience: str, now: float, namespace_ok: bool = False
                ) -> dict[str, Any]:
    """The header, binding and time checks that need no cryptography; return the claims."""
    h, c = token.header, token.claims
    if h.get("typ") != CONTEXT_TYP:
        raise ContextError("context token: wrong token type")
    if h.get("alg") != CONTEXT_ALG:
        raise ContextError("context token: signing algorithm not allowed")
    if "crit" in h:
        raise ContextError("context token: unsupported critical header parameter")
    check_binding(c.get("iss"), c.get("aud"), peer, audience, namespace_ok)
    exp, iat = _number(c, "exp"), _number(c, "iat")
    check_unexpired(exp, now)
    if iat > now + CLOCK_SKEW_S:
        raise ContextError("context token: issued in the future")
    if exp - iat > MAX_TTL_S:
        raise ContextError("context token: lifetime too long")
    for name in ("sub", USER_ISS, "jti"):
        if not isinstance(c.get(name), str) or not c[name]:
            raise ContextError(f"context token: claim {name} is missing")
    return c


# How a verifier finds the minting certificate: `chain_leaf`, or a cache in front of it (engines/context.py).
LeafOf = Callable[[Any, Sequence[x509.Certificate], float], x509.Certificate]


def _parsed(raw: str, max_bytes: int) -> ParsedToken:
    try:
        return parse(raw, max_bytes)
    except ContextError:
        raise
    except JwtError as e:
        raise ContextError(f"context token: {e.reason}") from e


def _signed_by_iss(token: ParsedToken, iss: Any, roots: Sequence[x509.Certificate], now: float,
                   leaf_of: LeafOf, proof: bool) -> x509.Certificate:
    """The certificate in `x5c`, once it chains to `roots`, names `iss` and verifies the signature."""
    leaf = leaf_of(token.header.get("x5c"), roots, now)
    if _spiffe_of(leaf) != iss:
        raise ContextError("context token: a hop proof signed by a certificate of another workload" if proof else
                           "context token: signed by a certificate of another workload")
    if not _signature_ok(leaf, token):
        raise ContextError("context token: invalid signature on a hop proof" if proof else
                           "context token: invalid signature")
    return leaf


def verify_proof(raw: str, roots: Sequence[x509.Certificate], now: float, leaf_of: LeafOf = chain_leaf
                 ) -> tuple[dict[str, Any], x509.Certificate]:
    """A hop proof's claims and its signing certificate, once its form, certificate and signature check out.

    What it must say (which workload, for whom, when) depends on where it stands in a chain: `check_path`.
    """
    token = _parsed(raw, MAX_PROOF_BYTES)
    h, c = token.header, token.claims
    if h.get("typ") != HOP_TYP:
        raise ContextError("context token: a hop proof has the wrong token type")
    if h.get("alg") != CONTEXT_ALG:
        raise ContextError("context token: signing algorithm not allowed on a hop proof")
    if "crit" in h:
        raise ContextError("context token: unsupported critical header parameter on a hop proof")
    for name in ("iss", "aud", "sub", USER_ISS, "jti"):
        if not isinstance(c.get(name), str) or not c[name]:
            raise ContextError(f"context token: hop proof claim {name} is missing")
    for name in ("iat", "exp"):
        _number(c, name)
    if PROOF_DIGEST in c and not isinstance(c[PROOF_DIGEST], str):
        raise ContextError(f"context token: hop proof claim {PROOF_DIGEST} is not a string")
    return c, _signed_by_iss(token, c["iss"], roots, now, leaf_of, True)


# How a verifier checks a hop proof given its digest: `verify_proof`, or a cache in front of it (engines/context.py).
ProofOf = Callable[[str, str, Sequence[x509.Certificate], float], Mapping[str, Any]]


def _verify_proof(raw: str, digest: str, roots: Sequence[x509.Certificate], now: float) -> Mapping[str, Any]:
    return verify_proof(raw, roots, now)[0]


def check_path(claims: Mapping[str, Any], act: Sequence[str], proofs: Sequence[str],
               roots: Sequence[x509.Certificate], now: float, proof_of: ProofOf = _verify_proof) -> None:
    """Every workload of `act` is proven by its hop proof in `proofs`, linked down from the token; else ContextError.

    Proof i was signed by act[i], for the workload after it (the token's audience for the first), or for that
    workload's namespace when act[i] knew no single receiver (docs/context-tokens.md), for the
    token's user, and the token (for the first) or proof i-1 signs its digest. Lifetimes nest: a proof expires
    no sooner and was issued no later (within CLOCK_SKEW_S) than what was minted from it, so a proof is good
    only while the chain it was minted for is.
    """
    if len(proofs) != len(act):
        raise ContextError(f"context token: act names {len(act)} workloads but {len(proofs)} hop proofs came "
                           "with it (an act entry without a proof is an assertion, not a path)")
    newer: Mapping[str, Any] = claims
    receiver = str(claims.get("aud"))  # a string: check_bound accepted it
    for actor, proof in zip(act, proofs, strict=True):
        digest = proof_digest(proof)
        if newer.get(PROOF_DIGEST) != digest:
            raise ContextError("context token: a hop proof is not the one the token before it signed (spliced in "
                               "from another chain)")
        p = proof_of(proof, digest, roots, now)
        if p["iss"] != actor:
            raise ContextError("context token: an act entry is not proven by a hop proof of that workload")
        # A proof may name its receiver's namespace: its signer minted for "a workload of that namespace".
        if not accepted_audience(p["aud"], receiver, True):
            raise ContextError("context token: a hop proof was minted for another workload than the next one")
        if p["sub"] != claims.get("sub") or p[USER_ISS] != claims.get(USER_ISS):
            raise ContextError("context token: a hop proof names another user")
        exp, iat = _number(p, "exp"), _number(p, "iat")
        if exp < _number(newer, "exp") or iat > _number(newer, "iat") + CLOCK_SKEW_S:
            raise ContextError("context token: a hop proof's lifetime does not cover the token minted from it")
        if exp - iat > MAX_TTL_S:
            raise ContextError("context token: a hop proof's lifetime is too long")
        newer, receiver = p, actor
    if PROOF_DIGEST in newer:
        raise ContextError("context token: a digest names a hop proof that did not come with it")


def verify_context(raw: str, peer: str | None, audience: str, roots: Sequence[x509.Certificate],
                   now: float, leaf_of: LeafOf = chain_leaf, proof_of: ProofOf = _verify_proof,
                   namespace_ok: bool = False) -> ContextToken:
    """Verify a context token and its hop proofs arriving from `peer` for `audience`; raise ContextError if not.

    With `namespace_ok` (inbound, from another workload), a token for `audience`'s namespace is accepted too
    (`ContextToken.audience` then names the namespace); an app's own token must name its workload exactly.

    Order: the number of hop proofs, strict parsing, then the checks that cost nothing (type, algorithm, binding
    to the peer, audience, times), then the certificate chain to `roots` (`leaf_of`), the SAN, the signature,
    and last the hop proofs (`check_path`, each through `proof_of`).
    """
    token_raw, *proofs = raw.split(PROOF_SEPARATOR)
    if len(proofs) > MAX_ACT_DEPTH:
        raise ContextError(f"context token: more than {MAX_ACT_DEPTH} hop proofs")
    token = _parsed(token_raw, MAX_CONTEXT_BYTES)
    c = check_bound(token, peer, audience, now, namespace_ok)
    _signed_by_iss(token, c["iss"], roots, now, leaf_of, False)
    act = act_chain(c.get("act"))
    if act and act[0] != c["iss"] and c["iss"] != c["aud"]:
        # Every exchange names its minter first; only an app's own token (iss = aud) carries the chain as received.
        # So a proof for a namespace is never presented as the minter's own passing of the user.
        raise ContextError("context token: act does not name its minter first")
    check_path(c, act, proofs, roots, now, proof_of)
    user = {k: v for k, v in c.items() if k not in RESERVED}
    return ContextToken(minter=c["iss"], audience=c["aud"], user_issuer=c[USER_ISS], subject=c["sub"], claims=user,
                        act=act, jti=c["jti"], issued_at=_number(c, "iat"), expires_at=_number(c, "exp"),
                        proofs=tuple(proofs))


def x5c_of(chain_pem: bytes) -> tuple[str, ...]:
    """A PEM chain (leaf first) as `x5c` values (standard base64 DER, RFC 7515 §4.1.6)."""
    return tuple(base64.b64encode(c.public_bytes(Encoding.DER)).decode("ascii")
                 for c in x509.load_pem_x509_certificates(chain_pem))


def roots_of(bundle_pem: bytes) -> tuple[x509.Certificate, ...]:
    """The certificates of a trust bundle (old and new roots during a CA rotation)."""
    return tuple(x509.load_pem_x509_certificates(bundle_pem)) if bundle_pem.strip() else ()
