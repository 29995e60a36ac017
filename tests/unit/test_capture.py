"""Traffic capture rules (sidecar/domain/capture.py) and `meshward-init`: what is captured, what never is."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshward.sidecar.domain.capture import (
    AGENT_ADMIN_PORT,
    INBOUND_PORT,
    OUTBOUND_LISTENER_DSCP,
    OUTBOUND_PORT,
    PROXY_CONNTRACK_ZONE,
    PROXY_DSCP,
    PROXY_HEALTH_PORT,
    PROXY_UID,
    Capture,
    CaptureError,
    ip6tables_reset_rules,
    ip6tables_rules,
    iptables_rules,
    parse_cidrs,
    parse_ports,
)


def rules(c: Capture | None = None) -> list[str]:
    return iptables_rules(c or Capture()).splitlines()


def test_every_tcp_connection_in_and_out_is_redirected_to_envoy() -> None:
    r = rules()
    r = r[:r.index("COMMIT") + 1]  # the nat table
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


def test_port_reuse_bypass_the_proxys_connections_are_tracked_apart_from_the_apps() -> None:
    """Capture bypass by port reuse: a SYN meeting a conntrack entry the kernel does not reopen (the proxy's last
    connection of that 4-tuple, aborted or reset by its peer) rode on it, skipping the nat rules, so the app's
    connection went out uncaptured (tests/integration/test_capture_conntrack_netns.py shows it on the kernel). Every
    rule set puts TCP carrying the proxy's DSCP (a socket keeps it after Envoy closes it; its owner it loses) in a
    conntrack zone of its own for the original direction, so replies still find their entries in the default zone,
    and clears the DSCP on the way out."""
    dscp = f"-p tcp -m dscp --dscp {PROXY_DSCP:#04x}"
    for text, loopback in ((iptables_rules(Capture()), "127.0.0.0/8"), (ip6tables_rules(Capture()), "::1/128"),
                           (ip6tables_reset_rules(Capture()), "::1/128")):
        lines = text.splitlines()
        zone = f"-j CT --zone-orig {PROXY_CONNTRACK_ZONE}"
        listener = f"-p tcp -m dscp --dscp {OUTBOUND_LISTENER_DSCP:#04x}"
        assert lines[lines.index("*raw"):] == [
            "*raw", f"-A OUTPUT {dscp} {zone}",
            # the kernel's own resets (no process's socket) carry the DSCP of what they answer, not a socket's: those
            # answering Envoy's outbound listener are the app's, the others the proxy's
            f"-A OUTPUT {listener} -j ACCEPT",
            f"-A OUTPUT -p tcp --tcp-flags RST RST -m owner ! --uid-owner 0-4294967294 {zone}", "COMMIT",
            "*mangle", f"-A POSTROUTING {dscp} -j DSCP --set-dscp 0",
            f"-A POSTROUTING ! -s {loopback} {listener} -j DSCP --set-dscp 0", "COMMIT"], text
    assert PROXY_CONNTRACK_ZONE != 0  # 0 is the default zone, the app's
    assert PROXY_DSCP & 0b11 == OUTBOUND_LISTENER_DSCP & 0b11 == 0b11  # RFC 2474 pool 2: experimental or local use
    assert PROXY_DSCP != OUTBOUND_LISTENER_DSCP


def test_runas_group_1337_bypass_the_proxys_group_exempts_nothing() -> None:
    """Capture bypass by group: an app with `runAsGroup: 1337` (or a root app calling setgid(1337)) skipped Envoy
    outbound because the proxy's GID was exempt too. Only the proxy's user is; no rule matches on a group."""
    for text in (iptables_rules(Capture()), ip6tables_rules(Capture()), ip6tables_reset_rules(Capture())):
        assert "--gid-owner" not in text
        assert f"--uid-owner {PROXY_UID} -j RETURN" in text


def test_ipv6_link_local_side_door_tcp_over_ipv6_is_captured_like_ipv4() -> None:
    """IPv6 side door: capture was IPv4 only, so an unmeshed pod reached a meshed app on `::` over its link-local
    address with no mTLS and no policy. TCP over IPv6 now goes to Envoy like IPv4: every inbound connection to its
    inbound listener but for the probe ports and excluded ports, every outbound one to its outbound listener but
    for the proxy's own, `::1` and the exclusions. No address (link-local or other) and no interface is exempt."""
    r = ip6tables_rules(Capture((9090,), (5432,))).splitlines()
    assert r[0] == "*nat" and r[-1] == "COMMIT"
    assert "-A PREROUTING -p tcp -j MESHWARD_INBOUND" in r and "-A OUTPUT -p tcp -j MESHWARD_OUTPUT" in r
    assert [x for x in r if x.startswith("-A MESHWARD_INBOUND")] == [
        *(f"-A MESHWARD_INBOUND -p tcp --dport {p} -j RETURN" for p in sorted((9090, AGENT_ADMIN_PORT,
                                                                               PROXY_HEALTH_PORT))),
        f"-A MESHWARD_INBOUND -p tcp -j REDIRECT --to-ports {INBOUND_PORT}"]
    assert [x for x in r if x.startswith("-A MESHWARD_OUTPUT")] == [
        f"-A MESHWARD_OUTPUT -m owner --uid-owner {PROXY_UID} -j RETURN",
        "-A MESHWARD_OUTPUT -d ::1/128 -j RETURN",
        "-A MESHWARD_OUTPUT -p tcp --dport 5432 -j RETURN",
        f"-A MESHWARD_OUTPUT -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}"]
    assert not [x for x in r if " -i " in x or " -o " in x or "fe80" in x]


