"""The wheel (what the Dockerfile installs) carries the operator and sidecar code through the symlinks."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_operator_sidecar_and_entry_points(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("meshward-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "meshward/operator/entrypoints/main.py" in names
    assert "meshward/operator/api/schema.py" in names
    assert "meshward/sidecar/entrypoints/main.py" in names
    assert not any(n.startswith(("operator/", "sidecar/")) for n in names), "top-level folders leaked"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "meshward-operator = meshward.operator.entrypoints.main:main" in text
    assert "meshward-sidecar = meshward.sidecar.entrypoints.main:main" in text
