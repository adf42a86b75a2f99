"""The whole Track 1 pipeline with clip_tiny on demo data, checked in the MLflow store."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, tiny_overrides
from mlflow.tracking import MlflowClient

from lpcvlab import pipeline
from lpcvlab.errors import DataError


def _client(cfg) -> MlflowClient:
    return MlflowClient(tracking_uri=cfg.tracking.uri)


@pytest.mark.slow
def test_track1_pipeline_logs_one_complete_run(cfg_factory, tmp_path, capsys):
    cfg = cfg_factory()
    res = pipeline.run(cfg, work_dir=tmp_path / "work")
    run = _client(cfg).get_run(res.run_id)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    for key in ("recall_at_10", "recall_at_5", "recall_at_1", "hit_at_10"):
        assert 0.0 <= m[key] <= 1.0
    assert m["recall_at_10"] == pytest.approx(res.metrics["recall_at_10"])
    assert m["best_achievable_recall_at_10"] < 1.0  # the demo has an ID without a caption
    for comp in ("image_encoder", "text_encoder"):
        assert m[f"latency_ms/{comp}"] > 0
        assert m[f"peak_memory_mb/{comp}"] >= 0
        assert m[f"parity_cosine_min/{comp}"] >= 0.999
    # Counts that never change during a run are params, so the charts open on measurements.
    assert run.data.params["data/images"] == "12" and "data/images" not in m
    assert any(k.startswith("compute_units/image_encoder/") for k in run.data.params)
    assert not any(k.startswith(("compute_units/", "onnx_ops/")) for k in m), sorted(m)
    t = run.data.tags
    assert t["track"] == "retrieval" and t["backbone"] == "clip_tiny"
    assert t["device"] == "xr2_gen2_proxy" and t["runtime"] == "qnn_dlc" and t["hub"] == "local"
    assert t["weights"] == "random"
    # The model as loaded against open_clip's own code, and what the weights run with.
    for comp in ("image_encoder", "text_encoder"):
        assert m[f"reference_cosine_min/{comp}"] >= 0.9999
    assert "create_model_and_transforms" in t["reference"]
    assert t["weights/activation"] == run.data.params["weights/activation"] == "gelu"
    assert run.data.params["normalization"] == "none"  # random clip_tiny: none of its own
    assert m["stage_seconds/reference"] > 0
    assert t["git_dirty"] in ("true", "false", "unknown")
    assert len(t["onnx_sha256/image_encoder"]) == 64
    assert run.data.params["backbone.name"] == "clip_tiny"
    assert run.data.params["export.parity_threshold"] == "0.999"
    arts = {a.path for a in _client(cfg).list_artifacts(res.run_id)}
    assert {"config.yaml", "profiles", "results"} <= arts
    results = {a.path for a in _client(cfg).list_artifacts(res.run_id, "results")}
    assert {"results/per_image_results.csv", "results/embeddings.h5"} <= results
    client = _client(cfg)
    local = client.download_artifacts(res.run_id, "profiles/image_encoder.json", str(tmp_path))
    prof = json.loads(open(local).read())
    assert prof["execution_summary"]["estimated_inference_time"] > 0
    out = capsys.readouterr().out
    assert "recall_at_10" in out and res.run_id in out and "mlflow ui" in out


@pytest.mark.slow
def test_failed_run_is_marked_failed_with_its_error(cfg_factory, tmp_path):
    cfg = cfg_factory("data=lpcvc_track1", f"data.root={tmp_path}/nowhere", demo=False)
    with pytest.raises(DataError, match="nowhere"):
        pipeline.run(cfg, work_dir=tmp_path / "work")
    client = _client(cfg)
    exp = client.get_experiment_by_name("lpcvc-retrieval")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"
    assert "nowhere" in run.data.tags["error"]
    assert run.data.params["data.name"] == "lpcvc_track1"  # what it had is kept
    assert "error.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_run_py_reports_user_errors_without_traceback(tmp_path):
    """A config mistake of `python run.py` (stopped at the config check: not slow)."""
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            "data=lpcvc_track1",
            *tiny_overrides(tmp_path, demo=False),
            f"hydra.run.dir={tmp_path}/out",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "error: data=lpcvc_track1 needs data.root=" in proc.stderr
    assert "Traceback" not in proc.stderr
