"""``lpcvlab reproduce RUN_ID``: re-run a logged run from its own config and compare metrics.

The run's resolved ``config.yaml`` artifact is the recipe (its ``.hydra/`` overrides are shown
and attached to the new run); the code is the recipe's other half, so the run's ``git_commit``
must be this checkout's HEAD and neither tree may have uncommitted changes, or the command
refuses and says which (``--force`` runs anyway and tags the run ``reproduce_forced``). A run
that did not finish (FAILED, KILLED, RUNNING) is refused too, saying why (``--force`` re-runs it).
The thread counts the run recorded (``threads.*`` params) are set back before it re-runs.

The stage cache is off for the re-run unless ``--use-cache``: reusing the original's stages
would "reproduce" by copying. Accuracy and parity metrics must match exactly; latency, memory
and timings are measurements and are shown but not required to match.
"""

from __future__ import annotations

import copy
import math
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lpcvlab.errors import ConfigError, LpcvlabError
from lpcvlab.tracking.runstore import (
    RunInfo,
    check_run_id,
    download_artifact,
    get_run,
    open_store,
)
from lpcvlab.util import console
from lpcvlab.util.seeding import restore_threads

# Metrics that measure the machine rather than the model: shown, never required to match.
MEASURED_PREFIXES = (
    "latency_ms/",
    "peak_memory_mb/",
    "peak_memory_mb_low/",
    "inference_seconds/",
    "export_seconds/",
    "stage_seconds/",
    "system/",  # MLflow's system metrics (CPU, memory, GPU while the run ran)
)


class ReproduceError(LpcvlabError):
    """A run that cannot be (or was not) reproduced."""


# The entry point's job: (config, work dir, .hydra dir, extra tags) -> the new run's ID. Passed
# in by the caller (``lpcvlab.app``), so that this module never imports the pipeline above it.
Runner = Callable[[DictConfig, Path, "Path | None", dict[str, str]], str]


@dataclass(frozen=True)
class CodeVersion:
    """The checkout the code runs from: HEAD and its uncommitted changes to tracked files."""

    commit: str  # "unknown" outside a git checkout
    changes: tuple[str, ...] = ()

    @property
    def dirty(self) -> bool:
        return bool(self.changes)


@dataclass(frozen=True)
class MetricDiff:
    name: str
    old: float | None
    new: float | None
    measured: bool

    @property
    def matches(self) -> bool:
        if self.old is None:  # a metric the original did not log (older code): informational
            return True
        if self.new is None:
            return False
        return self.old == self.new or (math.isnan(self.old) and math.isnan(self.new))


@dataclass
class Reproduction:
    original_run_id: str
    new_run_id: str
    diffs: list[MetricDiff]
    forced: list[str] = field(default_factory=list)  # code-version problems overridden

    @property
    def mismatches(self) -> list[MetricDiff]:
        return [d for d in self.diffs if not d.measured and not d.matches]

    @property
    def reproduced(self) -> bool:
        return not self.mismatches

    def render(self) -> str:
        rows = []
        for d in self.diffs:
            delta = d.new - d.old if d.old is not None and d.new is not None else math.nan
            verdict = "measured" if d.measured else ("yes" if d.matches else "NO")
            rows.append([d.name, _num(d.old), _num(d.new), _num(delta), verdict])
        return console.table(["metric", "original", "reproduced", "difference", "match"], rows)


