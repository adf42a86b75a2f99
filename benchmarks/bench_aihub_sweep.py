"""Benchmark: a sweep on AI Hub against one config, with every AI Hub job taking a set time.

Run by hand (about 7 minutes)::

    python benchmarks/bench_aihub_sweep.py [--configs 8] [--compile 100] [--profile 40]
        [--inference 40] [--poll 5]

It runs ``python run.py -m`` twice on the test suite's faked AI Hub service
(``tests/aihub_fake.py``: the real ``qai-hub`` client, only its transport faked, served to the
sweep's process over a Unix socket), each time with a store, a cache and a service of its own:

* an ``--configs``-config Track 1 sweep (clip_tiny on 16 demo images, ``seed=0,1,...``: every
  config its own image and text encoder, every config the same inputs), and
* the same with one config (``seed=0``),

where every compile job takes ``--compile`` seconds, profile jobs ``--profile`` and inference jobs
``--inference`` (a fifth of the real service's ~5 / 2 / 2 minutes, so that waiting on the device
dominates each config's local work, as it does for real). Both use the sweep's default launcher
on ``hub=aihub`` (``hydra/launcher=aihub``). It prints each sweep's wall time, jobs, duplicate jobs
(jobs computing what another job already computed), dataset uploads (and their distinct
contents), whether config ``seed=0`` gave identical results (Recall@10 and device latency) in
both, and last::

    <K> configs vs 1: <ratio>x wall, <N> jobs, <D> duplicate jobs, <U> dataset uploads

``--launcher basic`` runs both with Hydra's basic launcher instead: the waits one after another.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from aihub_fake import ENV, FakeAIHub, FakeServer  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

TOKEN = "bench-aihub-token"
SETTINGS = [
    "backbone=clip_tiny",
    "data.demo.num_images=16",
    "export.parity_samples=2",
    "backbone.activation=gelu_sigmoid",  # clip_tiny's exact GELU (Erf) stops a run on hub=aihub
    "hub=aihub",
    "tracking.log_models=false",
]


@dataclass
class Sweep:
    configs: int
    wall_s: float
    jobs: int
    duplicates: int
    uploads: int
    distinct: int
    results: dict[str, dict[str, float]]  # seed -> recall_at_10, latency_ms/total
    failed: int


def run_sweep(seeds: list[int], args: argparse.Namespace, work: Path) -> Sweep:
    fake = FakeAIHub(TOKEN, steps=1)
    fake.durations = {
        "compile": args.compile,
        "profile": args.profile,
        "inference": args.inference,
    }
    server = FakeServer(fake, work)
    store = work / "mlflow.db"
    command = [
        sys.executable,
        "run.py",
        "-m",
        *SETTINGS,
        f"seed={','.join(map(str, seeds))}",
        f"hub.poll_interval_s={args.poll}",
        f"tracking.uri=sqlite:///{store}",
        f"tracking.artifact_root={work}/artifacts",
        f"paths.cache_dir={work}/cache",
        f"hydra.sweep.dir={work}/multirun",
    ]
    if args.launcher != "aihub":
        command.append(f"hydra/launcher={args.launcher}")
    inject = os.pathsep.join(filter(None, [str(REPO / "tests" / "inject"), str(REPO / "src")]))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {
        "PYTHONPATH": os.pathsep.join(filter(None, [inject, os.environ.get("PYTHONPATH")])),
        ENV: server.address,
        "QAI_HUB_API_TOKEN": TOKEN,
        "QAIHUB_CLIENT_INI": str(work / "absent-client.ini"),
    }
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    server.close()
    (work / "sweep.log").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
    if proc.returncode != 0:
        sys.exit(
            f"the sweep failed (exit {proc.returncode}); its output is in {work / 'sweep.log'}:\n"
            + proc.stderr[-3000:]
        )
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    children = [r for r in runs if r.data.tags.get("sweep") != "true"]
    results = {
        r.data.params["seed"]: {
            "recall_at_10": r.data.metrics.get("recall_at_10", float("nan")),
            "latency_ms/total": r.data.metrics.get("latency_ms/total", float("nan")),
        }
        for r in children
        if r.info.status == "FINISHED"
    }
    uploads, distinct = fake.dataset_uploads()
    return Sweep(
        configs=len(seeds),
        wall_s=wall,
        jobs=len(fake.jobs),
        duplicates=fake.duplicate_jobs(),
        uploads=uploads,
        distinct=distinct,
        results=results,
        failed=sum(r.info.status != "FINISHED" for r in children),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=int, default=8)
    parser.add_argument("--compile", type=float, default=100.0, help="seconds per compile job")
    parser.add_argument("--profile", type=float, default=40.0, help="seconds per profile job")
    parser.add_argument("--inference", type=float, default=40.0, help="seconds per inference job")
    parser.add_argument("--poll", type=float, default=5.0, help="hub.poll_interval_s")
    parser.add_argument("--launcher", default="aihub", choices=("aihub", "basic", "joblib"))
    parser.add_argument("--keep", action="store_true", help="keep the work folders")
    args = parser.parse_args()

    sweeps = []
    for seeds in (list(range(args.configs)), [0]):
        work = Path(tempfile.mkdtemp(prefix=f"bench-aihub-sweep-{len(seeds)}-"))
        sweep = run_sweep(seeds, args, work)
        sweeps.append(sweep)
        print(
            f"{sweep.configs} config(s) ({args.launcher} launcher): {sweep.wall_s:.1f} s wall, "
            f"{sweep.jobs} AI Hub jobs, {sweep.duplicates} duplicate, {sweep.uploads} dataset "
            f"uploads ({sweep.distinct} distinct), {sweep.failed} failed run(s)"
            + (f"; work folder {work}" if args.keep else ""),
            flush=True,
        )
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    many, one = sweeps
    same = many.results.get("0") == one.results.get("0") and "0" in one.results
    print(
        f"config seed=0: {'identical' if same else 'DIFFERENT'} results in both sweeps "
        f"({many.results.get('0')} vs {one.results.get('0')})"
    )
    print(
        f"{many.configs} configs vs 1: {many.wall_s / one.wall_s:.2f}x wall, {many.jobs} jobs, "
        f"{many.duplicates} duplicate jobs, {many.uploads} dataset uploads"
    )


if __name__ == "__main__":
    main()
