"""Runs always end: SIGTERM like Ctrl-C, vanished processes pruned, unusable stores named early."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from lpcvlab_runs import REPO, TINY, all_runs, child_cpu_seconds, seeded_store, store_overrides
from mlflow.tracking import MlflowClient

from lpcvlab import cli
from lpcvlab.config.schema import TrackingConfig
from lpcvlab.errors import TrackingStoreError
from lpcvlab.tracking.recorder import (
    FAILURE_TAG,
    VANISHED,
    check_store,
    process_tags,
    prune_vanished,
    start_run,
)


def _run_py(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen(
        [sys.executable, "run.py", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.slow
def test_sigterm_during_export_ends_the_run_killed_and_cleans_up(tmp_path):
    proc = _run_py(*TINY, *store_overrides(tmp_path))
    err_lines: list[str] = []
    reached = threading.Event()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err_lines.append(line)
            if line.startswith("==> export"):
                reached.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    assert reached.wait(timeout=240), "".join(err_lines)[-3000:]
    proc.send_signal(signal.SIGTERM)  # as `timeout`, `docker stop` and SLURM do
    proc.wait(timeout=120)
    reader.join(timeout=10)
    stderr = "".join(err_lines)

    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "Stopped by SIGTERM" in stderr and "KILLED" in stderr
    (run,) = all_runs(tmp_path)
    assert run.status == "KILLED"
    assert run.tags["error"] == "interrupted (SIGTERM)"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert "run.log" in {a.path for a in client.list_artifacts(run.run_id)}  # the job log
    onnx_dir = tmp_path / "cache" / "onnx"
    leftovers = [p.name for p in onnx_dir.iterdir()] if onnx_dir.is_dir() else []
    assert not [n for n in leftovers if n.startswith(".export-")], leftovers


_VANISH = textwrap.dedent(
    """
    import os, signal, sys
    from lpcvlab.config.schema import TrackingConfig
    from lpcvlab.tracking.recorder import start_run
    uri = sys.argv[1]
    with start_run(TrackingConfig(uri=uri, experiment="vanish"), "vanish", "doomed", {}) as rec:
        print(rec.run_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
    """
)


def test_a_run_whose_process_vanished_is_pruned(tmp_path, capsys):
    uri = seeded_store(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _VANISH, uri], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL
    doomed = proc.stdout.strip()
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(doomed).info.status == "RUNNING"
    assert client.get_run(doomed).data.tags["pid"].isdigit()

    # A RUNNING run of a live process (this one) and one of another host are left alone.
    with start_run(TrackingConfig(uri=uri, experiment="vanish"), "vanish", "alive", {}) as rec:
        alive = rec.run_id
        elsewhere = client.create_run(
            client.get_experiment_by_name("vanish").experiment_id,
            tags=process_tags() | {"host": "another-host", "pid": "1"},
        ).info.run_id
        assert cli.main(["runs", "prune", "--tracking-uri", uri]) == 0
        out = capsys.readouterr().out
        assert doomed in out and alive not in out and elsewhere not in out
        run = client.get_run(doomed)
        assert run.info.status == "FAILED" and run.data.tags[FAILURE_TAG] == VANISHED
        assert client.get_run(alive).info.status == "RUNNING"
        assert client.get_run(elsewhere).info.status == "RUNNING"
    assert client.get_run(alive).info.status == "FINISHED"
    assert prune_vanished(client) == []  # nothing left to prune


def test_a_reused_pid_is_not_the_same_process(tmp_path):
    uri = seeded_store(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("reuse")
    tags = process_tags() | {"process_started": "12345.00"}  # our PID, another start time
    run_id = client.create_run(exp, tags=tags).info.run_id
    assert [r.run_id for r in prune_vanished(client)] == [run_id]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["unwritable", "readonly", "server-down"])
def test_an_unusable_store_is_named_before_any_work(tmp_path, kind):
    if kind == "unwritable":
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("a file where the store's folder should be")
        uri = f"sqlite:///{blocker}/mlflow.db"
    elif kind == "readonly":
        db = tmp_path / "ro.db"
        MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()  # a real store
        uri = f"sqlite:///file:{db}?mode=ro&uri=true"
    else:
        uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(TrackingStoreError, match="MLflow"):
        check_store(uri)
    cpu = child_cpu_seconds()  # work done, not wall time (test workers share the cores)
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            "backbone=clip_tiny",
            f"tracking.uri='{uri}'",
            f"paths.cache_dir={tmp_path}/cache",
            f"hydra.run.dir={tmp_path}/out",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child_cpu_seconds() - cpu < 15
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert uri in line, proc.stderr
    assert not Path(tmp_path / "cache").exists()  # no data, model or export work
