"""The package layout: entry points work and nothing shadows the stdlib `operator`."""

from __future__ import annotations

import operator
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from meshward import __version__

ROOT = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def test_import_operator_in_tests_is_the_stdlib() -> None:
    assert Path(operator.__file__).resolve().parent == STDLIB
    assert operator.itemgetter(1)([0, 1]) == 1


@pytest.mark.parametrize("flags", [[], ["-S"]], ids=["site", "no-site"])
def test_import_operator_from_repo_root_is_the_stdlib(flags: list[str]) -> None:
    """With the repo root first on sys.path (as `python -c` from the root puts it), stdlib wins."""
    out = subprocess.run([sys.executable, *flags, "-c", "import operator; print(operator.__file__)"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).resolve().parent == STDLIB


def test_top_level_code_folders_are_not_regular_packages() -> None:
    """A regular package named `operator` on sys.path would shadow the stdlib module."""
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert not (ROOT / "sidecar" / "__init__.py").exists()


def test_top_level_code_folders_hold_only_subpackages() -> None:
    """import-linter (grimp) only sees modules inside regular subpackages of a namespace portion."""
    for folder in ("operator", "sidecar"):
        assert sorted(p.name for p in (ROOT / folder).glob("*.py")) == []
        for sub in (ROOT / folder).iterdir():
            if sub.is_dir() and sub.name != "__pycache__":
                assert (sub / "__init__.py").exists(), sub


def test_meshward_operator_maps_to_the_top_level_folder() -> None:
    import meshward.operator.entrypoints.main
    import meshward.sidecar.entrypoints.main

    assert Path(meshward.operator.entrypoints.main.__file__).resolve() == ROOT / "operator/entrypoints/main.py"
    assert Path(meshward.sidecar.entrypoints.main.__file__).resolve() == ROOT / "sidecar/entrypoints/main.py"


@pytest.mark.parametrize("program", ["meshward", "meshward-operator", "meshward-sidecar"])
def test_console_entry_points_print_their_version(program: str) -> None:
    exe = Path(sys.executable).parent / program
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines()[0] == f"{program} {__version__}"


@pytest.mark.parametrize("program", ["meshward", "meshward-sidecar"])  # the operator runs without arguments
def test_console_entry_points_print_version_and_usage(program: str) -> None:
    exe = Path(sys.executable).parent / program
    proc = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines()[0] == f"{program} {__version__}"
    assert proc.stdout.splitlines()[1].startswith(f"usage: {program}")


@pytest.mark.parametrize("program", ["meshward", "meshward-operator", "meshward-sidecar"])
def test_console_entry_points_reject_unknown_flags(program: str) -> None:
    exe = Path(sys.executable).parent / program
    proc = subprocess.run([str(exe), "--no-such-flag"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in proc.stderr


def test_an_http_only_agent_does_not_load_grpc() -> None:
    """gRPC and the Envoy protos cost ~15 MB of RSS; they load only for gRPC ext_authz, SDS or the operator link."""
    code = "import sys, meshward.sidecar.entrypoints.main; print('grpc' in sys.modules, 'envoy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
