"""The CEL engine: the Rust extension of `common-expression-language`, without its CLI.

Why: `import cel` runs the package's __init__, which also imports its interactive
CLI (prompt_toolkit, rich, typer): ~30 MB of RSS in every sidecar for nothing. The
extension module itself is self-contained, so it is loaded directly; if the
package layout ever changes, the plain import is the fallback.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _load() -> ModuleType:
    spec = importlib.util.find_spec("cel")
    if spec is not None and spec.submodule_search_locations:
        for so in Path(next(iter(spec.submodule_search_locations))).glob("cel.*.so"):
            ext = importlib.util.spec_from_file_location("cel.cel", so)
            if ext is not None and ext.loader is not None:
                module = importlib.util.module_from_spec(ext)
                ext.loader.exec_module(module)
                return module
    import cel

    return cel


cel: ModuleType = sys.modules.get("cel.cel") or _load()
