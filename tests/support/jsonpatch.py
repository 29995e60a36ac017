"""The part of RFC 6902 the injector emits, applied as the API server would: to check a patch does what it says."""

from __future__ import annotations

import copy
from typing import Any


def apply_patch(doc: dict[str, Any], patch: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 `add` and `replace` on object members (all the injector emits)."""
    out = copy.deepcopy(doc)
    for op in patch:
        assert op["op"] in ("add", "replace")
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = out
        for p in parents:
            node = node[p]
        if op["op"] == "replace":
            assert last in node, f"replace of a missing member {op['path']}"
        node[last] = op["value"]
    return out
