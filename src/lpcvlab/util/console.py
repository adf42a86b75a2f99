"""Terminal output: stage headers and the closing results table."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence


def stage(name: str, detail: str = "") -> None:
    print(f"==> {name}" + (f": {detail}" if detail else ""), file=sys.stderr, flush=True)


def fmt(value: object, digits: int = 4) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
