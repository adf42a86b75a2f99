"""Runs always end: SIGTERM like Ctrl-C, vanished processes pruned, unusable stores named early."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from lpcvlab_runs import REPO, TINY, all_runs, child_cpu_seconds, seeded_store, store_overrides
from mlflow.tracking import MlflowClient

from lpcvlab import cli
from lpcvlab.config.schema import TrackingConfig
from lpcvlab.errors import TrackingStoreError
from lpcvlab.tracking.recorder import start_run
from lpcvlab.tracking.store import FAILURE_TAG, VANISHED, check_store, process_tags, prune_vanished


def _run_py(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen(
        [sys.executable, "run.py", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env | (env_extra or {}),
    )


@pytest.mark.slow
def test_sigterm_during_export_ends_the_run_killed_and_cleans_up(tmp_path):
    """The export is held once torch has written the graph into its temporary folder
    (tests/inject/sitecustomize.py), so the signal arrives during the export: the folder exists
    when it is sent, and no export finished."""
    held = tmp_path / "export-in-progress"
    inject = str(Path(__file__).resolve().parent / "inject")
    proc = _run_py(
        *TINY,
        *store_overrides(tmp_path),
        env_extra={
            "PYTHONPATH": os.pathsep.join(filter(None, [inject, os.environ.get("PYTHONPATH")])),
            "LPCVLAB_TEST_HOLD_EXPORT": str(held),
        },
    )
    out_lines: list[str] = []  # the job log (Hydra's console handler writes to stdout)
    err_lines: list[str] = []  # the stage lines (==> ...) and the interruption's paragraph
    readers = [  # both pipes drained, so the run never blocks on them
        threading.Thread(target=lambda: out_lines.extend(proc.stdout or []), daemon=True),
        threading.Thread(target=lambda: err_lines.extend(proc.stderr or []), daemon=True),
    ]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 240
    while not held.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.exists(), "".join(err_lines)[-3000:]
    export_dir = Path(held.read_text())
    assert export_dir.name.startswith(".export-") and export_dir.is_dir()  # mid-export
    proc.send_signal(signal.SIGTERM)  # as `timeout`, `docker stop` and SLURM do
    proc.wait(timeout=120)
    for reader in readers:
        reader.join(timeout=10)
    stderr, stdout = "".join(err_lines), "".join(out_lines)

    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "Stopped by SIGTERM" in stderr and "KILLED" in stderr
    stages = [line for line in stderr.splitlines() if line.startswith("==> ")]
    assert stages[-1].startswith("==> export"), stages  # the last stage begun, and none after
    assert "exporting image_encoder to ONNX" in stdout
    for name in ("image_encoder", "text_encoder"):  # the held export never finished, nor
        assert f"exported {name} in" not in stdout  # did another
    (run,) = all_runs(tmp_path)
    assert run.status == "KILLED"
    assert run.tags["error"] == "interrupted (SIGTERM)"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert "run.log" in {a.path for a in client.list_artifacts(run.run_id)}  # the job log
    assert not export_dir.exists()  # the interrupted export's temporary folder is gone
    onnx_dir = export_dir.parent
    assert not [p.name for p in onnx_dir.iterdir() if p.name.startswith(".export-")]
    assert not list(onnx_dir.glob("*.onnx"))  # nothing half-exported was kept


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


@pytest.mark.slow  # `python run.py` past the config check: the pipeline is imported, then stops
@pytest.mark.parametrize("kind", ["unwritable", "readonly", "server-down"])
def test_an_unusable_store_is_named_before_any_work(tmp_path, kind):
    if kind == "unwritable":
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("a file where the store's folder should be")
        uri = f"sqlite:///{blocker}/mlflow.db"
    elif kind == "readonly":
        db = tmp_path / "ro.db"
        seeded_store(tmp_path, db.name)  # a real store
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
