"""Which keys hold secrets (tokens, passwords): they never reach params, tags, logs or keys."""

from __future__ import annotations

import re

_SECRET = re.compile(r"(token|secret|password|passwd|api_key|apikey|credential)", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    return bool(_SECRET.search(key))