def current_code_version(repo: Path | None = None) -> CodeVersion:
    """HEAD and changed tracked files of the checkout holding the lpcvlab package."""
    import lpcvlab

    where = repo or Path(lpcvlab.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=where, capture_output=True, text=True, check=True, timeout=20
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return CodeVersion("unknown")
    return CodeVersion(commit, tuple(line.strip() for line in status.splitlines() if line.strip()))


def code_problems(run: RunInfo, current: CodeVersion) -> list[str]:
    """Why the code that would run now may not be the code that made ``run`` (empty = same)."""
    problems = []
    commit = run.tags.get("git_commit", "unknown") or "unknown"
    if commit == "unknown":
        problems.append(f"run {run.run_id} recorded no git commit, so its code cannot be checked")
    elif current.commit == "unknown":
        problems.append("the lpcvlab package is not in a git checkout, so HEAD cannot be checked")
    elif commit != current.commit:
        problems.append(
            f"run {run.run_id} was made at commit {commit[:12]} but HEAD is "
            f"{current.commit[:12]}: check that commit out first (e.g. `git worktree add "
            f"../repro-{commit[:8]} {commit[:12]}`, then `pip install -e` it and run there)"
        )
    if run.tags.get("git_dirty") == "true":
        problems.append(
            f"run {run.run_id} was made from a tree with uncommitted changes (git_dirty=true): "
            f"commit {commit[:12]} alone does not hold the code that ran"
        )
    if current.dirty:
        shown = ", ".join(current.changes[:5]) + (" ..." if len(current.changes) > 5 else "")
        problems.append(
            f"this checkout has uncommitted changes to tracked files ({shown}): commit or stash "
            "them"
        )
    return problems


def refusal_of_unfinished(run: RunInfo) -> str:
    """Why a FAILED, KILLED or RUNNING run is not re-run by default: reproducing a failure runs
    it again, which is rarely what was meant."""
    error = run.tags.get("error")
    why = f" ({error.splitlines()[0][:300]})" if error else ""
    return (
        f"refusing to reproduce run {run.run_id}: it ended {run.status}{why}, so there are no "
        "results to reproduce; fix the cause and start a new run, or pass --force (python "
        f"run.py: +reproduce={{run_id:{run.run_id},force:true}}) to re-run it anyway"
    )


def is_measured(name: str, run: RunInfo) -> bool:
    if name.startswith(MEASURED_PREFIXES) or name == "latency_ms/total":
        return True
    # The objective includes a latency penalty when the run had a budget.
    has_budget = run.params.get("budget.latency_ms") not in (None, "None", "null")
    return name == "objective" and has_budget


def diff_metrics(old: RunInfo, new: RunInfo) -> list[MetricDiff]:
    names = sorted(set(old.metrics) | set(new.metrics))
    return [
        MetricDiff(n, old.metrics.get(n), new.metrics.get(n), is_measured(n, old)) for n in names
    ]


def load_run_config(client: Any, run: RunInfo, dst: Path) -> tuple[DictConfig, Path | None]:
    """The run's resolved config and its downloaded ``.hydra`` folder (None if it had none)."""
    path = download_artifact(client, run.run_id, "config.yaml", dst)
    if path is None:
        raise ReproduceError(
            f"run {run.run_id} has no config.yaml artifact: it was not made by lpcvlab's "
            "pipeline (a sweep parent run? reproduce one of its children)"
        )
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    hydra_dir = download_artifact(client, run.run_id, ".hydra", dst)
    return cfg, hydra_dir


def prepare_config(cfg: DictConfig, uri: str, use_cache: bool) -> DictConfig:
    """The original config, writing to this store, with the stage cache off unless asked."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.tracking.uri = uri
        if cfg.get("cache") is not None:
            cfg.cache.enabled = bool(use_cache) and bool(cfg.cache.enabled)
    return cfg


def reproduce(
    run_id: str,
    uri: str,
    runner: Runner,
    force: bool = False,
    use_cache: bool = False,
    work_dir: Path | None = None,
    current: CodeVersion | None = None,
) -> Reproduction:
    """Re-run ``run_id`` with ``runner`` as a new run tagged ``reproduced_from`` and diff its
    metrics."""
    check_run_id(run_id)
    client = open_store(uri)
    original = get_run(client, run_id)
    if original.status != "FINISHED" and not force:
        raise ReproduceError(refusal_of_unfinished(original))
    problems = code_problems(original, current or current_code_version())
    if problems and not force:
        raise ReproduceError(
            f"refusing to reproduce run {run_id}:\n  - "
            + "\n  - ".join(problems)
            + "\nFix the above, or pass --force (python run.py: "
            f"+reproduce={{run_id:{run_id},force:true}}) to run anyway; the new run is then "
            "tagged reproduce_forced=true."
        )
    if original.status != "FINISHED":
        console.stage("reproduce", f"note: run {run_id} ended {original.status}; metrics partial")
    restored = restore_threads(original.params)
    if restored:
        console.stage("reproduce", "thread settings as the run recorded: " + ", ".join(restored))
    work_dir = (
        work_dir or Path("outputs") / "reproduce" / f"{run_id[:8]}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, hydra_dir = load_run_config(client, original, Path(tmp))
        overrides = _overrides(hydra_dir)
        console.stage(
            "reproduce",
            f"run {run_id} ({original.name}); overrides: {' '.join(overrides) or '(none)'}",
        )
        tags = {"reproduced_from": run_id}
        if problems:
            tags |= {"reproduce_forced": "true", "reproduce_warnings": " | ".join(problems)[:5000]}
        new_run_id = runner(prepare_config(cfg, uri, use_cache), work_dir, hydra_dir, tags)
    new = get_run(client, new_run_id)
    return Reproduction(run_id, new_run_id, diff_metrics(original, new), problems)


def report(rep: Reproduction) -> str:
    lines = [f"\nRun {rep.new_run_id} reproduces {rep.original_run_id}:", rep.render(), ""]
    if rep.forced:
        lines.append("forced past: " + "; ".join(rep.forced))
    if rep.reproduced:
        lines.append(
            "REPRODUCED: every metric that is not a measurement (accuracy, parity, data) "
            "is identical."
        )
    else:
        names = ", ".join(d.name for d in rep.mismatches)
        lines.append(f"NOT REPRODUCED: {len(rep.mismatches)} metric(s) differ: {names}")
    return "\n".join(lines)


def reproduce_from_hydra(cfg: DictConfig, out_dir: Path | None, runner: Runner) -> float:
    """``python run.py +reproduce=RUN_ID`` (or ``+reproduce={run_id:ID,force:true}``).

    The new run gets the original's ``.hydra`` folder, not this job's (which only says
    ``+reproduce=...``); ``out_dir`` holds its files.
    """
    spec = cfg.reproduce
    if isinstance(spec, DictConfig):
        run_id, force, use_cache = (
            spec.get("run_id"),
            bool(spec.get("force", False)),
            bool(spec.get("use_cache", False)),
        )
    else:
        run_id, force, use_cache = _raw_override("reproduce") or spec, False, False
    if not run_id:
        raise ConfigError("+reproduce needs a run ID: +reproduce=RUN_ID")
    rep = reproduce(
        str(run_id),
        str(cfg.tracking.uri),
        runner,
        force=force,
        use_cache=use_cache,
        work_dir=out_dir,
    )
    print(report(rep))
    if not rep.reproduced:
        raise ReproduceError(
            f"run {rep.new_run_id} does not reproduce {rep.original_run_id}; see the table above"
        )
    value = next((d.new for d in rep.diffs if d.name == "objective"), None)
    return float(value) if value is not None else math.nan


def _raw_override(key: str) -> str | None:
    """The text of ``+key=VALUE`` as typed: a run ID of digits must not become an int."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    for o in HydraConfig.get().overrides.task:
        name, _, value = str(o).lstrip("+~").partition("=")
        if name == key:
            return value.strip("'\"")
    return None


def _overrides(hydra_dir: Path | None) -> list[str]:
    path = hydra_dir / "overrides.yaml" if hydra_dir else None
    if path is None or not path.is_file():
        return []
    return [str(o) for o in OmegaConf.load(path)]


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return console.fmt(float(value), 6)