def test_both_families_capture_alike_but_for_their_loopback_and_cidrs() -> None:
    """The IPv6 rules are the IPv4 rules with IPv6's loopback and IPv6's excluded CIDRs: nothing else differs."""
    c = Capture((9090,), (5432,), ("10.20.0.0/16", "fd00:20::/64"))
    v4, v6 = iptables_rules(c), ip6tables_rules(c)
    assert "-d 10.20.0.0/16 -j RETURN" in v4 and "fd00" not in v4
    assert "-d fd00:20::/64 -j RETURN" in v6 and "10.20" not in v6
    assert v4.replace("127.0.0.0/8", "::1/128").replace("10.20.0.0/16", "fd00:20::/64") == v6


def test_without_an_ipv6_nat_table_tcp_over_ipv6_is_reset_not_passed() -> None:
    """The fallback where the kernel has no IPv6 nat table (no ip6table_nat): inbound TCP over IPv6 is reset but for
    loopback, the probe ports and excluded ports; so is the app's outbound TCP over IPv6 (it would skip Envoy)."""
    r = ip6tables_reset_rules(Capture((9090,), (5432,), ("10.20.0.0/16", "fd00:20::/64"))).splitlines()
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
                          "-A MESHWARD_OUTPUT -d fd00:20::/64 -j RETURN",
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


def test_cidrs_of_both_families_are_normalised() -> None:
    assert parse_cidrs("10.1.2.3/16, 192.168.1.5", "x") == ("10.1.0.0/16", "192.168.1.5/32")
    assert parse_cidrs("FD00:0:0::1/8,2001:db8::7", "x") == ("2001:db8::7/128", "fd00::/8")
    for bad in ("10.0.0.0/40", "fe80::%eth0/64", "fd00::/129"):
        with pytest.raises(CaptureError, match="not a CIDR"):
            parse_cidrs(bad, "x")


def _init(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "meshward-init"), *args], capture_output=True, text=True,
                          timeout=30)


def test_meshward_init_prints_its_rules_and_refuses_bad_flags() -> None:
    proc = _init("--dry-run", "--exclude-inbound-ports", "9090")
    assert proc.returncode == 0 and "--dport 9090 -j RETURN" in proc.stdout
    # The IPv6 nat rules, then the fallback where the kernel has no IPv6 nat table.
    assert "-A MESHWARD_OUTPUT -d ::1/128 -j RETURN" in proc.stdout
    assert "*filter" in proc.stdout.split("# where the kernel has no IPv6 nat table, instead:")[1]
    bad = _init("--dry-run", "--exclude-outbound-cidrs", "nope")
    assert bad.returncode == 2 and "--exclude-outbound-cidrs: 'nope' is not a CIDR" in bad.stderr


def _fake_restore(tmp_path: Path, name: str, refuses: str) -> str:
    """A stand-in for an `*-restore` command that fails on input containing `refuses` (records what it took)."""
    script = tmp_path / name
    script.write_text(f"#!/bin/sh\nin=$(cat)\ncase \"$in\" in *'{refuses}'*) echo 'no such table' >&2; exit 1;; esac\n"
                      f"printf '%s\\n' \"$in\" >> {tmp_path}/{name}.took\n")
    script.chmod(0o755)
    return name


