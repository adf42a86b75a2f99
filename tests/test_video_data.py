"""Track 2 data layer: frame selection, decoding/preprocessing, cache, QEVD formats, demo data."""

from __future__ import annotations

import argparse
import csv
import errno
import json
import shutil
import subprocess
from concurrent.futures import Future, ProcessPoolExecutor, wait
from pathlib import Path

import av
import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lpcvlab.cli.qevd import add_qevd_commands
from lpcvlab.data import batch, formats, frames, qevd, qevd_tools
from lpcvlab.data.batch import decode_videos
from lpcvlab.data.decode import decode_video
from lpcvlab.data.demo_video import DEMO_CLASSES, make_demo_video_dataset
from lpcvlab.data.frames import VideoDecodeError, VideoPreprocess, frame_indices, sampling_rate
from lpcvlab.errors import ConfigError, DataError, Interrupted, StorageError

# --------------------------------------------------------------------------- helpers


def make_video(
    path: Path,
    *,
    fps: int = 30,
    frames: int = 60,
    size: tuple[int, int] = (48, 64),
    gop: int | None = None,
    faststart: bool = False,
    seed: int = 0,
) -> Path:
    """A real H.264 mp4 whose frames all differ (moving bar + noise)."""
    h, w = size
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=opts) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.thread_count = 1
        if gop:
            s.codec_context.gop_size = gop
            s.options = {"keyint": str(gop), "min-keyint": str(gop), "scenecut": "0"}
        for i in range(frames):
            img = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
            x = (i * 3) % (w - 8)
            img[:, x : x + 8] = (220, 120, 30)
            img[(i * 2) % (h - 4) : (i * 2) % (h - 4) + 4, :] = (20, 200, 90)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def make_audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        for i in range(10):
            fr = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            fr.sample_rate = 16000
            fr.pts = i * 1024
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def official_recipe(path: Path, indices: list[int], threads_for_resize: int = 1) -> torch.Tensor:
    """The organisers' recipe done the slow, obvious way: decode every frame (as torchvision's
    read_video did, ``to_rgb().to_ndarray()``), pick, /255, bilinear no antialias, crop 112."""
    with av.open(str(path)) as c:
        frames = [f.to_rgb().to_ndarray() for f in c.decode(video=0)]
    x = torch.from_numpy(np.stack([frames[i] for i in indices]))  # T H W C
    x = x.permute(0, 3, 1, 2).to(torch.float32) / 255
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_for_resize)  # the kernel's last bit depends on the split
    try:
        x = F.interpolate(x, size=(128, 171), mode="bilinear", align_corners=False, antialias=False)
    finally:
        torch.set_num_threads(threads)
    x = x[:, :, 8:120, 30:142]  # centre crop: top round(16/2)=8, left round(59/2)=30
    return x.permute(1, 0, 2, 3)  # C T H W


