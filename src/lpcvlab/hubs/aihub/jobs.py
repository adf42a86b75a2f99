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

**One job per key, even at the same time.** Looking a key up, uploading, submitting and
recording the job happen while holding the key's *claim* (:meth:`JobLedger.claim`: a
``filelock.FileLock`` on ``<ledger>.claims/<key>.lock``), so a second process (or a second
config of the same sweep) that needs the same job waits for the claim, then finds the first
one's job in the ledger and waits on that job instead of paying for its own. The lock is the
operating system's (``flock``): released when its process dies, and shared by every process that
sees the cache folder (on NFS, Linux emulates ``flock`` with the server's byte-range locks).
Where the filesystem has no ``flock`` at all, ``filelock`` falls back to a lock file whose mere
existence is the lock (one a killed process leaves behind until it is deleted).

**Datasets.** :class:`DatasetRecords` (``aihub_datasets.jsonl`` beside the ledger) maps the
content hash of the arrays a dataset holds (and its input name) to the AI Hub dataset made of
them, so inference inputs and calibration data go up once and are reused by every run and config
that needs the same arrays while AI Hub keeps them (30 days); an expired one is uploaded again,
once (under the same kind of claim).

**The driver.** :class:`JobDriver` knows jobs by kind, key and ID only -- what a job computes,
and what to do when it finishes, is the stage's (:mod:`lpcvlab.hubs.aihub.stages`). It reuses,
resumes or submits each job; a :class:`Drive` polls every job in flight with one progress line
per job (one look per :meth:`Drive.step`, never blocking, so a sweep can wait on the jobs of all
its configs at once), starts the follow-up jobs a finished job's stage returns, and on a failure
says which job failed, why, and what is still running. :meth:`JobDriver.drive` is that step in a
loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin

import qai_hub.client as hub_client
from tqdm.auto import tqdm

from lpcvlab.errors import RuntimeStageError
from lpcvlab.hubs.aihub.client import CreatedButUnfetched, describe, guard
from lpcvlab.util.io import append_line, file_lock

log = logging.getLogger(__name__)

SUBMITTED = "SUBMITTED"
SUCCESS = "SUCCESS"
FAILED = "FAILED"

# (component, kind, job_id, url, status): a job came into being or changed state.
Emit = Callable[[str, str, str, "str | None", str], None]


# --------------------------------------------------------------------------- ledger


R = TypeVar("R")


def read_records(path: Path, record: type[R]) -> dict[str, R]:
    """The last line of each key of a JSON-lines record file, as ``record`` dataclasses (fields
    it does not know are dropped); a truncated or garbled line (a process killed mid-write) is
    skipped with a warning."""
    latest: dict[str, R] = {}
    if not path.exists():
        return latest
    names = set(record.__dataclass_fields__)  # type: ignore[attr-defined]
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                entry = record(**{k: v for k, v in raw.items() if k in names})
            except (json.JSONDecodeError, TypeError) as exc:
                log.warning("%s:%d: skipping unreadable line (%s)", path, lineno, exc)
                continue
            latest[entry.key] = entry  # type: ignore[attr-defined]
    return latest


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
        return read_records(self.path, LedgerEntry)

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

    @contextmanager
    def claim(self, key: str) -> Iterator[None]:
        """Hold ``key`` against every other process and config using this ledger: look it up,
        upload, submit and record inside, and no second job is made for the same key."""
        with claim(self.path, key):
            yield


@contextmanager
def claim(beside: Path, key: str) -> Iterator[None]:
    """The cross-process lock of one key of a record file (``<file>.claims/<key>.lock``)."""
    folder = beside.with_name(beside.name + ".claims")
    with file_lock(folder / key):
        yield


@dataclass
class DatasetRecord:
    """One dataset uploaded to AI Hub and the arrays it holds (their content hash)."""

    key: str
    dataset_id: str
    name: str
    input_name: str
    samples: int
    sha256: str
    api_url: str
    expires: str = ""  # ISO time AI Hub deletes it (30 days after the upload)
    uploaded: str = ""


def dataset_key(input_name: str, sha256: str, api_url: str) -> str:
    """A dataset's identity: the arrays (content hash) under the input name they feed."""
    return job_key("dataset", "", "", {"input": input_name, "sha256": sha256, "api_url": api_url})


class DatasetRecords:
    """``aihub_datasets.jsonl``: which AI Hub dataset holds which arrays (JSON lines, the last
    line of a key wins), so the same inputs are uploaded once while AI Hub keeps them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def latest(self, key: str) -> DatasetRecord | None:
        return read_records(self.path, DatasetRecord).get(key)

    def record(self, record: DatasetRecord) -> DatasetRecord:
        stamped = replace(record, uploaded=record.uploaded or _now())
        append_line(self.path, json.dumps(asdict(stamped), sort_keys=True))
        return stamped

    @contextmanager
    def claim(self, key: str) -> Iterator[None]:
        """As :meth:`JobLedger.claim`: one upload of the same arrays at a time."""
        with claim(self.path, key):
            yield


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
    """One terminal line per job, showing its state (tqdm; off when not on a terminal).

    Lines are placed among every job this process shows, so the jobs of several runs waited on
    together (a sweep on AI Hub) each keep a line of their own.
    """

    _taken: set[int] = set()  # terminal rows in use in this process

    def __init__(self) -> None:
        self._bars: dict[int, Any] = {}
        self._rows: dict[int, int] = {}

    def show(self, p: Pending, text: str) -> None:
        bar = self._bars.get(id(p))
        if bar is None:
            row = next(i for i in range(len(self._taken) + 1) if i not in self._taken)
            self._taken.add(row)
            self._rows[id(p)] = row
            bar = tqdm(total=1, bar_format="{desc}", position=row, leave=True, disable=None)
            self._bars[id(p)] = bar
        bar.set_description_str(text, refresh=True)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        for row in self._rows.values():
            self._taken.discard(row)
        self._bars.clear()
        self._rows.clear()


class Drive:
    """Jobs waited on together. :meth:`step` looks at every one of them once (and at once again
    at the follow-up jobs a finished one started) and returns without waiting, so one process
    can wait on the jobs of many runs; :meth:`stop` says what is left running when the wait is
    given up (an interrupt, a failure elsewhere)."""

    def __init__(self, driver: JobDriver, initial: list[Pending]) -> None:
        self.driver = driver
        self.inflight = list(initial)
        self.lines = ProgressLines()
        self._stopped = False

    @property
    def done(self) -> bool:
        return not self.inflight

    def step(self) -> bool:
        """One look at every job in flight; True when none is left. A failed job raises (a
        RuntimeStageError naming it and what is still running)."""
        try:
            progressed = True
            while progressed and self.inflight:
                progressed = False
                for p in list(self.inflight):
                    status = self.driver._poll(p, self.lines)
                    if status.success:
                        self.inflight.remove(p)
                        if p.entry.status != SUCCESS:
                            p.entry = self.driver.ledger.update(p.entry, SUCCESS)
                            self.driver._emit(p.component, p.kind, p.job.job_id, p.job.url, SUCCESS)
                        progressed = True
                        self.inflight.extend(p.on_success(p))
                    elif status.failure:
                        self.inflight.remove(p)
                        raise self.driver._failed(p, status.message, self.inflight)
        except BaseException:
            self.stop()
            raise
        if not self.inflight:
            self.lines.close()
        return not self.inflight

    def stop(self) -> None:
        """Give up waiting: name the jobs still running (a rerun picks them up from the
        ledger) and release their progress lines. Said once."""
        if self.inflight and not self._stopped:
            log.warning(
                "AI Hub: stopped while these jobs were still running: %s. They are in the "
                "ledger (%s); rerunning with the same inputs picks them up instead of paying "
                "again.",
                ", ".join(p.title for p in self.inflight),
                self.driver.ledger.path,
            )
        self._stopped = True
        self.lines.close()


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
        replacing: str | None = None,
    ) -> Pending:
        """Reuse, resume or submit one job (in that order of preference) and track it.

        ``inputs`` are the content hashes the job's result depends on; with the kind, device,
        options and AI Hub's API URL they make its ledger key. ``submit()`` submits it (through
        :func:`lpcvlab.hubs.aihub.client.submit`). The key is claimed (:meth:`JobLedger.claim`)
        from the look-up until the new job is recorded, so a process or config needing the same
        job meanwhile waits and then takes this one. ``replacing`` names a reused job whose
        results are gone: it is not reused again (a job another process made in its place is).
        """
        given = inputs
        inputs = {**inputs, "api_url": self.client.config.api_url}
        key = job_key(kind, self.device, options, inputs)
        if not self.reuse:
            self._before_submit()
            entry, job = self._submit(kind, trail.component, key, inputs, options, submit)
        else:
            with self.ledger.claim(key):
                entry, job = self._reuse_or_submit(
                    kind, trail, key, inputs, options, submit, replacing
                )
        trail.add(kind, job.job_id, job.url)
        pending = Pending(kind, trail, job, entry, on_success, label)
        if entry.status == SUCCESS:
            pending.restart = lambda: self.start(
                kind, trail, given, options, submit, on_success, label, replacing=job.job_id
            )
        return pending

    def _reuse_or_submit(
        self,
        kind: str,
        trail: JobTrail,
        key: str,
        inputs: dict[str, Any],
        options: str,
        submit: Callable[[], Any],
        replacing: str | None,
    ) -> tuple[LedgerEntry, Any]:
        entry = self.ledger.latest(key)
        if entry is not None and entry.job_id == replacing:
            entry = None
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
                return entry, job
        self._before_submit()
        return self._submit(kind, trail.component, key, inputs, options, submit)

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
        drive = Drive(self, initial)
        while not drive.step():
            time.sleep(self.poll_interval_s)

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
