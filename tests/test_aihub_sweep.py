"""Sweeps on AI Hub: one job per identity across processes, datasets uploaded once, device
outputs kept, and a sweep on the faked service stopped and resumed (the ``aihub`` launcher)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aihub_fake
import pytest
from aihub_fake import FakeAIHub, FakeServer
from filelock import Timeout
from lpcvlab_runs import REPO, TINY, explain, seeded_store
from mlflow.tracking import MlflowClient
from test_aihub import (  # noqa: F401  (the fixture)
    TOKEN,
    fake,
    hub_with_events,
    image_encoder,
    image_inputs,
    models,
    statuses,
    text_inputs,
)

from lpcvlab.hubs import ComponentJob
from lpcvlab.hubs.aihub.jobs import DatasetRecord, DatasetRecords, JobLedger, dataset_key
from lpcvlab.util.hashing import array_sha256
from lpcvlab.util.io import file_lock

pytestmark = pytest.mark.hub
TESTS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- claims


def test_a_claimed_key_is_held_against_another_holder(tmp_path: Path) -> None:
    """The claim is an OS file lock: a second holder (another process; here another lock on the
    same file) waits until the first has recorded its job."""
    ledger = JobLedger(tmp_path / "aihub_ledger.jsonl")
    lock = tmp_path / "aihub_ledger.jsonl.claims" / "k1"
    with ledger.claim("k1"):
        with pytest.raises(Timeout), file_lock(lock, timeout=0.1):
            pass
        with file_lock(tmp_path / "aihub_ledger.jsonl.claims" / "k2", timeout=0.1):
            pass  # another key is free
    with file_lock(lock, timeout=0.1):
        pass  # released


_RACER = """
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import aihub_fake
aihub_fake.connect(os.environ[aihub_fake.ENV])
import test_aihub as t
from lpcvlab.hubs import ComponentJob

root, me = Path(sys.argv[1]), sys.argv[2]
(root / me).mkdir()
exported = t.text_encoder(root / me)  # the same bytes in each process: the same job
hub, events = t.hub_with_events(root, poll_interval_s=0.1)
ready = root / "ready"
ready.mkdir(exist_ok=True)
(ready / me).touch()
while len(list(ready.iterdir())) < 2:  # both start at the same moment
    time.sleep(0.01)
run = hub.run_components([ComponentJob(exported, t.text_inputs(3))])["text_encoder"]
print(json.dumps({{
    "compile": run.compiled.job_id, "profile": run.profile.job_id,
    "inference": run.inference.job_id,
    "events": [[e.kind, e.status] for e in events],
}}))
"""


@pytest.mark.slow  # two processes importing the AI Hub client and ONNX Runtime: ~10 s of CPU
def test_two_processes_needing_the_same_component_at_once_pay_for_one_job_each(
    tmp_path: Path,
) -> None:
    """Two processes (two sweep jobs, a joblib or SLURM sweep) need the same text encoder at the
    same moment, on a service slow to take the upload: one compile, one profile and one
    inference job in all, and both get their results."""
    service = FakeAIHub(TOKEN)
    service.delays = {"POST models": 1.0}  # both would look the job up before either records it
    server = FakeServer(service, tmp_path)
    env = os.environ | {
        aihub_fake.ENV: server.address,
        "QAI_HUB_API_TOKEN": TOKEN,
        "QAIHUB_CLIENT_INI": str(tmp_path / "absent-client.ini"),
    }
    script = _RACER.format(tests=str(TESTS))
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(tmp_path), name],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in ("a", "b")
        ]
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        server.close()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert len(service.jobs_of("compile")) == 1
    assert len(service.jobs_of("inference", profiling=True)) == 1
    assert len(service.jobs_of("inference", profiling=False)) == 1
    assert service.duplicate_jobs() == 0
    assert service.dataset_uploads() == (1, 1)
    for kind in ("compile", "profile", "inference"):
        assert got[0][kind] == got[1][kind], kind
    compile_events = [[s for k, s in g["events"] if k == "compile"] for g in got]
    assert sorted(e[0] for e in compile_events) == ["RESUMED", "SUBMITTED"]


# --------------------------------------------------------------------------- datasets, outputs


def test_two_models_on_the_same_inputs_upload_them_once(
    fake: FakeAIHub,  # noqa: F811
    models,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Two configs of a sweep (two runs) with other models on the same inputs: one upload,
    recorded beside the ledger under the arrays' content hash."""
    (tmp_path / "other").mkdir()
    other = image_encoder(tmp_path / "other", external=False)  # other bytes: another model
    inputs = image_inputs(4)
    first, _ = hub_with_events(tmp_path)
    first.run_components([ComponentJob(models["image_encoder"], inputs)])
    second, _ = hub_with_events(tmp_path)
    second.run_components([ComponentJob(other, inputs)])
    assert len(fake.jobs_of("inference", profiling=False)) == 2
    assert fake.dataset_uploads() == (1, 1)
    records = DatasetRecords(tmp_path / "cache" / "aihub_datasets.jsonl")
    (line,) = [json.loads(x) for x in records.path.read_text().splitlines()]
    assert line["samples"] == 4 and line["input_name"] == "image"
    key = dataset_key("image", array_sha256(inputs), first.client.config.api_url)
    assert line["key"] == key and records.latest(key).dataset_id == line["dataset_id"]
    assert dataset_key("pixels", array_sha256(inputs), first.client.config.api_url) != key


