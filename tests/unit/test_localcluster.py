"""The local control plane's pure parts: PKI, kubeconfig, argument errors."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from meshward import localcluster


def test_pki_has_an_admin_in_system_masters_and_a_loopback_serving_cert(tmp_path: Path) -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    localcluster.write_pki(tmp_path, now)
    admin = x509.load_pem_x509_certificate((tmp_path / "admin.crt").read_bytes())
    assert admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:masters"
    server = x509.load_pem_x509_certificate((tmp_path / "apiserver.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    assert oct((tmp_path / "ca.key").stat().st_mode & 0o777) == "0o600"


def test_kubeconfig_embeds_credentials(tmp_path: Path) -> None:
    localcluster.write_pki(tmp_path, dt.datetime.now(dt.UTC))
    doc = yaml.safe_load(localcluster.kubeconfig("https://127.0.0.1:1", tmp_path, "admin", "c"))
    assert doc["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:1"
    assert doc["users"][0]["user"]["client-key-data"]
    assert doc["current-context"] == "c"


def test_missing_binary_is_named_with_the_fix(tmp_path: Path) -> None:
    b = localcluster.Binaries(tmp_path / "etcd", tmp_path / "kas", tmp_path / "kcm")
    with pytest.raises(localcluster.ClusterError, match=r"etcd not found at .*: run hack/build-control-plane"):
        b.check()


def test_up_refuses_a_directory_that_holds_a_cluster(tmp_path: Path) -> None:
    for name in ("etcd", "kas", "kcm"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    (tmp_path / "state.json").write_text("{}")
    b = localcluster.Binaries(tmp_path / "etcd", tmp_path / "kas", tmp_path / "kcm")
    with pytest.raises(localcluster.ClusterError, match="run `hack/cluster down` first"):
        localcluster.up(tmp_path, b)


def test_up_without_binaries_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        localcluster.main(["up", "--dir", str(tmp_path)])
    assert e.value.code == 2
    assert "up needs --etcd" in capsys.readouterr().err