@pytest.mark.parametrize(("refuses", "has_ipv6", "code", "took"), [
    ("NOTHING", True, 0, "*nat"),           # the IPv6 nat table: captured
    ("*nat", True, 0, "*filter"),           # no IPv6 nat table: reset, the pod starts
    ("COMMIT", True, 1, None),              # neither, and the pod has IPv6: the pod fails
    ("COMMIT", False, 0, None),             # neither, and no IPv6 at all: nothing to close
], ids=["captured", "reset-fallback", "neither-fails", "no-ipv6"])
def test_meshward_init_captures_ipv6_else_resets_it_else_fails(
        refuses: str, has_ipv6: bool, code: int, took: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """What the init container does with IPv6: the nat rules; where the kernel has no IPv6 nat table, the reset
    rules (logged as such); where neither goes in, it fails the pod unless the pod has no IPv6 at all."""
    from meshward.sidecar.entrypoints import capture as init

    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(init, "RESTORE_COMMANDS", (_fake_restore(tmp_path, "fake4-restore", "NOTHING"),))
    monkeypatch.setattr(init, "RESTORE6_COMMANDS", (_fake_restore(tmp_path, "fake6-restore", refuses),))
    disabled = tmp_path / "disable_ipv6"
    disabled.write_text("0\n" if has_ipv6 else "1\n")
    monkeypatch.setattr(init, "IPV6_DISABLED", disabled)
    addresses = tmp_path / "if_inet6"
    addresses.write_text("00000000000000000000000000000001 01 80 10 80       lo\n")
    monkeypatch.setattr(init, "IF_INET6", addresses)
    assert init.main([]) == code
    out = capsys.readouterr()
    installed6 = tmp_path / "fake6-restore.took"
    if took is None:
        assert not installed6.exists()
    else:
        assert installed6.read_text().startswith(took)
    assert ("IPv6 reset, not captured" in out.out) == (took == "*filter")
    assert ("cannot capture or close IPv6" in out.err) == (code == 1)


def test_an_interface_with_ipv6_turned_on_behind_all_counts_as_ipv6(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-interface sysctl trick: `all.disable_ipv6=1` but `eth0.disable_ipv6=0` (unsafe sysctls a pod may be
    allowed) left eth0 with IPv6 while the init container, reading `all`, judged the pod IPv6-free and started it
    uncaptured when neither IPv6 rule set went in. The namespace's addresses are read too."""
    from meshward.sidecar.entrypoints import capture as init

    disabled = tmp_path / "disable_ipv6"
    disabled.write_text("1\n")
    addresses = tmp_path / "if_inet6"
    addresses.write_text("00000000000000000000000000000001 01 80 10 80       lo\n")
    monkeypatch.setattr(init, "IPV6_DISABLED", disabled)
    monkeypatch.setattr(init, "IF_INET6", addresses)
    assert not init._has_ipv6()
    addresses.write_text(addresses.read_text() + "fe8000000000000004d772fffe76a907 02 40 20 80     eth0\n")
    assert init._has_ipv6()


def _disabled_ipv6_netns_available() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None


@pytest.mark.parametrize(("flag", "expected"), [("on", True), ("off", False)])
def test_meshward_proxy_takes_ipv6_as_told(flag: str, expected: bool) -> None:
    proc = subprocess.run([str(Path(sys.executable).parent / "meshward-proxy"), "--print", "--ipv6", flag],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert ('"address": "::"' in proc.stdout) is expected


@pytest.mark.netns
def test_meshward_proxy_auto_leaves_ipv6_out_where_the_pod_has_none() -> None:
    """Binding `[::]` fails where IPv6 is off, and Envoy then refuses the whole listener: `--ipv6 auto` (the
    injected default) adds the IPv6 sockets only where the pod's network namespace can bind its IPv6 loopback."""
    if not _disabled_ipv6_netns_available():
        pytest.fail("this test needs root and unshare (a network namespace); deselect it with -m 'not netns'")
    exe = str(Path(sys.executable).parent / "meshward-proxy")
    script = f"ip link set lo up; sysctl -qw net.ipv6.conf.all.disable_ipv6=$0; exec {exe} --print"
    for disabled, expected in (("1", False), ("0", True)):
        proc = subprocess.run(["unshare", "-n", "sh", "-c", script, disabled], capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert ('"address": "::"' in proc.stdout) is expected, disabled