def test_an_expired_dataset_goes_up_again_once(fake: FakeAIHub, tmp_path: Path) -> None:  # noqa: F811
    hub, _ = hub_with_events(tmp_path)
    batch = text_inputs(2).astype("int32")
    made = hub._stages._dataset("text_encoder", "t", "text", batch)
    assert hub._stages._dataset("text_encoder", "t", "text", batch).dataset_id == made.dataset_id
    assert fake.dataset_uploads() == (1, 1)
    fake.expired.add(made.dataset_id)  # AI Hub deletes datasets after 30 days
    again = hub._stages._dataset("text_encoder", "t", "text", batch)
    assert again.dataset_id != made.dataset_id
    assert hub._stages._dataset("text_encoder", "t", "text", batch).dataset_id == again.dataset_id
    assert fake.dataset_uploads() == (2, 1)  # once more, the same arrays


def test_a_dataset_about_to_expire_is_not_reused(fake: FakeAIHub, tmp_path: Path) -> None:  # noqa: F811
    """A recorded dataset AI Hub deletes within the day is uploaded again: a job on it could
    outlive it."""
    hub, _ = hub_with_events(tmp_path)
    made = hub._stages._dataset("text_encoder", "t", "text", text_inputs(2).astype("int32"))

    class Soon:
        dataset_id = made.dataset_id
        expiration_time = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)

        def is_expired(self) -> bool:
            return False

    hub._stages.client.get_dataset = lambda dataset_id: Soon()  # type: ignore[method-assign]
    record = DatasetRecord("k", made.dataset_id, "t", "text", 2, "x", "u")
    assert hub._stages._live_dataset(record) is None
    Soon.expiration_time += dt.timedelta(days=2)
    assert hub._stages._live_dataset(record) is not None


# --------------------------------------------------------------------------- a sweep, stopped


def _sweep_env(server: FakeServer, tmp: Path) -> dict[str, str]:
    inject = str(TESTS / "inject")
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",)} | {
        "PYTHONPATH": os.pathsep.join(filter(None, [inject, os.environ.get("PYTHONPATH")])),
        aihub_fake.ENV: server.address,
        "QAI_HUB_API_TOKEN": TOKEN,
        "QAIHUB_CLIENT_INI": str(tmp / "absent-client.ini"),
    }


