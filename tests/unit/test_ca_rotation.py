"""The CA rotation state machine: trust first, sign later, forget last — never a leaf its peers cannot verify."""

from __future__ import annotations

import datetime as dt
import itertools

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from meshward.operator.domain.ca import generate_root, issue_leaf, random_serial
from meshward.operator.domain.rotation import AUTO_ROTATE_BEFORE, CaState, advance
from tests.support.pki import spiffe_csr

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
LEAF = dt.timedelta(hours=1)
ME = "spiffe://cluster.local/ns/shop/sa/orders"


def new_root() -> object:
    return generate_root("cluster.local", T0)


def run(state: CaState, at: dt.datetime, requested: bool = False) -> CaState:
    step = advance(state, at, requested=requested, leaf_lifetime=LEAF,
                   new_root=lambda: generate_root("cluster.local", at))
    return step.state if step else state


def verifies(leaf: x509.Certificate, bundle: list[x509.Certificate]) -> bool:
    for root in bundle:
        try:
            leaf.verify_directly_issued_by(root)
        except (ValueError, InvalidSignature):
            continue
        return True
    return False


def test_a_requested_rotation_walks_staged_retiring_steady() -> None:
    s0 = CaState(generate_root("cluster.local", T0))
    staged = run(s0, T0, requested=True)
    assert staged.phase == "staged"
    assert staged.active == s0.active  # the old key still signs
    assert [c.serial_number for c in staged.bundle()] == [staged.next.cert.serial_number,  # type: ignore[union-attr]
                                                           s0.active.cert.serial_number]
    assert run(staged, T0 + LEAF - dt.timedelta(seconds=1)) == staged  # not before every leaf has the bundle
    retiring = run(staged, T0 + LEAF)
    assert retiring.phase == "retiring"
    assert retiring.active == staged.next
    assert retiring.previous == s0.active.cert
    assert run(retiring, T0 + 2 * LEAF - dt.timedelta(seconds=1)) == retiring
    steady = run(retiring, T0 + 2 * LEAF)
    assert steady.phase == "steady"
    assert steady.bundle() == [retiring.active.cert]


def test_no_leaf_ever_meets_a_peer_whose_bundle_lacks_its_root() -> None:
    """Every leaf issued at any minute of a rotation verifies against every bundle a peer may hold during its life.

    A peer holds the bundle it got with its own last certificate, which is at most one leaf lifetime old.
    """
    serial = random_serial(lambda n: bytes(range(n)))
    state = CaState(generate_root("cluster.local", T0))
    history: list[tuple[dt.datetime, CaState]] = []
    leaves: list[tuple[dt.datetime, x509.Certificate]] = []
    for minute in range(0, 200, 5):
        now = T0 + dt.timedelta(minutes=minute)
        state = run(state, now, requested=minute == 10)
        history.append((now, state))
        csr = x509.load_pem_x509_csr(spiffe_csr(ME))
        leaves.append((now, issue_leaf(state.active, csr, ME, LEAF, now, serial)))
    assert history[-1][1].phase == "steady" and history[-1][1].active != history[0][1].active
    for (issued, leaf), (seen, peer_state) in itertools.product(leaves, history):
        alive = issued <= seen < issued + LEAF
        # The peer's bundle is from its last renewal: any state within one leaf lifetime before `seen`.
        peer_bundles = [st.bundle() for at, st in history if seen - LEAF <= at <= seen]
        if alive:
            assert all(verifies(leaf, b) for b in peer_bundles), f"leaf of {issued} fails at {seen}"
        del peer_state


def test_rotation_starts_by_itself_before_the_root_expires() -> None:
    state = CaState(generate_root("cluster.local", T0, lifetime=AUTO_ROTATE_BEFORE + dt.timedelta(days=1)))
    assert run(state, T0).phase == "steady"
    assert run(state, T0 + dt.timedelta(days=2)).phase == "staged"


def test_a_request_during_a_rotation_starts_nothing_new() -> None:
    staged = run(CaState(generate_root("cluster.local", T0)), T0, requested=True)
    assert advance(staged, T0 + dt.timedelta(minutes=1), requested=True, leaf_lifetime=LEAF,
                   new_root=lambda: generate_root("cluster.local", T0)) is None
