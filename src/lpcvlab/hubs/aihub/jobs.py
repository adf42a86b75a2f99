"""A local record of every paid remote job, so that the same work is never paid for twice.

AI Hub jobs cost device time and queue time. The ledger is an append-only JSON-lines file (one
snapshot of an entry per line, the last line for a key wins) that maps a *job key* -- the hash of
everything that determines a job's result: kind, device, options and the content hashes of its
inputs -- to the job that computed it. A runtime consults it before submitting:

- a finished (``SUCCESS``) job with the same key is reused instead of resubmitted;
- a job still ``SUBMITTED`` (the previous run was interrupted while it was in flight) is fetched
  by ID and waited on instead of resubmitted;
- a ``FAILED`` job is not reused: the next run submits anew.

JSON lines rather than SQLite: appends of one short line are atomic on local file systems, so
parallel sweep jobs can share one ledger, and a person can read (and ``grep``) it. A truncated or
garbled line (a run killed mid-write) is skipped with a warning, never fatal.

No secret is ever written here: entries hold job IDs, URLs, hashes, device names and options.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUBMITTED = "SUBMITTED"
SUCCESS = "SUCCESS"
FAILED = "FAILED"

try:  # POSIX advisory locks keep concurrent appenders from interleaving partial lines
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def job_key(kind: str, device: str, options: str, inputs: Mapping[str, Any]) -> str:
    """Content address of a job: equal keys mean the job would compute the same result."""
    canonical = json.dumps(
        {"kind": kind, "device": device, "options": options, "inputs": dict(inputs)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class LedgerEntry:
    """One remote job and what it was computed from."""

    key: str
    kind: str  # "compile" | "profile" | "inference"
    component: str
    job_id: str
    status: str  # SUBMITTED | SUCCESS | FAILED
    device: str
    options: str
    inputs: dict[str, Any] = field(default_factory=dict)  # content hashes: model, dataset, ...
    url: str | None = None
    failure: str | None = None
    created: str = ""
    updated: str = ""


class JobLedger:
    """Append-only JSON-lines ledger of remote jobs, keyed by :func:`job_key`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def _read(self) -> dict[str, LedgerEntry]:
        latest: dict[str, LedgerEntry] = {}
        if not self.path.exists():
            return latest
        names = set(LedgerEntry.__dataclass_fields__)
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.strip()
                if not line:
                    continue
                try:
                    raw = json.loads(line)
                    entry = LedgerEntry(**{k: v for k, v in raw.items() if k in names})
                except (json.JSONDecodeError, TypeError) as exc:
                    log.warning("%s:%d: skipping unreadable line (%s)", self.path, lineno, exc)
                    continue
                latest[entry.key] = entry
        return latest

    def latest(self, key: str) -> LedgerEntry | None:
        """The most recent entry for ``key``, or None when no job was ever recorded for it."""
        return self._read().get(key)

    def entries(self) -> list[LedgerEntry]:
        """The most recent entry of every key, oldest first."""
        return sorted(self._read().values(), key=lambda e: e.updated)

    def _append(self, entry: LedgerEntry) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(asdict(entry), sort_keys=True) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            finally:
                if fcntl is not None:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def record(self, entry: LedgerEntry) -> LedgerEntry:
        """Write a new job (stamping its times) and return the stamped entry."""
        now = _now()
        stamped = replace(entry, created=entry.created or now, updated=now)
        self._append(stamped)
        return stamped

    def update(self, entry: LedgerEntry, status: str, failure: str | None = None) -> LedgerEntry:
        """Record a state change of an existing job (a new line; the old one stays as history)."""
        changed = replace(entry, status=status, failure=failure, updated=_now())
        self._append(changed)
        return changed


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
