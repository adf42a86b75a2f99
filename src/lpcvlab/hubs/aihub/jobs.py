"""AI Hub jobs: the ledger of every paid job, and the driver that submits and waits on them.

**The ledger.** AI Hub jobs cost device time and queue time. :class:`JobLedger` is an
append-only JSON-lines file (one snapshot of an entry per line, the last line for a key wins)
that maps a *job key* -- the hash of everything that determines a job's result: kind, device,
options and the content hashes of its inputs -- to the job that computed it. It is the one
record that answers "was this AI Hub job already paid for?" (the stage cache leaves this hub's
stages to it):

- a finished (``SUCCESS``) job with the same key is reused instead of resubmitted;
- a job still ``SUBMITTED`` (the previous run was interrupted while it was in flight, or the
  network failed right after AI Hub created it) is fetched by ID and waited on instead;
- a ``FAILED`` job is not reused: the next run submits anew.

JSON lines rather than SQLite: each line is appended whole under a file lock
(:func:`lpcvlab.util.io.append_line`), so parallel sweep jobs can share one ledger, and a person can
read (and ``grep``) it. A truncated or garbled line (a run killed mid-write) is skipped with a
warning, never fatal. No secret is ever written here: entries hold job IDs, URLs, hashes, device
names and options.

**The driver.** :class:`JobDriver` knows jobs by kind, key and ID only -- what a job computes,
and what to do when it finishes, is the stage's (:mod:`lpcvlab.hubs.aihub.stages`). It reuses,
resumes or submits each job, polls every job in flight with one progress line per job, starts
the follow-up jobs a finished job's stage returns, and on a failure says which job failed, why,
and what is still running.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import qai_hub.client as hub_client
from tqdm.auto import tqdm

from lpcvlab.errors import RuntimeStageError
from lpcvlab.hubs.aihub.client import CreatedButUnfetched, describe, guard
from lpcvlab.util.io import append_line

log = logging.getLogger(__name__)

SUBMITTED = "SUBMITTED"
SUCCESS = "SUCCESS"
FAILED = "FAILED"

# (component, kind, job_id, url, status): a job came into being or changed state.
Emit = Callable[[str, str, str, "str | None", str], None]


# --------------------------------------------------------------------------- ledger


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

    def record(self, entry: LedgerEntry) -> LedgerEntry:
        """Write a new job (stamping its times) and return the stamped entry."""
        now = _now()
        stamped = replace(entry, created=entry.created or now, updated=now)
        append_line(self.path, json.dumps(asdict(stamped), sort_keys=True))
        return stamped

    def update(self, entry: LedgerEntry, status: str, failure: str | None = None) -> LedgerEntry:
        """Record a state change of an existing job (a new line; the old one stays as history)."""
        changed = replace(entry, status=status, failure=failure, updated=_now())
        append_line(self.path, json.dumps(asdict(changed), sort_keys=True))
        return changed


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- driver


@dataclass
class JobTrail:
    """Every job of one component, by kind, in submission order (results and errors quote it)."""

    component: str
    ids: dict[str, list[str]] = field(default_factory=dict)
    urls: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, job_id: str, url: str) -> None:
        self.ids.setdefault(kind, []).append(job_id)
        self.urls.setdefault(kind, []).append(url)

    def drop(self, kind: str, job_id: str, url: str) -> None:
        self.ids[kind].remove(job_id)
        self.urls[kind].remove(url)

    def summary(self) -> str:
        return "; ".join(f"{k} {', '.join(v)}" for k, v in self.ids.items())


@dataclass
class Pending:
    """A job being waited on, and what its stage does once it succeeds (returns follow-ups)."""

    kind: str
    trail: JobTrail
    job: Any  # a qai_hub Job
    entry: LedgerEntry
    on_success: Callable[[Pending], list[Pending]]
    label: str = ""
    code: str = ""
    started: float = field(default_factory=time.monotonic)
    restart: Callable[[], Pending] | None = None  # set for reused jobs: submit anew

    @property
    def component(self) -> str:
        return self.trail.component

    @property
    def title(self) -> str:
        chunk = f" {self.label}" if self.label else ""
        return f"{self.component} {self.kind}{chunk} {self.job.job_id}"


class ProgressLines:
    """One terminal line per job, showing its state (tqdm; off when not on a terminal)."""

    def __init__(self) -> None:
        self._bars: dict[int, Any] = {}

    def show(self, p: Pending, text: str) -> None:
        bar = self._bars.get(id(p))
        if bar is None:
            bar = tqdm(
                total=1, bar_format="{desc}", position=len(self._bars), leave=True, disable=None
            )
            self._bars[id(p)] = bar
        bar.set_description_str(text, refresh=True)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


class JobDriver:
    """Reuses, resumes or submits jobs through the ledger, and waits on them all together.

    ``emit`` is told of every job as soon as its ID exists and of every state change;
    ``before_submit`` runs before anything new is paid for (the device check).
    """

    def __init__(
        self,
        client: Any,
        ledger: JobLedger,
        device: str,
        *,
        reuse: bool,
        poll_interval_s: float,
        redact: Callable[[object], str],
        emit: Emit,
        before_submit: Callable[[], None] = lambda: None,
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.device = device
        self.reuse = bool(reuse)
        self.poll_interval_s = float(poll_interval_s)
        self._redact = redact
        self._emit = emit
        self._before_submit = before_submit

    def start(
        self,
        kind: str,
        trail: JobTrail,
        inputs: dict[str, Any],
        options: str,
        submit: Callable[[], Any],
        on_success: Callable[[Pending], list[Pending]],
        label: str = "",
        force_new: bool = False,
    ) -> Pending:
        """Reuse, resume or submit one job (in that order of preference) and track it.

        ``inputs`` are the content hashes the job's result depends on; with the kind, device,
        options and AI Hub's API URL they make its ledger key. ``submit()`` submits it (through
        :func:`lpcvlab.hubs.aihub.client.submit`). ``force_new`` skips the ledger (a reused job
        whose results are gone).
        """
        given = inputs
        inputs = {**inputs, "api_url": self.client.config.api_url}
        key = job_key(kind, self.device, options, inputs)
        entry = self.ledger.latest(key) if self.reuse and not force_new else None
        job = None
        if entry is not None and entry.status in (SUBMITTED, SUCCESS):
            job = self._fetch_recorded(entry)
            if job is not None:
                how = "REUSED" if entry.status == SUCCESS else "RESUMED"
                log.info(
                    "AI Hub: %s %s job %s for %s (%s)",
                    "reusing finished" if how == "REUSED" else "resuming in-flight",
                    kind,
                    job.job_id,
                    trail.component,
                    job.url,
                )
                self._emit(trail.component, kind, job.job_id, job.url, how)
        if job is None:
            self._before_submit()
            entry, job = self._submit(kind, trail.component, key, inputs, options, submit)
        trail.add(kind, job.job_id, job.url)
        pending = Pending(kind, trail, job, entry, on_success, label)
        if entry.status == SUCCESS:
            pending.restart = lambda: self.start(
                kind, trail, given, options, submit, on_success, label, force_new=True
            )
        return pending

    def _submit(
        self,
        kind: str,
        component: str,
        key: str,
        inputs: dict[str, Any],
        options: str,
        submit: Callable[[], Any],
    ) -> tuple[LedgerEntry, Any]:
        new_entry = LedgerEntry(
            key=key,
            kind=kind,
            component=component,
            job_id="",
            status=SUBMITTED,
            device=self.device,
            options=options,
            inputs=inputs,
        )
        lost: CreatedButUnfetched | None = None
        try:
            job = submit()
        except CreatedButUnfetched as exc:
            lost = exc
        if lost is not None:
            url = urljoin(self.client.config.web_url, f"jobs/{lost.job_id}/")
            self.ledger.record(replace(new_entry, job_id=lost.job_id, url=url))
            self._emit(component, kind, lost.job_id, url, SUBMITTED)
            raise RuntimeStageError(
                f"{component}: AI Hub created {kind} job {lost.job_id} ({url}) but fetching it "
                f"failed: {lost.reason}. It is in the ledger ({self.ledger.path}); rerun to pick "
                "it up instead of paying again."
            )
        entry = self.ledger.record(replace(new_entry, job_id=job.job_id, url=job.url))
        log.info("AI Hub: submitted %s job %s for %s (%s)", kind, job.job_id, component, job.url)
        self._emit(component, kind, job.job_id, job.url, SUBMITTED)
        return entry, job

    def _fetch_recorded(self, entry: LedgerEntry) -> Any | None:
        try:
            return guard(
                lambda: self.client.get_job(entry.job_id),
                f"fetching {entry.kind} job {entry.job_id} from the ledger",
                self._redact,
                passthrough=(hub_client.UserError,),
            )
        except hub_client.UserError as exc:
            log.warning(
                "AI Hub: ledger job %s (%s, %s) is not visible to this account (%s); "
                "submitting a new one",
                entry.job_id,
                entry.kind,
                entry.component,
                describe(exc, self._redact),
            )
            return None

    def drive(self, initial: list[Pending]) -> None:
        """Poll every tracked job until all are done, starting follow-up jobs as they finish."""
        inflight = list(initial)
        lines = ProgressLines()
        try:
            while inflight:
                progressed = False
                for p in list(inflight):
                    status = self._poll(p, lines)
                    if status.success:
                        inflight.remove(p)
                        if p.entry.status != SUCCESS:
                            p.entry = self.ledger.update(p.entry, SUCCESS)
                            self._emit(p.component, p.kind, p.job.job_id, p.job.url, SUCCESS)
                        progressed = True
                        inflight.extend(p.on_success(p))
                    elif status.failure:
                        inflight.remove(p)
                        raise self._failed(p, status.message, inflight)
                if inflight and not progressed:
                    time.sleep(self.poll_interval_s)
        except BaseException:
            if inflight:
                log.warning(
                    "AI Hub: stopped while these jobs were still running: %s. They are in the "
                    "ledger (%s); rerunning with the same inputs picks them up instead of paying "
                    "again.",
                    ", ".join(p.title for p in inflight),
                    self.ledger.path,
                )
            raise
        finally:
            lines.close()

    def _poll(self, p: Pending, lines: ProgressLines) -> Any:
        status = guard(p.job.get_status, f"polling {p.kind} job {p.job.job_id}", self._redact)
        elapsed = time.monotonic() - p.started
        lines.show(p, f"{p.title}: {status.code} ({elapsed:.0f} s)")
        if status.code != p.code:
            p.code = status.code
            if not (status.success or status.failure):
                log.info("AI Hub: %s: %s", p.title, status.code)
                self._emit(p.component, p.kind, p.job.job_id, p.job.url, status.code)
        return status

    def _failed(self, p: Pending, reason: str | None, others: list[Pending]) -> Exception:
        reason = describe(reason or "AI Hub gave no reason", self._redact)
        p.entry = self.ledger.update(p.entry, FAILED, reason)
        self._emit(p.component, p.kind, p.job.job_id, p.job.url, f"FAILED: {reason}")
        message = (
            f"{p.component}: AI Hub {p.kind} job {p.job.job_id} failed: {reason} "
            f"({p.job.url}). Job IDs of {p.component}: {p.trail.summary()}."
        )
        if p.kind == "compile":
            message += f" Compile options were: {p.entry.options!r}."
        if others:
            message += (
                " Still running on AI Hub (a rerun picks them up): "
                + ", ".join(o.title for o in others)
                + "."
            )
        log.error("%s", message)
        return RuntimeStageError(message)
