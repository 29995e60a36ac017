"""The docs cannot drift silently: every shell block parses, blocks marked runnable run, every YAML example is
valid for what it claims to be.

- Shell: every ```sh block in README.md and docs/*.md passes `bash -n` and has no comment after a line
  continuation (`\\ # ...` breaks the command when pasted); blocks fenced as ```sh runnable are run, from the
  repository root with the venv's programs, and must succeed.
- YAML: every ```yaml block and every file under docs/examples/ parses; SidecarConfigs load as the agent
  loads them; AuthPolicies pass the operator's validation. The API server's own check of the Kubernetes objects
  (schema and CEL rules, `kubectl apply --dry-run=server`) is tests/integration/test_docs_examples.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.docs import DOCUMENTS, ROOT, blocks

SHELL = blocks("sh")
RUNNABLE = [b for b in SHELL if "runnable" in b[1].split()]


def test_the_docs_have_shell_and_runnable_blocks() -> None:
    assert len(SHELL) >= 6 and len(RUNNABLE) >= 2


@pytest.mark.parametrize(("where", "info", "text"), SHELL, ids=[b[0] for b in SHELL])
def test_shell_blocks_parse_and_paste(where: str, info: str, text: str) -> None:
    proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, f"{where}: {proc.stderr}"
    for n, line in enumerate(text.splitlines(), 1):
        assert not re.search(r"\\\s+#", line), f"{where}+{n}: a comment after a line continuation breaks the " \
                                               f"command when pasted: {line!r}"


@pytest.mark.parametrize(("where", "info", "text"), RUNNABLE, ids=[b[0] for b in RUNNABLE])
def test_runnable_shell_blocks_run(where: str, info: str, text: str) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "-euo", "pipefail"], input=text, capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert proc.returncode == 0, f"{where} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"




def test_every_example_kind_is_checked() -> None:
    kinds = {d.get("kind") for _, d in DOCUMENTS if isinstance(d, dict)}
    assert {"SidecarConfig", "AuthPolicy", "ServiceIdentity", "Revocation"} <= kinds


@pytest.mark.parametrize(("where", "doc"), [d for d in DOCUMENTS if isinstance(d[1], dict)
                                            and d[1].get("kind") == "SidecarConfig"],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_sidecar_config_examples_load_as_the_agent_loads_them(where: str, doc: dict[str, Any]) -> None:
    from meshward.sidecar.config.schema import parse_config
    from meshward.sidecar.domain.snapshot import compile_snapshot

    compile_snapshot(parse_config(doc))


@pytest.mark.parametrize(("where", "doc"), [d for d in DOCUMENTS if isinstance(d[1], dict)
                                            and d[1].get("kind") == "AuthPolicy"],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_authpolicy_examples_pass_the_operators_validation(where: str, doc: dict[str, Any]) -> None:
    from meshward.operator.domain.compile import policy_object, validate

    validate(policy_object({**doc, "metadata": {"namespace": "shop", "name": "x", **doc.get("metadata", {})}}))
