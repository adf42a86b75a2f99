"""The stage cache: content keys, per-stage reuse, provenance tags, and a real second run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from lpcvlab_runs import TINY, all_runs, explain, run_py, store_overrides

from lpcvlab.config import load_settings
from lpcvlab.config.schema import CacheConfig
from lpcvlab.errors import ConfigError, ParityError
from lpcvlab.hubs import ComponentJob, SequentialHub
from lpcvlab.hubs.cache import (
    CachedHub,
    RecordStore,
    StageCache,
    export_key,
    runtime_key,
)
from lpcvlab.types import (
    CompileResult,
    Component,
    ExportResult,
    InferenceResult,
    ProfileResult,
    TensorSpec,
)
from lpcvlab.util.hashing import array_sha256, state_dict_digest

SPEC = TensorSpec("x", (1, 4), "float32")


def _identity(**hub):
    return {
        "hub": {"name": "local", "profile_iterations": 2, "api_token": "s3cret", **hub},
        "device": "host_cpu",
        "runtime": "onnx",
    }


class FakeHub(SequentialHub):
    """Records which stages ran; outputs depend on the inputs so that reuse is checkable."""

    name = "fake"

    def __init__(self, **hub) -> None:
        self.calls: list[tuple[str, str]] = []
        self._identity = _identity(**hub)

    def identity(self):
        return self._identity

    def compile(self, exported: ExportResult) -> CompileResult:
        self.calls.append(("compile", exported.component))
        return CompileResult(
            exported.component,
            "fake-rt",
            "dev",
            object(),
            exported,
            job_id="c-" + exported.component,
        )

    def profile(self, compiled: CompileResult) -> ProfileResult:
        self.calls.append(("profile", compiled.component))
        raw = {"execution_summary": {"estimated_inference_time": 1500}}
        return ProfileResult(compiled.component, 1.5, (1.0, 2.0), {"CPU": 3}, raw, job_id="p-1")

    def infer(self, compiled: CompileResult, inputs: np.ndarray) -> InferenceResult:
        self.calls.append(("infer", compiled.component))
        out = inputs.sum(axis=1, keepdims=True).astype(np.float32) * 2
        return InferenceResult(compiled.component, out, 0.25, metrics={"device_cos": 0.99})


class NoHub(FakeHub):
    def run_components(self, jobs):
        raise AssertionError("a fully cached run must not ask the hub for anything")


def _export(tmp: Path, name: str, sha: str = "ab" * 32) -> ExportResult:
    path = tmp / f"{name}.onnx"
    path.write_bytes(b"onnx " + name.encode())
    return ExportResult(name, path, sha, SPEC, "output_0", 1.0, 2, 0.5)


def _jobs(tmp: Path, inputs: np.ndarray) -> list[ComponentJob]:
    return [
        ComponentJob(_export(tmp, "a", "aa" * 32), inputs),
        ComponentJob(_export(tmp, "b"), inputs),
    ]


def test_runtime_stages_are_reused_per_component_and_stage(tmp_path):
    store = RecordStore(tmp_path / "stages")
    inputs = np.arange(12, dtype=np.float32).reshape(3, 4)

    first_hub = FakeHub()
    first = CachedHub(first_hub, StageCache(store, "run-1")).run_components(_jobs(tmp_path, inputs))
    assert sorted(first_hub.calls) == sorted(
        (s, c) for s in ("compile", "profile", "infer") for c in ("a", "b")
    )

    events = []
    cache = StageCache(store, "run-2", job_listener=events.append)
    again = CachedHub(NoHub(), cache).run_components(_jobs(tmp_path, inputs))
    for name in ("a", "b"):
        np.testing.assert_array_equal(again[name].inference.outputs, first[name].inference.outputs)
        assert again[name].profile.latency_ms == 1.5
        assert again[name].profile.peak_memory_mb == (1.0, 2.0)
        assert again[name].inference.metrics == {"device_cos": 0.99}
        assert again[name].compiled.job_id == f"c-{name}" and again[name].compiled.handle is None
    tags = cache.tags()
    for stage in ("compile", "profile", "inference"):
        assert tags[f"cache/a/{stage}_from"] == "run-1"
    assert tags["cache/hits"] == "6"
    assert {(e.component, e.kind, e.status) for e in events} >= {("a", "compile", "CACHED")}

    # Not allowed to reuse profiles: re-measure them, keep the cached outputs.
    hub = FakeHub()
    CachedHub(hub, StageCache(store, "run-3", frozenset({"compile", "inference"}))).run_components(
        _jobs(tmp_path, inputs)
    )
    assert sorted(hub.calls) == [
        ("compile", "a"),
        ("compile", "b"),
        ("profile", "a"),
        ("profile", "b"),
    ]

    # New inputs: the profile is still valid, inference is not.
    hub = FakeHub()
    other = CachedHub(hub, StageCache(store, "run-4")).run_components(_jobs(tmp_path, inputs + 1))
    assert sorted(hub.calls) == [("compile", "a"), ("compile", "b"), ("infer", "a"), ("infer", "b")]
    assert other["a"].inference.outputs[0, 0] == first["a"].inference.outputs[0, 0] + 8

    # Another hub setting is another key: everything runs again.
    hub = FakeHub(profile_iterations=3)
    CachedHub(hub, StageCache(store, "run-5")).run_components(_jobs(tmp_path, inputs))
    assert len(hub.calls) == 6


def test_a_hub_that_records_its_own_jobs_is_not_wrapped(tmp_path):
    hub = FakeHub()
    hub.records_jobs = True  # the AI Hub ledger: the one store of paid remote jobs
    cache = StageCache(RecordStore(tmp_path / "stages"), "run-1")
    assert cache.wrap(hub) is hub
    assert isinstance(cache.wrap(FakeHub()), CachedHub)
    assert StageCache(None, "run-1").wrap(FakeHub()).__class__ is FakeHub


def test_runtime_key_ignores_secrets_but_not_settings():
    module = "lpcvlab.hubs.local"
    base = runtime_key("ab" * 32, _identity(), module)
    assert runtime_key("ab" * 32, _identity(api_token="other"), module) == base
    assert runtime_key("ab" * 32, _identity(profile_iterations=5), module) != base
    assert runtime_key("cd" * 32, _identity(), module) != base
    assert runtime_key("ab" * 32, _identity(), "lpcvlab.hubs.base") != base


def _component() -> Component:
    torch.manual_seed(0)
    return Component("enc", torch.nn.Linear(4, 3), SPEC)


def test_export_is_reused_until_weights_change_and_parity_is_rechecked(tmp_path):
    store = RecordStore(tmp_path / "stages")
    comp, samples = _component(), np.ones((2, 4), dtype=np.float32)
    made: list[ExportResult] = []

    def compute() -> ExportResult:
        made.append(_export(tmp_path, f"enc{len(made)}"))
        return made[-1]

    first = StageCache(store, "run-1").export(comp, samples, 18, 0.999, compute)
    cache = StageCache(store, "run-2")
    again = cache.export(comp, samples, 18, 0.999, compute)
    assert len(made) == 1 and again.path == first.path and again.sha256 == first.sha256
    assert cache.tags()["cache/enc/export_from"] == "run-1"

    with pytest.raises(ParityError, match="run-1"):  # a stricter threshold fails from the record
        StageCache(store, "run-3").export(comp, samples, 18, 1.5, compute)
    StageCache(store, "run-4").export(comp, samples, 17, 0.999, compute)  # another opset
    assert len(made) == 2
    with torch.no_grad():
        comp.module.weight[0, 0] += 1.0
    StageCache(store, "run-5").export(comp, samples, 18, 0.999, compute)
    assert len(made) == 3
    made[-1].path.unlink()  # the file is gone: export again
    StageCache(store, "run-6").export(comp, samples, 18, 0.999, compute)
    assert len(made) == 4


def test_content_digests_see_weights_dtypes_and_samples():
    comp = _component()
    key = export_key(comp, np.ones((2, 4), dtype=np.float32), 18)
    assert export_key(_component(), np.ones((2, 4), dtype=np.float32), 18) == key
    assert export_key(comp, np.zeros((2, 4), dtype=np.float32), 18) != key
    digest = state_dict_digest(comp.module)
    comp.module.half()
    assert state_dict_digest(comp.module) != digest
    a = np.arange(6, dtype=np.int64)
    assert array_sha256(a) != array_sha256(a.astype(np.int32))
    assert array_sha256(a) != array_sha256(a.reshape(2, 3))


def test_cache_config_is_checked():
    off = StageCache.from_settings(CacheConfig(enabled=False, dir="/tmp/x"), "r")
    assert not off.enabled and off.tags() == {}
    with pytest.raises(ConfigError, match="exprot"):
        load_settings(compose_config("cache.stages=[exprot]"))


@pytest.mark.slow
def test_second_identical_run_reuses_every_stage_and_logs_the_same_metrics(tmp_path):
    args = [*TINY, *store_overrides(tmp_path)]
    first_proc = run_py(*args)
    assert first_proc.returncode == 0, explain(first_proc)
    second_proc = run_py(*args)
    assert second_proc.returncode == 0, explain(second_proc)
    first, second = sorted(all_runs(tmp_path), key=lambda r: r.start_time)
    assert "==> cache: reused" in second_proc.stderr and first.run_id in second_proc.stderr

    for comp in ("image_encoder", "text_encoder"):
        for stage in ("export", "compile", "profile", "inference"):
            assert second.tags[f"cache/{comp}/{stage}_from"] == first.run_id
            assert f"cache/{comp}/{stage}_from" not in first.tags
    assert second.tags["cache/hits"] == "8" and first.tags["cache/hits"] == "0"
    same = [m for m in first.metrics if not m.startswith("stage_seconds/")]
    assert {m: second.metrics[m] for m in same} == {m: first.metrics[m] for m in same}
    assert "latency_ms/image_encoder" in same and "recall_at_10" in same
    # Export, profiling and inference are skipped: the stages take a fraction of the time.
    ratio = first.metrics["stage_seconds/total"] / second.metrics["stage_seconds/total"]
    assert ratio > 2.0, ratio
