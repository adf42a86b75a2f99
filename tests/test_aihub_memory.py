"""Memory on long AI Hub inference: flat in the number of chunks, temporary files cleaned, at most
``hub.inference_window`` chunks in flight (the real qai-hub client over the faked transport)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from aihub_fake import FakeAIHub, without_backoff_sleeps
from test_aihub import fake, make_hub, models  # noqa: F401  (fixtures)

pytestmark = pytest.mark.hub

TESTS = Path(__file__).resolve().parent
SHAPE = (1, 3, 16, 112, 112)  # a Track 2 clip: 2.4 MB of float32
PER_CHUNK = 12


class LazyClips:
    """Clips made on demand, a chunk at a time (as Track 2's CachedClips reads them from disk)."""

    def __init__(self, n: int, shape: tuple[int, ...] = SHAPE) -> None:
        self.n, self.ndim = n, len(shape)
        self.shape = (n, *shape[1:])
        self.dtype = np.dtype("float32")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: slice) -> np.ndarray:
        rows = range(*index.indices(self.n))
        out = np.empty((len(rows), *self.shape[1:]), np.float32)
        for k, i in enumerate(rows):
            out[k] = np.random.default_rng(i).random(self.shape[1:], dtype=np.float32)
        return out


def peak_rss_mb(chunks: int, tmp: Path) -> float:
    """Peak RSS of a fresh process that compiles a clip model and runs ``chunks`` chunks."""
    script = f"""
import json, resource, sys
sys.path.insert(0, {str(TESTS)!r})
import test_aihub_memory as m
print(json.dumps(m.run_chunks({chunks}, {str(tmp)!r})))
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    *_, result, peak = out.stdout.strip().splitlines()
    assert json.loads(result) == {"chunks": chunks, "outputs": chunks * PER_CHUNK}
    return float(peak)


def run_chunks(chunks: int, tmp: str) -> dict[str, int]:
    """In the child: the fake service (storage on disk), one compile, ``chunks`` inference jobs."""
    from onnx import TensorProto, helper
    from test_aihub import TOKEN, _export

    from lpcvlab.types import TensorSpec

    work = Path(tmp) / f"c{chunks}"
    work.mkdir(parents=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("QAI_HUB_API_TOKEN", TOKEN)
    patch.setenv("QAIHUB_CLIENT_INI", str(work / "absent-client.ini"))
    without_backoff_sleeps(patch)
    service = FakeAIHub(TOKEN, steps=1, storage=work / "service")
    service.install(patch)
    spec = TensorSpec("clip", SHAPE, "float32")
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["clip"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["output_0"], axis=1),
        ],
        "clip_model",
        [helper.make_tensor_value_info("clip", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, (1, 3))],
    )
    exported = _export(work / "clip_model.onnx", graph, spec, "output_0")
    sample = int(np.prod(SHAPE)) * 4
    hub = make_hub(work, chunk_bytes=PER_CHUNK * sample, parity_samples=1, inference_window=2)
    result = hub.infer(hub.compile(exported), LazyClips(chunks * PER_CHUNK))
    jobs = service.jobs_of("inference")
    return {"chunks": len(jobs), "outputs": len(result.outputs)}


@pytest.mark.slow
def test_peak_memory_is_flat_in_the_number_of_chunks(tmp_path: Path) -> None:
    two = peak_rss_mb(2, tmp_path)
    eight = peak_rss_mb(8, tmp_path)
    # 8 chunks are 6 x 29 MB more inputs than 2: kept alive, they would show as +170 MB.
    assert eight <= 1.2 * two, (two, eight)


def test_at_most_the_window_is_in_flight_and_temp_files_go(
    fake: FakeAIHub,  # noqa: F811
    models,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    sample_bytes = 3 * 8 * 8 * 4
    hub = make_hub(tmp_path, chunk_bytes=2 * sample_bytes, inference_window=2)
    exported = models["image_encoder"]
    compiled = hub.compile(exported)
    inputs = np.random.default_rng(3).random((11, 3, 8, 8), dtype=np.float32)
    result = hub.infer(compiled, inputs)
    chunks = sorted(fake.jobs_of("inference", profiling=False), key=lambda j: j.created_seq)
    assert len(chunks) == 6 and result.outputs.shape[0] == 11
    for i, job in enumerate(chunks[2:], start=2):
        # chunk i was created after chunk i-2 finished: never more than 2 in flight
        assert chunks[i - 2].done_seq is not None and job.created_seq > chunks[i - 2].done_seq
    # No h5 file of inputs or outputs is left behind; what remains is the client's own empty
    # staging folder of the model upload (one per model, not per chunk).
    left = [p.name for p in scratch.iterdir()]
    assert all(name.endswith(".onnx") for name in left) and len(left) <= 1, left


@pytest.mark.parametrize("credentials", [False, True], ids=["presigned", "s3_credentials"])
def test_a_failed_upload_leaves_no_temp_file(
    fake: FakeAIHub,  # noqa: F811
    models,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    credentials: bool,
) -> None:
    from lpcvlab.errors import RuntimeStageError

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    # torch makes its compile cache in the temporary folder when torch._dynamo is first
    # imported (here, when this test runs alone): not a file of the upload's
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torchinductor"))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    fake.offer_credentials = credentials
    hub = make_hub(tmp_path)
    compiled = hub.compile(models["image_encoder"])
    # the storage upload of the dataset: a form POST to a pre-signed URL, or boto3's PUT
    upload = lambda m, p: m in ("POST", "PUT") and p.startswith("/datasets")  # noqa: E731
    # 503 is retried by the client's urllib3; boto3 would back off for seconds, so 400 there
    fake.fail_requests(upload, times=99, failure=400 if credentials else 503)
    with pytest.raises(RuntimeStageError, match="uploading the inputs"):
        hub.infer(compiled, np.zeros((2, 3, 8, 8), np.float32))
    # The inputs' h5 file went with lpcvlab's folder; the client's own placeholder (it makes an
    # empty temporary file even for an upload by path, and removes it only on success) is empty.
    left = [p for p in scratch.iterdir() if not p.name.endswith(".onnx")]  # model staging
    assert all(p.is_file() and p.stat().st_size == 0 for p in left), left
    assert left or credentials  # the pre-signed path's placeholder is the client's
