"""Track 2's results/ hold the class_map.json the run used, so the official
``evaluate.py --h5 --manifest --class_map`` reads the downloaded artifacts alone."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from conftest import build_track_for, compose_config

from lpcvlab.data.formats import manifest_labels, read_manifest, read_results_h5
from lpcvlab.data.qevd import VideoSample, load_class_map
from lpcvlab.tracks.base import TrackData
from lpcvlab.tracks.video import VIDEO, VideoPayload


def _evaluate(tmp: Path, *overrides: str):
    track = build_track_for(compose_config("track=video", "backbone=video_tiny", *overrides))
    names = [n for n, _ in sorted(track.class_map.items(), key=lambda kv: kv[1])]
    picks = [0, 5, 40, 91]
    val = [
        VideoSample(Path(f"/qevd/val/{names[c]}/v{i}.mp4"), c, names[c])
        for i, c in enumerate(picks)
    ]
    data = TrackData(
        inputs={VIDEO: np.zeros((len(val), 3, 2, 4, 4), dtype=np.float32)},
        payload=VideoPayload(
            val=val,
            val_cache=[None] * len(val),
            clips_per_video=1,
            class_names=names,
            train=[],
            train_cache=[],
        ),
    )
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((len(val), len(names))).astype(np.float32)
    logits[[0, 1, 2], [0, 5, 40]] += 10  # three right, the last one wrong
    logits[3, 7] += 20
    work = tmp / "work"
    work.mkdir()
    return track.evaluate(data, {VIDEO: logits}, work), work


def _official_top1(results: Path, manifest: Path, class_map: Path) -> float:
    """What evaluate.py computes from its three files: softmax of each row, argmax vs label."""
    logits = read_results_h5(results)
    labels = manifest_labels(read_manifest(manifest), json.loads(class_map.read_text()))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return float(np.mean(np.argmax(probs, axis=1) == np.array(labels)))


@pytest.mark.parametrize("configured", [False, True])
def test_results_hold_the_class_map_the_run_used(tmp_path, configured):
    official = resources.files("lpcvlab").joinpath("resources/track2_class_map.json").read_bytes()
    overrides = []
    if configured:  # the same classes, written differently: the artifact is this file, as read
        custom = tmp_path / "my_class_map.json"
        custom.write_text(json.dumps(load_class_map(), indent=1, sort_keys=True))
        overrides = [f"data.class_map={custom}"]
        want = custom.read_bytes()
        assert want != official
    else:
        want = official
    res, work = _evaluate(tmp_path, *overrides)
    artifact = work / "class_map.json"
    assert artifact in res.artifacts and artifact.read_bytes() == want
    # The official reading needs nothing but the three artifacts.
    top1 = _official_top1(work / "results.h5", work / "manifest.jsonl", artifact)
    assert top1 == res.metrics["top1"] == 0.75