def _sweep_args(tmp: Path) -> list[str]:
    return [
        "-m",
        *[o for o in TINY if not o.startswith("hub.")],  # hub=local's settings
        "seed=0,1",
        "hub=aihub",
        "hub.poll_interval_s=0.2",
        "backbone.activation=gelu_sigmoid",  # Erf is a device hazard on hub=aihub
        "tracking.log_models=false",
        f"tracking.uri={seeded_store(tmp)}",
        f"tracking.artifact_root={tmp}/artifacts",
        f"paths.cache_dir={tmp}/cache",
        f"hydra.sweep.dir={tmp}/multirun",
    ]


def _runs(tmp: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("sweep") != "true"]
    return parents, children


@pytest.mark.slow
def test_a_sweep_on_aihub_stopped_while_waiting_ends_killed_and_resumes_its_jobs(
    tmp_path: Path,
) -> None:
    """Two configs submit their jobs, then wait on them together (the ``aihub`` launcher, the
    default of a multirun on hub=aihub); SIGTERM while they wait: exit 143, one paragraph and no
    traceback, both children KILLED, the parent KILLED with a summary. The same command again
    picks the jobs up from the ledger (no new compile job); a job that fails then fails its own
    config only."""
    service = FakeAIHub(TOKEN)
    service.hold = True  # a slow queue: nothing finishes
    server = FakeServer(service, tmp_path)
    try:
        env = _sweep_env(server, tmp_path)
        log = open(tmp_path / "sweep.out", "w+")
        proc = subprocess.Popen(
            [sys.executable, "run.py", *_sweep_args(tmp_path)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 400
        while len(service.jobs_of("compile")) < 4:  # both configs' encoders are in flight
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the sweep never submitted its compile jobs"
            time.sleep(0.5)
        time.sleep(1.0)  # polling them together
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        paragraph = err.strip().splitlines()[-1]
        assert paragraph.startswith("Stopped by SIGTERM. Sweep parent run"), err[-2000:]
        assert "0 of 2 job(s) finished" in paragraph and "0 never started" in paragraph
        assert "#0 (" in paragraph and "#1 (" in paragraph and "AI Hub job ledger" in paragraph
        assert "python run.py -m" in paragraph  # how to resume
        (parent,), children = _runs(tmp_path)
        assert parent.info.status == "KILLED"
        assert "Stopped by SIGTERM" in parent.data.tags["mlflow.note.content"]
        assert [c.info.status for c in children] == ["KILLED", "KILLED"]
        assert {c.data.tags["error"] for c in children} == {"interrupted (SIGTERM)"}
        compiles = len(service.jobs_of("compile"))
        killed = {c.data.tags["sweep_job"]: c.data.tags for c in children}

        # Again: config #1's image encoder compile job fails on the service this time.
        doomed = killed["1"]["aihub/image_encoder/compile_job"]
        service.failing_jobs[doomed] = "Failed to compile: an injected failure"
        service.hold = False
        again = subprocess.run(
            [sys.executable, "run.py", *_sweep_args(tmp_path)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert again.returncode == 1, explain(again)  # sweep.fail_on=any: a job failed
        assert "1 of 2 sweep job(s) failed" in again.stderr, explain(again)
    finally:
        server.close()
    assert len(service.jobs_of("compile")) == compiles  # resumed, not paid again
    assert service.duplicate_jobs() == 0
    parents, children = _runs(tmp_path)
    (resumed,) = [p for p in parents if p.info.status == "FINISHED"]
    assert resumed.data.tags["launcher"].endswith("AIHubLauncher")
    now = {c.data.tags["sweep_job"]: c for c in children if c.info.status != "KILLED"}
    # The failure stays with its config; the other one finishes with the jobs it had submitted.
    assert now["1"].info.status == "FAILED" and doomed in now["1"].data.tags["error"]
    assert now["0"].info.status == "FINISHED"
    for comp in ("image_encoder", "text_encoder"):
        job = now["0"].data.tags[f"aihub/{comp}/compile_job"]
        assert job == killed["0"][f"aihub/{comp}/compile_job"]  # picked up from the ledger
    assert "recall_at_10" in now["0"].data.metrics and now["0"].data.metrics["latency_ms/total"] > 0
    assert resumed.data.tags["best_run_id"] == now["0"].info.run_id
