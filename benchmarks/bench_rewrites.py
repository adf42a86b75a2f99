"""Benchmark: local (ONNX Runtime, CPU) latency of the NPU-rewritten graph vs the plain export.

Run by hand::

    python benchmarks/bench_rewrites.py [--backbone clip_tiny] [--iterations 200] [--repeat 3]
        [--rewrites matmul_conv1x1,fold_attention_scale,drop_transposes] [--threads 1]

It builds the backbone's two encoders as a run would (``conf/backbone/<name>.yaml``, random
weights unless the config names cached ones), exports each once, applies ``--rewrites`` to a copy,
and times both graphs in the same process, alternating plain / rewritten ``--repeat`` times
(median of ``--iterations`` single-sample runs each; the best repeat counts, the machine may be
shared). Outputs are compared on the same random inputs.

These rewrites target the NPU (1x1 convolutions in channels-first layout, fewer Transposes and
Muls for the Hexagon tensor processor); a host CPU may gain nothing or lose a little, and the
numbers below say which. The last line gives each component's speed-up (plain / rewritten) and
whether the outputs were identical (bitwise) or only equal up to float rounding (min cosine).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from hydra import compose, initialize_config_dir

from lpcvlab.config import load_settings
from lpcvlab.deploy.export import export_onnx
from lpcvlab.deploy.rewrites import op_counts, rewritten
from lpcvlab.metrics import cosine_per_sample
from lpcvlab.tracks import build_track

CONF = Path(__file__).resolve().parent.parent / "conf"


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def median_ms(sess: ort.InferenceSession, feed: dict, iterations: int) -> float:
    for _ in range(5):
        sess.run(None, feed)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def sample(spec, rng: np.random.Generator) -> np.ndarray:
    if spec.dtype == "int64":
        x = np.zeros(spec.shape, dtype=np.int64)
        x[0, 0], x[0, 1:12], x[0, 12] = 49406, rng.integers(1, 49000, 11), 49407
        return x
    return rng.random(spec.shape, dtype=np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="clip_tiny")
    p.add_argument("--rewrites", default="matmul_conv1x1,fold_attention_scale,drop_transposes")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    names = [r for r in args.rewrites.split(",") if r]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"backbone={args.backbone}"])
    bundle = build_track(load_settings(cfg)).build_model()
    rng = np.random.default_rng(0)
    summary, identical_all = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for comp in bundle.components:
            path, _ = export_onnx(comp, Path(tmp))
            plain = onnx.load(str(path))
            graph, sites = rewritten(plain, names)
            feeds = [{comp.input.name: sample(comp.input, rng)} for _ in range(8)]
            s_plain, s_new = session(plain, args.threads), session(graph, args.threads)
            ref = np.concatenate([s_plain.run(None, f)[0] for f in feeds])
            out = np.concatenate([s_new.run(None, f)[0] for f in feeds])
            bitwise = np.array_equal(ref, out)
            cos = float(cosine_per_sample(ref, out).min())
            identical_all &= bitwise
            t_plain, t_new = [], []
            for _ in range(args.repeat):
                t_plain.append(median_ms(s_plain, feeds[0], args.iterations))
                t_new.append(median_ms(s_new, feeds[0], args.iterations))
            a, b = min(t_plain), min(t_new)
            before, after = op_counts(plain), op_counts(graph)
            ops = ", ".join(
                f"{op} {before.get(op, 0)}->{after.get(op, 0)}"
                for op in ("MatMul", "Gemm", "Conv", "Transpose", "Reshape", "Mul")
                if before.get(op, 0) != after.get(op, 0)
            )
            print(
                f"{args.backbone} {comp.name}: plain {a:.3f} ms | rewritten {b:.3f} ms | "
                f"{a / b:.2f}x | sites {sites} | ops {ops} | "
                f"{'bitwise identical' if bitwise else f'min cosine {cos:.8f}'}"
            )
            summary.append(f"{comp.name} {a / b:.2f}x")
    print(
        f"speed-up of the rewritten graph over the plain one (host CPU, {args.threads} thread(s)): "
        f"{'; '.join(summary)}; outputs "
        f"{'identical' if identical_all else 'not bitwise identical (equal up to float rounding)'}"
    )


if __name__ == "__main__":
    main()
