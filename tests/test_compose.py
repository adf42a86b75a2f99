"""Typed configs: every option of every group and every preset, with each hub, either loads or
stops at once with one line naming the key (or the two groups) -- before any run or compute."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, REPO, compose_config
from hydra import compose, initialize_config_dir
from lpcvlab_runs import child_cpu_seconds

from lpcvlab.config import composition_error, load_settings
from lpcvlab.config.schema import AIHubConfig, LocalHubConfig
from lpcvlab.errors import ConfigError

HUBS = ("local", "aihub")
# train_track is not chosen by users: config.yaml picks it from train and track.
PRESETS = {"experiment", "hparams_search", "train_track"}
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in PRESETS)
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))
SEARCHES = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))

# Options that cannot run with the defaults around them (Track 1, demo data), and the words the
# one-line message must contain. Everything else must load.
CANNOT_RUN = {
    ("backbone", "r2plus1d_18"): ("backbone=r2plus1d_18", "track=retrieval"),
    ("backbone", "r3d_18"): ("backbone=r3d_18", "track=retrieval"),
    ("backbone", "mc3_18"): ("backbone=mc3_18", "track=retrieval"),
    ("backbone", "video_tiny"): ("backbone=video_tiny", "track=retrieval"),
    ("preprocess", "dynamic_fps"): ("preprocess=dynamic_fps", "track=retrieval"),
    ("preprocess", "uniform_span"): ("preprocess=uniform_span", "track=retrieval"),
    ("data", "demo_video"): ("data=demo_video", "track=retrieval"),
    ("data", "qevd"): ("data=qevd", "track=retrieval"),
    ("data", "lpcvc_track1"): ("data=lpcvc_track1", "data.root"),
}
ONLY_LOCAL = {("device", "host_cpu"): ("device=host_cpu", "hub=aihub")}


def _outcome(*overrides: str) -> str | None:
    """None when the config loads; otherwise the one-line message a user would read."""
    try:
        load_settings(compose_config(*overrides))
    except ConfigError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - Hydra's own composition errors
        message = composition_error(exc)
        assert message is not None, f"{overrides}: unexplained {type(exc).__name__}: {exc}"
        return message
    return None


@pytest.mark.parametrize("hub", HUBS)
@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_with_each_hub(group, option, hub):
    if group == "hub":
        overrides = [f"hub={option}"]
    else:
        overrides = [f"hub={hub}", f"{group}={option}"]
    message = _outcome(*overrides)
    expected = CANNOT_RUN.get((group, option))
    if hub == "aihub" and group != "hub":
        expected = expected or ONLY_LOCAL.get((group, option))
    if expected is None:
        assert message is None, f"{overrides} should load: {message}"
    else:
        assert message is not None, f"{overrides} should not load"
        assert "\n" not in message
        for words in expected:
            assert words in message, (words, message)


@pytest.mark.parametrize("hub", HUBS)
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_documented_experiment_loads_with_each_hub(name, hub):
    # Presets on the real data are documented with data.root=...; give one.
    message = _outcome(f"experiment={name}", f"hub={hub}", "data.root=/data/lpcvc")
    assert message is None, message


@pytest.mark.parametrize("hub", HUBS)
@pytest.mark.parametrize("name", SEARCHES)
def test_every_search_loads_with_each_hub(name, hub):
    message = _outcome(f"hparams_search={name}", f"hub={hub}", "data.root=/data/lpcvc")
    assert message is None, message


def test_video_track_selects_its_own_groups_and_typed_settings():
    s = load_settings(compose_config("track=video", "backbone=video_tiny", "hub=aihub"))
    assert s.track.name == "video" and s.backbone.width == 16
    assert isinstance(s.hub, AIHubConfig) and s.hub.profile_iterations == 100
    assert isinstance(load_settings(compose_config()).hub, LocalHubConfig)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("hub.foo=1", ["hub.foo", "hub=local"]),
        ("hub.warmup_iterations=x", ["hub.warmup_iterations", "whole number"]),
        ("seed=-1", ["seed=-1", ">= 0"]),
        ("data.demo.num_images=0", ["data.demo.num_images=0", ">= 1"]),
        ("hub.profile_iterations=0", ["hub.profile_iterations=0", ">= 1"]),
        ("export.parity_samples=-3", ["export.parity_samples", ">= 1"]),
        ("cache.stages=[export,exprot]", ["cache.stages", "exprot"]),
        ("preprocess.image.resample=box", ["preprocess.image.resample", "bilinear"]),
        ("backbone=nope", ["backbone=nope", "clip_tiny"]),
        ("track.objective=top1", ["track.objective", "recall_at_10"]),
    ],
)
def test_bad_values_are_named_in_one_line(override, words):
    message = _outcome(override)
    assert message is not None and "\n" not in message
    for w in words:
        assert w in message, (w, message)


def test_a_preset_setting_a_key_only_the_other_hub_has_names_both(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)  # (conf/experiment is a link to experiments/: copied as files)
    (conf / "experiment" / "host_timing.yaml").write_text(
        "# @package _global_\nhub:\n  warmup_iterations: 1\n"
    )
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        compose("config", overrides=["experiment=host_timing"])  # fine with hub=local
        with pytest.raises(Exception) as err:  # noqa: PT011 - Hydra's own exception type
            compose("config", overrides=["experiment=host_timing", "hub=aihub"])
    message = composition_error(err.value)
    assert message is not None and "\n" not in message
    assert "experiment=host_timing" in message and "hub=aihub" in message
    assert "hub.warmup_iterations" in message and "hub=local has it" in message


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["hub.foo=1"], ["error: hub.foo is not a setting of hub=local"]),
        (
            ["track=retrieval", "preprocess=dynamic_fps"],
            ["preprocess=dynamic_fps", "track=retrieval"],
        ),
        (["-m", "seed=0,1", "hub.warmup_iterations=-1"], ["hub.warmup_iterations=-1", ">= 0"]),
        (
            ["-m", "seed=0,1", "track=video", "preprocess=clip_mean_std"],
            ["preprocess=clip_mean_std"],
        ),
    ],
)
def test_run_py_stops_before_any_run_or_compute(tmp_path, args, words):
    cpu = child_cpu_seconds()  # work done, not wall time (test workers share the cores)
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            *args,
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"paths.cache_dir={tmp_path}/cache",
            f"hydra.run.dir={tmp_path}/out",
            f"hydra.sweep.dir={tmp_path}/multirun",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = child_cpu_seconds() - cpu
    assert elapsed < 15, elapsed
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    # No MLflow run, not even a store: a sweep whose jobs all share the mistake starts none.
    assert not Path(tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "cache").exists()  # no data or model work


def test_a_sweep_whose_swept_value_can_fix_the_mistake_runs_its_jobs():
    """Only a mistake no swept value names stops a sweep at once; otherwise each job decides."""
    from lpcvlab.tracking.sweep import refuse_a_sweep_no_job_can_run

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        shared = compose("config", overrides=["hub.warmup_iterations=-1"], return_hydra_config=True)
    shared.hydra.overrides.task = ["seed=0,1", "hub.warmup_iterations=-1"]
    with pytest.raises(ConfigError, match="every job of this sweep has it"):
        refuse_a_sweep_no_job_can_run(shared)
    shared.hydra.overrides.task = ["hub.warmup_iterations=-1,1"]
    refuse_a_sweep_no_job_can_run(shared)  # hub.warmup_iterations=1 can run


def test_track1_training_on_several_devices_is_refused_in_one_line():
    message = _outcome("train=finetune", "train.trainer.devices=2")
    assert message is not None and "\n" not in message
    assert "train.trainer.devices=2" in message and "track=retrieval" in message
    assert _outcome("train=finetune") is None
