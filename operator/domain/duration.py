"""Go-style durations ("1h", "90m", "1h30m", "250ms"), the format of every duration in Meshward's CRDs."""

from __future__ import annotations

import datetime as dt
import re

_PART = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> dt.timedelta:
    """Parse a Go-style duration; raise ValueError for anything else."""
    total, rest = 0.0, text
    if not rest:
        raise ValueError("empty duration")
    while rest:
        m = _PART.match(rest)
        if not m:
            raise ValueError(f"{text!r} is not a duration such as 1h or 30m")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        rest = rest[m.end():]
    return dt.timedelta(seconds=total)
