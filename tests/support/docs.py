"""The fenced code blocks and YAML examples of the docs, for the docs checks (tests/unit/test_docs.py and
tests/integration/test_docs_examples.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "CONTRIBUTING.md"]
FENCE = re.compile(r"^( *)```([^\n`]*)\n(.*?)^\1```", re.MULTILINE | re.DOTALL)


def blocks(kind: str) -> list[tuple[str, str, str]]:
    """(where, info string, text) of every fenced block whose info starts with `kind`."""
    out = []
    for doc in DOCS:
        if not doc.exists():
            continue
        text = doc.read_text()
        for m in FENCE.finditer(text):
            info = m.group(2).strip()
            if info.split(" ")[0] == kind:
                line = text.count("\n", 0, m.start()) + 1
                body = "\n".join(ln[len(m.group(1)):] for ln in m.group(3).splitlines())
                out.append((f"{doc.relative_to(ROOT)}:{line}", info, body))
    return out


def yaml_documents() -> list[tuple[str, Any]]:
    """(where, document) of every YAML block in the docs and every file under docs/examples/."""
    out = []
    for where, _, text in blocks("yaml"):
        out += [(where, d) for d in yaml.safe_load_all(text) if d is not None]
    for path in sorted((ROOT / "docs" / "examples").rglob("*.yaml")):
        out += [(str(path.relative_to(ROOT)), d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return out


DOCUMENTS = yaml_documents()