@pytest.fixture(scope="module")
def vids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vids")
    out = {
        "v30": make_video(d / "v30.mp4", fps=30, frames=150),  # 5 s
        "v24": make_video(d / "v24.mp4", fps=24, frames=120, seed=1),  # 5 s
        "short": make_video(d / "short.mp4", fps=24, frames=60, seed=2),  # 2.5 s
        "gop": make_video(d / "gop.mp4", fps=30, frames=240, gop=10, seed=3),  # 8 s
        "audio": make_audio_only(d / "audio.mp4"),
    }
    fast = make_video(d / "fast.mp4", fps=30, frames=150, faststart=True, seed=4)
    data = out["v30"].read_bytes()
    (d / "trunc.mp4").write_bytes(data[: len(data) // 2])
    out["trunc"] = d / "trunc.mp4"
    fdata = fast.read_bytes()
    (d / "trunc_fast.mp4").write_bytes(fdata[: len(fdata) // 3])
    out["trunc_fast"] = d / "trunc_fast.mp4"
    (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    out["corrupt"] = d / "corrupt.mp4"
    (d / "empty.mp4").write_bytes(b"")
    out["empty"] = d / "empty.mp4"
    return out


LPCVC = VideoPreprocess("lpcvc_sample")


# --------------------------------------------------------------------------- frame selection


def test_lpcvc_sample_indices_hand_computed() -> None:
    assert frame_indices("lpcvc_sample", 300, 30) == [
        [0, 7, 15, 22, 30, 37, 45, 52, 60, 67, 75, 82, 90, 97, 105, 112]
    ]
    assert frame_indices("lpcvc_sample", 240, 24) == [[6 * k for k in range(16)]]
    assert frame_indices("lpcvc_sample", 250, 25) == [
        [0, 6, 12, 18, 25, 31, 37, 43, 50, 56, 62, 68, 75, 81, 87, 93]
    ]
    # NTSC rate, exact rational arithmetic: floor(k * 30000/1001 / 4)
    from fractions import Fraction

    assert frame_indices("lpcvc_sample", 300, Fraction(30000, 1001)) == [
        [0, 7, 14, 22, 29, 37, 44, 52, 59, 67, 74, 82, 89, 97, 104, 112]
    ]
    # exactly 4 s is enough
    assert frame_indices("lpcvc_sample", 120, 30)[0][-1] == 112


def test_dynamic_fps_indices_hand_computed() -> None:
    # 2.5 s at 24 fps: 10 frames at 4 fps < 16 -> rate ceil(16 / 2.5) = 7, step 24/7
    assert sampling_rate("dynamic_fps", 60, 24) == 7
    assert frame_indices("dynamic_fps", 60, 24) == [
        [0, 3, 6, 10, 13, 17, 20, 24, 27, 30, 34, 37, 41, 44, 48, 51]
    ]
    # 119 frames at 30 fps (3.97 s): rate ceil(4.03) = 5, step 6
    assert frame_indices("dynamic_fps", 119, 30) == [[6 * k for k in range(16)]]
    # fewer than 16 frames in total: rate 48 > 30 fps, frames repeat (the fork's formula)
    assert frame_indices("dynamic_fps", 10, 30) == [
        [0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 6, 7, 8, 8, 9]
    ]
    # long enough: identical to lpcvc_sample
    assert frame_indices("dynamic_fps", 300, 30) == frame_indices("lpcvc_sample", 300, 30)
    assert sampling_rate("dynamic_fps", 300, 30) == 4


def test_uniform_span_and_multi_clip_indices() -> None:
    assert frame_indices("uniform_span", 31, 30) == [[2 * k for k in range(16)]]
    assert frame_indices("uniform_span", 10, 30) == [
        [0, 0, 1, 1, 2, 3, 3, 4, 4, 5, 6, 6, 7, 7, 8, 9]
    ]
    two = frame_indices("uniform_span", 64, 30, clips=2)
    assert two[0] == [(31 * k) // 15 for k in range(16)]
    assert two[1] == [32 + (31 * k) // 15 for k in range(16)]
    # 300 frames at 30 fps = 40 frames at 4 fps; 3 windows start at 0, 12, 24
    clips = frame_indices("lpcvc_sample", 300, 30, clips=3)
    assert clips[0] == frame_indices("lpcvc_sample", 300, 30)[0]
    assert clips[1] == [int((12 + k) * 7.5) for k in range(16)]
    assert clips[2][-1] == int(39 * 7.5) == 292


def test_too_short_and_empty_policies() -> None:
    with pytest.raises(VideoDecodeError, match="fewer than the 16 needed") as e:
        frame_indices("lpcvc_sample", 119, 30)
    assert e.value.reason == frames.TOO_SHORT
    with pytest.raises(VideoDecodeError) as e:
        frame_indices("dynamic_fps", 0, 30)
    assert e.value.reason == frames.CORRUPT


def test_preprocess_settings() -> None:
    p = VideoPreprocess(frame_selection="dynamic_fps", resize=(128, 171))
    assert p == VideoPreprocess("dynamic_fps")
    assert p.key() == VideoPreprocess("dynamic_fps", fps=4.0).key()
    assert p.key() != LPCVC.key()
    assert p.output_shape == (1, 3, 16, 112, 112)
    with pytest.raises(ConfigError, match="frame_selection"):
        VideoPreprocess("every_frame")
    with pytest.raises(TypeError, match="fsp"):  # a typo is an error, not a silent default
        VideoPreprocess(frame_selection="lpcvc_sample", fsp=4)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="crop"):
        VideoPreprocess("lpcvc_sample", crop=200)


# --------------------------------------------------------------------------- decoding


def test_preprocessing_equals_official_recipe(vids: dict[str, Path]) -> None:
    out = decode_video(vids["v30"], LPCVC)
    assert out.shape == (1, 3, 16, 112, 112) and out.dtype == torch.float32
    want = official_recipe(vids["v30"], [int(k * 30 / 4) for k in range(16)])
    assert torch.equal(out[0], want)
    # with several threads torch's resize differs in the last bit only
    two = official_recipe(vids["v30"], [int(k * 30 / 4) for k in range(16)], threads_for_resize=2)
    torch.testing.assert_close(out[0], two, rtol=0, atol=1e-6)
    out24 = decode_video(vids["v24"], LPCVC)
    assert torch.equal(out24[0], official_recipe(vids["v24"], [6 * k for k in range(16)]))
    # dynamic frame selection on a 2.5 s video
    dyn = decode_video(vids["short"], VideoPreprocess("dynamic_fps"))
    assert torch.equal(
        dyn[0], official_recipe(vids["short"], frame_indices("dynamic_fps", 60, 24)[0])
    )


def test_seeking_gives_the_same_frames(vids: dict[str, Path]) -> None:
    """Keyframe seeks (gop 10, frames spread over 8 s) must not shift any frame."""
    pre = VideoPreprocess("uniform_span", clips_per_video=2)
    seek = decode_video(vids["gop"], pre, seek=True)
    plain = decode_video(vids["gop"], pre, seek=False)
    assert torch.equal(seek, plain)
    idx = frame_indices("uniform_span", 240, 30, clips=2)
    assert torch.equal(seek[1], official_recipe(vids["gop"], idx[1]))


def test_bad_videos_are_named_and_counted(vids: dict[str, Path], tmp_path: Path) -> None:
    cases = {
        "corrupt": frames.CORRUPT,
        "trunc": frames.TRUNCATED,
        "empty": frames.ZERO_LENGTH,
        "audio": frames.AUDIO_ONLY,
        "short": frames.TOO_SHORT,
    }
    for name, reason in cases.items():
        with pytest.raises(VideoDecodeError) as e:
            decode_video(vids[name], LPCVC)
        assert e.value.reason == reason
        assert str(vids[name]) in str(e.value)
    # a faststart file cut short opens, but the frames run out: truncated when they are needed
    with pytest.raises(VideoDecodeError) as e:
        decode_video(vids["trunc_fast"], VideoPreprocess("uniform_span"))
    assert e.value.reason == frames.TRUNCATED

    paths = [vids["v30"], vids["corrupt"], vids["trunc"], vids["empty"], vids["audio"]]
    paths += [vids["short"], tmp_path / "missing.mp4", vids["v24"]]
    batch = decode_videos(paths, LPCVC, workers=0, progress=False)
    assert [r.path for r in batch.results] == [Path(p) for p in paths]
    assert [s.index for s in batch.skipped] == [1, 2, 3, 4, 5, 6]
    assert batch.skip_counts() == {
        "audio-only": 1,
        "corrupt": 1,
        "missing": 1,
        "too-short": 1,
        "truncated": 1,
        "zero-length": 1,
    }
    assert batch.results[0].ok and batch.results[-1].ok and batch.num_ok == 2
    assert torch.equal(batch.results[-1].clips, decode_video(vids["v24"], LPCVC))


def test_cache_hit_is_identical_and_does_not_decode(
    vids: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    first = decode_videos([vids["v30"], vids["v24"]], LPCVC, cache, workers=0, progress=False)
    assert first.cache_hits == 0
    assert all(r.cache_path is not None and r.cache_path.exists() for r in first.results)

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded although the cache holds the result")

    monkeypatch.setattr(batch, "decode_video", no_decoding)
    again = decode_videos([vids["v30"], vids["v24"]], LPCVC, cache, workers=0, progress=False)
    assert again.cache_hits == 2
    for a, b in zip(first.results, again.results, strict=True):
        assert torch.equal(a.clips, b.clips)
    # other settings -> another cache entry (and a real decode)
    monkeypatch.undo()
    other = decode_videos([vids["v30"]], VideoPreprocess("uniform_span"), cache, progress=False)
    assert other.cache_hits == 0 and other.results[0].cache_path != first.results[0].cache_path


def test_worker_processes_match_in_process(vids: dict[str, Path]) -> None:
    paths = [vids["v30"], vids["corrupt"], vids["v24"], vids["short"]]
    pre = VideoPreprocess("dynamic_fps")
    serial = decode_videos(paths, pre, workers=0, progress=False)
    pooled = decode_videos(paths, pre, workers=2, progress=False)
    assert [s.index for s in pooled.skipped] == [s.index for s in serial.skipped] == [1]
    for a, b in zip(serial.results, pooled.results, strict=True):
        assert a.reason == b.reason
        if a.ok:
            assert torch.equal(a.clips, b.clips)


def test_interrupt_cancels_queued_jobs_and_does_not_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C / SIGTERM (Interrupted) while the pool works: queued jobs are cancelled and
    parallel_map returns at once instead of waiting for the running ones or draining the queue.

    Counted, not timed: job 0 finishes at once, every other job waits for a release file (a
    minute at most) before it marks itself done, so returning with job 0's mark alone proves
    parallel_map did not wait for a running job; after the release, only the jobs that were not
    cancelled leave a mark."""
    submitted: list[Future[object]] = []
    shutdowns: list[tuple[bool, bool]] = []

    class RecordingPool(ProcessPoolExecutor):
        def submit(self, *args: object, **kwargs: object) -> Future[object]:
            fut = super().submit(*args, **kwargs)
            submitted.append(fut)
            return fut

        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
            shutdowns.append((wait, cancel_futures))
            super().shutdown(wait=wait, cancel_futures=cancel_futures)

    real_as_completed = batch.as_completed

    def interrupted_after_the_first(futures: object) -> object:
        for fut in real_as_completed(futures):
            yield fut
            raise Interrupted("SIGTERM")

    release = tmp_path / "release"
    held = f"i=0; while [ ! -e {release} ] && [ $i -lt 6000 ]; do sleep 0.01; i=$((i+1)); done"
    jobs = [(["sh", "-c", f"{held if i else ':'}; touch {tmp_path}/done-{i}"],) for i in range(12)]
    monkeypatch.setattr(batch, "ProcessPoolExecutor", RecordingPool)
    monkeypatch.setattr(batch, "as_completed", interrupted_after_the_first)
    with pytest.raises(Interrupted):
        batch.parallel_map(subprocess.call, jobs, 2, progress=False)
    done_at_return = sorted(p.name for p in tmp_path.glob("done-*"))
    release.touch()
    assert done_at_return == ["done-0"]  # the two running jobs were not waited for
    assert shutdowns == [(False, True)]
    cancelled = [f.cancelled() for f in submitted]
    assert sum(cancelled) >= 5  # at most 2 running + 3 queued in the pipe
    wait([f for f in submitted if not f.cancelled()], timeout=120)
    ran = {p.name for p in tmp_path.glob("done-*")}
    assert ran == {f"done-{i}" for i, c in enumerate(cancelled) if not c}  # cancelled: never ran


def test_skipped_summary_counts_reasons_and_names_the_csv(tmp_path: Path) -> None:
    results = [batch.VideoResult(Path(f"{i}.mp4")) for i in range(40)]
    reasons = {3: "corrupt", 7: "too-short", 9: "too-short"}
    for i, reason in reasons.items():
        results[i] = batch.VideoResult(Path(f"{i}.mp4"), reason=reason, message="m")
    skipped = [batch.SkippedVideo(i, Path(f"{i}.mp4"), r, "m") for i, r in reasons.items()]
    csv_path = tmp_path / "skipped_videos.csv"
    line = batch.skipped_summary(batch.DecodeBatch(results, skipped), "val", csv_path)
    assert line == f"skipped 3 of 40 videos (val): 2 too-short, 1 corrupt; listed in {csv_path}"
    assert batch.skipped_summary(batch.DecodeBatch(results[:2]), "train") == ""


def test_video_track_load_data_reports_bad_inputs(
    vids: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import build_track_for, compose_config

    root = tmp_path / "ds"
    _layout(root, vids, {"val": ["burpee", "squats"]})
    shutil.copy(vids["short"], root / "val" / "squats" / "00000009.mp4")  # too short at 4 fps
    (root / "val" / "burpee" / "notes.txt").write_text("not a video")
    cfg = compose_config(
        "track=video",
        "data=qevd",
        f"data.root={root}",
        "data.workers=0",
        "train=none",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    work = tmp_path / "work"
    work.mkdir()
    data = build_track_for(cfg).load_data(work)
    assert data.stats["val_skipped/too-short"] == 1
    assert data.stats["val_non_video_files"] == 1
    err = capsys.readouterr().err
    assert (
        f"skipped 1 of 3 videos (val): 1 too-short; listed in {work / 'skipped_videos.csv'}" in err
    )


# --------------------------------------------------------------------------- QEVD layout


def test_class_map() -> None:
    cmap = qevd.load_class_map()
    assert len(cmap) == 92 and list(cmap) == sorted(cmap)
    assert list(cmap.values()) == list(range(92))
    assert qevd.class_folder_name("cross + hook right") == "cross_+_hook_right" in cmap


def test_class_map_validation(tmp_path: Path) -> None:
    bad = tmp_path / "map.json"
    bad.write_text(json.dumps({"a": 0, "b": 0}))
    with pytest.raises(DataError, match="map.json"):
        qevd.load_class_map(bad)


def _layout(root: Path, vids: dict[str, Path], spec: dict[str, list[str]]) -> None:
    for split, classes in spec.items():
        for i, cls in enumerate(classes):
            dest = root / split / cls / f"{i:08d}.mp4"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(vids["v30"] if i % 2 == 0 else vids["v24"], dest)


def test_reader_order_and_errors(vids: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _layout(root, vids, {"train": ["cross", "cross-legged_hamstring_stretch", "burpee"]})
    split = qevd.read_split(root, "train")
    # full-path order: "cross-legged..." < "cross/" because '-' < '/'
    assert [s.class_name for s in split.samples] == [
        "burpee",
        "cross-legged_hamstring_stretch",
        "cross",
    ]
    cmap = qevd.load_class_map()
    assert split.labels == [cmap["burpee"], cmap["cross-legged_hamstring_stretch"], cmap["cross"]]

    with pytest.raises(DataError, match="split folder .*val.* is missing"):
        qevd.read_dataset(root)
    (root / "val" / "burpee").mkdir(parents=True)
    with pytest.raises(DataError, match="has no .mp4 videos"):
        qevd.read_split(root, "val")
    (root / "train" / "elbow plank").mkdir()
    with pytest.raises(DataError, match="elbow plank") as e:
        qevd.read_split(root, "train")
    assert "'elbow_plank'" in str(e.value)  # suggests the class-map name


def test_reader_counts_files_that_are_not_videos(vids: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _layout(root, vids, {"val": ["burpee", "squats"]})
    (root / "val" / "burpee" / "notes.txt").write_text("not a video")
    (root / "val" / "squats" / "thumbs").mkdir()
    (root / "val" / "squats" / "thumbs" / "frame.jpg").write_bytes(b"\xff\xd8")
    (root / "val" / "squats" / ".DS_Store").write_bytes(b"")  # hidden: not counted
    (root / "val" / "squats" / ".cache").mkdir()
    (root / "val" / "squats" / ".cache" / "x.bin").write_bytes(b"")  # in a hidden folder
    split = qevd.read_split(root, "val")
    assert len(split) == 2
    assert split.non_video_files == [
        root / "val" / "burpee" / "notes.txt",
        root / "val" / "squats" / "thumbs" / "frame.jpg",
    ]


def test_organise_from_labels_json(vids: dict[str, Path], tmp_path: Path) -> None:
    part1, part2 = tmp_path / "QEVD-FIT-300k-Part-1", tmp_path / "QEVD-FIT-300k-Part-2"
    part1.mkdir()
    part2.mkdir()
    for i in range(4):
        shutil.copy(vids["v30"], (part1 if i < 2 else part2) / f"{i:08d}.mp4")
    entries = [
        {"video_path": "./00000000.mp4", "label": "elbow plank", "split": "train"},
        {"video_path": "./00000001.mp4", "label": "cross + hook right", "split": "val"},
        {"video_path": "./00000002.mp4", "label": "elbow plank", "split": "train"},
        {"video_path": "./00000003.mp4", "label": "burpee", "split": "test"},
    ]
    labels = tmp_path / "fine_grained_labels_release.json"
    labels.write_text(json.dumps(entries))
    out = tmp_path / "organised"
    res = qevd_tools.organise([part1, part2], labels, out, progress=False)
    assert res.counts == {"train": 2, "val": 1} and res.ignored_splits == {"test": 1}
    assert (out / "val" / "cross_+_hook_right" / "00000001.mp4").exists()
    assert (part1 / "00000000.mp4").exists()  # originals stay
    again = qevd_tools.organise([part1, part2], labels, out, progress=False)
    assert again.written == 0 and again.already_present == 3

    split = qevd_tools.organise(
        [part1, part2],
        labels,
        tmp_path / "resplit",
        val_fraction=0.5,
        mode="hardlink",
        progress=False,
    )
    assert sum(split.counts.values()) == 4

    labels.write_text(json.dumps(entries + [{"video_path": "9.mp4", "label": "flying"}]))
    with pytest.raises(DataError, match="'flying'"):
        qevd_tools.organise([part1], labels, tmp_path / "x", progress=False)
    labels.write_text(json.dumps(entries))
    with pytest.raises(DataError, match="in none of the raw parts"):
        qevd_tools.organise([part1], labels, tmp_path / "y", progress=False)
    partial = qevd_tools.organise(
        [part1], labels, tmp_path / "y", allow_missing=True, progress=False
    )
    assert partial.missing == ["00000002.mp4"]


def test_check_quarantines_and_reports(vids: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _layout(root, vids, {"train": ["burpee"], "val": ["squats"]})
    bad = root / "train" / "burpee" / "broken.mp4"
    shutil.copy(vids["corrupt"], bad)
    shutil.copy(vids["trunc_fast"], root / "val" / "squats" / "cut.mp4")
    report = tmp_path / "report.csv"
    res = qevd_tools.check(root, tmp_path / "quarantine", report, progress=False)
    assert res.checked == 4 and res.reason_counts() == {"corrupt": 1, "truncated": 1}
    assert not bad.exists()
    assert (tmp_path / "quarantine" / "train" / "burpee" / "broken.mp4").exists()
    assert (tmp_path / "quarantine" / "val" / "squats" / "cut.mp4").exists()
    assert (root / "train" / "burpee" / "00000000.mp4").exists()
    rows = list(csv.DictReader(report.open()))
    assert {(Path(r["path"]).name, r["reason"]) for r in rows} == {
        ("broken.mp4", "corrupt"),
        ("cut.mp4", "truncated"),
    }


# --------------------------------------------------------------------------- official files


def test_write_preprocessed_manifest(vids: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _layout(root, vids, {"val": ["cross", "cross-legged_hamstring_stretch", "burpee"]})
    shutil.copy(vids["short"], root / "val" / "burpee" / "00000009.mp4")  # too short
    samples = qevd.read_split(root, "val").samples
    out = tmp_path / "pre"
    res = qevd_tools.write_preprocessed(samples, LPCVC, out, progress=False)
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 3 == len(res.records)
    rows = [json.loads(x) for x in lines]
    assert all(list(r) == ["video_path", "label", "tensor_path", "shape", "dtype"] for r in rows)
    assert [r["video_path"] for r in rows] == sorted(r["video_path"] for r in rows)
    assert [r["label"] for r in rows] == ["burpee", "cross-legged_hamstring_stretch", "cross"]
    assert rows[0]["shape"] == [1, 3, 16, 112, 112] and rows[0]["dtype"] == "torch.float32"
    arr = np.load(rows[2]["tensor_path"])
    assert arr.shape == (1, 3, 16, 112, 112) and arr.dtype == np.float32
    assert np.array_equal(arr, decode_video(rows[2]["video_path"], LPCVC).numpy())
    assert [s.reason for s in res.skipped] == ["too-short"]
    assert "00000009.mp4" in (out / "skipped.csv").read_text()
    assert [r.label for r in formats.read_manifest(out / "manifest.jsonl")] == [
        r["label"] for r in rows
    ]

    (out / "burpee" / "stray.npy").write_bytes(b"")
    with pytest.raises(DataError, match="stray.npy"):
        qevd_tools.write_preprocessed(samples, LPCVC, out, progress=False)


def test_results_h5_roundtrip_and_manifest_check(tmp_path: Path) -> None:
    logits = np.random.default_rng(0).normal(size=(12, 92)).astype(np.float32)
    path = formats.write_results_h5(tmp_path / "results.h5", logits)
    with h5py.File(path) as f:  # the layout the organisers' evaluate.py reads
        grp = f["data/0"]
        assert sorted(grp, key=lambda k: int(k.split("_")[1])) == [f"batch_{i}" for i in range(12)]
        assert grp["batch_3"].shape == (1, 92)
        assert np.array_equal(grp["batch_3"][...][0], logits[3])
    assert np.array_equal(formats.read_results_h5(path), logits)

    manifest = tmp_path / "manifest.jsonl"
    rec = formats.ManifestRecord("v.mp4", "burpee", "v.npy", [1, 3, 16, 112, 112], "torch.float32")
    manifest.write_text((rec.to_json() + "\n") * 12)
    assert formats.check_results_against_manifest(manifest, path, num_classes=92) == 12
    manifest.write_text((rec.to_json() + "\n") * 11)
    with pytest.raises(DataError) as e:
        formats.check_results_against_manifest(manifest, path)
    assert "results.h5" in str(e.value) and "manifest.jsonl" in str(e.value)
    assert "12 result rows" in str(e.value) and "11 videos" in str(e.value)


# --------------------------------------------------------------------------- demo data + CLI


def test_demo_dataset_is_deterministic(tmp_path: Path) -> None:
    kw = dict(seed=3, videos_per_class_train=1, videos_per_class_val=1, duration_s=(4.2, 4.6))
    a = make_demo_video_dataset(tmp_path / "a", **kw)
    b = make_demo_video_dataset(tmp_path / "b", **kw)
    assert a.generated and a.classes == list(DEMO_CLASSES)
    pairs = zip(
        a.splits["train"] + a.splits["val"], b.splits["train"] + b.splits["val"], strict=True
    )
    for sa, sb in pairs:
        assert sa.path.read_bytes() == sb.path.read_bytes()
    assert not make_demo_video_dataset(tmp_path / "a", **kw).generated  # idempotent
    with pytest.raises(DataError, match="other parameters"):
        make_demo_video_dataset(tmp_path / "a", seed=4)
    read = qevd.read_dataset(tmp_path / "a")
    assert [s.path for s in read["val"].samples] == [s.path for s in a.splits["val"]]
    # one short train video: skipped at 4 fps, kept by dynamic frame selection
    paths = [s.path for s in a.splits["train"]]
    assert decode_videos(paths, LPCVC, progress=False).skip_counts() == {"too-short": 1}
    assert not decode_videos(paths, VideoPreprocess("dynamic_fps"), progress=False).skipped


def test_cli_preprocess_on_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_demo_video_dataset(
        tmp_path / "demo", videos_per_class_train=1, videos_per_class_val=1, short_videos=0
    )
    parser = argparse.ArgumentParser(prog="lpcvlab")
    add_qevd_commands(parser.add_subparsers())
    args = parser.parse_args(
        [
            "qevd",
            "preprocess",
            "--root",
            str(tmp_path / "demo"),
            "--out",
            str(tmp_path / "pre"),
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    assert "preprocessed 4 of 4 val videos" in capsys.readouterr().out
    assert len(formats.read_manifest(tmp_path / "pre" / "manifest.jsonl")) == 4


def test_write_preprocessed_refuses_names_that_would_misalign(tmp_path: Path) -> None:
    """'a.mp4' < 'a.n.mp4' but 'a.n.npy' < 'a.npy': run_inference.py's sort would shift rows."""
    samples = [
        qevd.VideoSample(tmp_path / "val" / "burpee" / name, 8, "burpee")
        for name in ("a.mp4", "a.n.mp4")
    ]
    with pytest.raises(DataError, match="would not sort in the manifest order"):
        qevd_tools.write_preprocessed(samples, LPCVC, tmp_path / "pre", progress=False)


# --------------------------------------------------------------------------- full disk


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_writing_the_clip_cache_is_an_error_not_a_skip(
    vids: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setattr(np, "save", _no_space)
    with pytest.raises(StorageError, match="no space left") as e:
        decode_videos([vids["v30"], vids["v24"]], LPCVC, cache, workers=0, progress=False)
    assert str(cache / "video") in str(e.value) and ".npy" in str(e.value)
    assert not [p for p in cache.rglob("*") if p.is_file()]  # no temporary file left behind


def test_full_disk_writing_the_preprocessed_set_names_the_file(
    vids: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ds"
    _layout(root, vids, {"val": ["burpee", "squats"]})
    samples = qevd.read_split(root, "val").samples
    cache, out = tmp_path / "cache", tmp_path / "pre"
    with monkeypatch.context() as m:
        m.setattr(shutil, "copyfile", _no_space)
        with pytest.raises(StorageError, match="no space left") as e:
            qevd_tools.write_preprocessed(samples, LPCVC, out, cache_dir=cache, progress=False)
    assert str(out / "burpee" / "00000000.npy") in str(e.value)

    real_write_text = Path.write_text

    def manifest_fails(self: Path, *args: object, **kwargs: object) -> int:
        if "manifest.jsonl" in self.name:
            _no_space()
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", manifest_fails)
    with pytest.raises(StorageError, match="no space left") as e:
        qevd_tools.write_preprocessed(samples, LPCVC, out, cache_dir=cache, progress=False)
    assert str(out / "manifest.jsonl") in str(e.value)
    assert not (out / "manifest.jsonl").exists()


def test_full_disk_generating_the_demo_videos_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = av.open

    def open_for_writing_fails(file: object, mode: str = "r", **kwargs: object) -> object:
        if mode == "w":
            _no_space()
        return real_open(file, mode, **kwargs)

    monkeypatch.setattr(av, "open", open_for_writing_fails)
    root = tmp_path / "demo"
    with pytest.raises(StorageError, match="no space left") as e:
        make_demo_video_dataset(root, videos_per_class_train=1, videos_per_class_val=1)
    assert str(root / "train") in str(e.value) and ".mp4" in str(e.value)
    assert not (root / ".lpcvlab_demo_video.json").exists()  # the next call generates again
