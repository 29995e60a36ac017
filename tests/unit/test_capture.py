"""Traffic capture rules (sidecar/domain/capture.py) and `meshward-init`: what is captured, what never is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshward.sidecar.domain.capture import (
    AGENT_ADMIN_PORT,
    INBOUND_PORT,
    OUTBOUND_PORT,
    PROXY_HEALTH_PORT,
    PROXY_UID,
    Capture,
    CaptureError,
    ip6tables_rules,
    iptables_rules,
    parse_cidrs,
    parse_ports,
)


def rules(c: Capture | None = None) -> list[str]:
    return iptables_rules(c or Capture()).splitlines()


def test_every_tcp_connection_in_and_out_is_redirected_to_envoy() -> None:
    r = rules()
    assert r[0] == "*nat" and r[-1] == "COMMIT"
    assert "-A PREROUTING -p tcp -j MESHWARD_INBOUND" in r
    assert "-A OUTPUT -p tcp -j MESHWARD_OUTPUT" in r
    assert r.index(f"-A MESHWARD_INBOUND -p tcp -j REDIRECT --to-ports {INBOUND_PORT}") > \
        r.index(f"-A MESHWARD_INBOUND -p tcp --dport {AGENT_ADMIN_PORT} -j RETURN")
    assert r[-2] == f"-A MESHWARD_OUTPUT -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}"


def test_the_proxys_own_traffic_is_never_captured_so_nothing_loops() -> None:
    """Envoy's upstream connections (and the agent's calls to the operator) run as PROXY_UID: redirecting them
    would send Envoy's traffic back into Envoy."""
    r = rules()
    redirect = r.index(f"-A MESHWARD_OUTPUT -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}")
    assert r.index(f"-A MESHWARD_OUTPUT -m owner --uid-owner {PROXY_UID} -j RETURN") < redirect
    assert r.index("-A MESHWARD_OUTPUT -d 127.0.0.0/8 -j RETURN") < redirect


def test_runas_group_1337_bypass_the_proxys_group_exempts_nothing() -> None:
    """Capture bypass by group: an app with `runAsGroup: 1337` (or a root app calling setgid(1337)) skipped Envoy
    outbound because the proxy's GID was exempt too. Only the proxy's user is; no rule matches on a group."""
    for text in (iptables_rules(Capture()), ip6tables_rules(Capture())):
        assert "--gid-owner" not in text
        assert f"--uid-owner {PROXY_UID} -j RETURN" in text


def test_ipv6_link_local_side_door_inbound_and_outbound_tcp_over_ipv6_is_reset() -> None:
    """IPv6 side door: capture was IPv4 only, so an unmeshed pod reached a meshed app on `::` over its link-local
    address with no mTLS and no policy. Every inbound TCP connection over IPv6 is now reset but for loopback, the
    probe ports and excluded ports; so is the app's outbound TCP over IPv6 (it would skip Envoy outbound)."""
    r = ip6tables_rules(Capture((9090,), (5432,))).splitlines()
    assert r[0] == "*filter" and r[-1] == "COMMIT"
    assert "-A INPUT -p tcp -j MESHWARD_INBOUND" in r and "-A OUTPUT -p tcp -j MESHWARD_OUTPUT" in r
    reset_in = r.index("-A MESHWARD_INBOUND -p tcp -j REJECT --reject-with tcp-reset")
    reset_out = r.index("-A MESHWARD_OUTPUT -p tcp -j REJECT --reject-with tcp-reset")
    passed_in = [x for x in r[:reset_in] if x.startswith("-A MESHWARD_INBOUND")]
    established = "-m conntrack --ctstate ESTABLISHED,RELATED -j RETURN"
    assert passed_in == [f"-A MESHWARD_INBOUND {established}", "-A MESHWARD_INBOUND -i lo -j RETURN",
                         *(f"-A MESHWARD_INBOUND -p tcp --dport {p} -j RETURN"
                           for p in sorted((9090, AGENT_ADMIN_PORT, PROXY_HEALTH_PORT)))]
    passed_out = [x for x in r[:reset_out] if x.startswith("-A MESHWARD_OUTPUT")]
    # The replies of an allowed connection (an excluded port's SYN-ACK leaves toward the client's ephemeral port)
    # pass by the conntrack rule first: without it the allowed flows themselves were reset.
    assert passed_out == [f"-A MESHWARD_OUTPUT {established}", "-A MESHWARD_OUTPUT -o lo -j RETURN",
                          f"-A MESHWARD_OUTPUT -m owner --uid-owner {PROXY_UID} -j RETURN",
                          "-A MESHWARD_OUTPUT -p tcp --dport 5432 -j RETURN"]


def test_kubelets_probes_reach_the_agent_and_envoys_health_uncaptured() -> None:
    for port in (AGENT_ADMIN_PORT, PROXY_HEALTH_PORT):
        assert f"-A MESHWARD_INBOUND -p tcp --dport {port} -j RETURN" in rules()


def test_exclusions_become_returns_before_the_redirects() -> None:
    r = rules(Capture((9090,), (5432,), ("10.20.0.0/16",)))
    assert "-A MESHWARD_INBOUND -p tcp --dport 9090 -j RETURN" in r
    assert "-A MESHWARD_OUTPUT -p tcp --dport 5432 -j RETURN" in r
    assert "-A MESHWARD_OUTPUT -d 10.20.0.0/16 -j RETURN" in r


@pytest.mark.parametrize(("text", "expected"), [("", ()), ("9090, 8081,9090", (8081, 9090)), ("1,65535", (1, 65535))])
def test_port_lists(text: str, expected: tuple[int, ...]) -> None:
    assert parse_ports(text, "x") == expected


@pytest.mark.parametrize("text", ["http", "0", "65536", "80-90", "-1"])
def test_bad_ports_name_the_setting(text: str) -> None:
    with pytest.raises(CaptureError, match="the-setting"):
        parse_ports(text, "the-setting")


def test_cidrs_are_normalised_and_ipv6_is_refused() -> None:
    assert parse_cidrs("10.1.2.3/16, 192.168.1.5", "x") == ("10.1.0.0/16", "192.168.1.5/32")
    with pytest.raises(CaptureError, match="IPv6"):
        parse_cidrs("fd00::/8", "x")
    with pytest.raises(CaptureError, match="not a CIDR"):
        parse_cidrs("10.0.0.0/40", "x")


def _init(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "meshward-init"), *args], capture_output=True, text=True,
                          timeout=30)


def test_meshward_init_prints_its_rules_and_refuses_bad_flags() -> None:
    proc = _init("--dry-run", "--exclude-inbound-ports", "9090")
    assert proc.returncode == 0 and "--dport 9090 -j RETURN" in proc.stdout
    assert "*filter" in proc.stdout and "REJECT --reject-with tcp-reset" in proc.stdout  # the IPv6 rules too
    bad = _init("--dry-run", "--exclude-outbound-cidrs", "nope")
    assert bad.returncode == 2 and "--exclude-outbound-cidrs: 'nope' is not a CIDR" in bad.stderr
