"""Which keys hold secrets (tokens, passwords): they never reach params, tags, logs or keys."""

from __future__ import annotations

import re
from collections.abc import Sequence

_SECRET = re.compile(r"(token|secret|password|passwd|api_key|apikey|credential)", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    return bool(_SECRET.search(key))


def mask_secrets(args: Sequence[str]) -> list[str]:
    """Command-line arguments with the value of each ``key=value`` whose key names a secret
    replaced by ``***``: a command line can then be recorded as it was typed."""
    out = []
    for arg in args:
        key, eq, _ = arg.partition("=")
        out.append(f"{key}=***" if eq and is_secret_key(key) else arg)
    return out
