"""Helpers for tests that run ``python run.py`` in a subprocess against a throwaway store."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from lpcvlab.tracking.recorder import PARENT_RUN_ENV
from lpcvlab.tracking.runstore import RunInfo, search

REPO = Path(__file__).resolve().parents[1]
_EMPTY_STORE: list[Path] = []


def child_cpu_seconds() -> float:
    """CPU seconds used so far by this process's finished subprocesses: how much work a
    ``python run.py`` did, apart from the time it waited on a machine busy with other tests."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def seeded_store(tmp: Path, name: str = "mlflow.db") -> str:
    """The URI of an MLflow SQLite store at ``tmp/name``, copied (when absent) from an empty store
    made once per test process. A new store runs MLflow's schema migrations, about 4 s of CPU,
    which every test with a store of its own would repeat; the copy holds exactly what a new
    store does (the migrated schema and the Default experiment)."""
    if not _EMPTY_STORE:
        empty = Path(tempfile.mkdtemp(prefix="lpcvlab-empty-store-")) / "mlflow.db"
        MlflowClient(tracking_uri=f"sqlite:///{empty}").search_experiments()
        _EMPTY_STORE.append(empty)
    path = Path(tmp) / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_EMPTY_STORE[0], path)
    return f"sqlite:///{path}"


# clip_tiny on 8 demo images, two timed iterations: a run takes seconds plus imports.
TINY = [
    "backbone=clip_tiny",
    "data.demo.num_images=8",
    "hub.profile_iterations=2",
    "hub.warmup_iterations=1",
    "export.parity_samples=2",
]


def store_overrides(tmp: Path, cache: Path | None = None) -> list[str]:
    """A store, a cache and output folders under ``tmp`` (absolute: run.py runs in the repo)."""
    return [
        f"tracking.uri={seeded_store(tmp)}",
        f"tracking.artifact_root={tmp}/artifacts",
        f"paths.cache_dir={cache or tmp / 'cache'}",
        f"hydra.run.dir={tmp}/outputs",
        f"hydra.sweep.dir={tmp}/multirun",
    ]


def run_py(
    *args: str, timeout: float = 600, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python run.py ARGS`` from the repository root, in a clean environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", PARENT_RUN_ENV)}
    env |= env_extra or {}
    return subprocess.run(
        [sys.executable, "run.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def all_runs(tmp: Path) -> list[RunInfo]:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    return search(client, [e.experiment_id for e in client.search_experiments()])


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    out, err = proc.stdout[-4000:], proc.stderr[-6000:]
    return f"exit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"
