"""Named experiments, hyperparameter searches and launchers compose to what they promise."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lpcvlab_runs import REPO
from omegaconf import DictConfig, OmegaConf

CONF = REPO / "conf"
EXPERIMENTS = REPO / "experiments"
NAMES = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))


def compose_hydra(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def missing_configs(path: Path) -> list[str]:
    """Config files an experiment names in its defaults list that do not exist (yet)."""
    missing = []
    text = path.read_text()
    for group, option in re.findall(r"^\s*-\s*override\s+/([\w/]+):\s*(\w+)", text, re.M):
        if not group.startswith("hydra/") and not (CONF / group / f"{option}.yaml").is_file():
            missing.append(f"conf/{group}/{option}.yaml")
    for other in re.findall(r"^\s*-\s*(\w+)\s*$", text, re.M):
        if not (EXPERIMENTS / f"{other}.yaml").is_file():
            missing.append(f"experiments/{other}.yaml")
        else:
            missing += missing_configs(EXPERIMENTS / f"{other}.yaml")
    return missing


def compose_experiment(name: str, *overrides: str) -> DictConfig:
    missing = missing_configs(EXPERIMENTS / f"{name}.yaml")
    if missing:
        pytest.skip(f"experiment={name} needs configs not written yet: {', '.join(missing)}")
    return compose_hydra(f"experiment={name}", *overrides)


EXPECTED = {
    "track1_baseline": {
        "track.name": "retrieval",
        "backbone.name": "clip_vit_b16",
        "backbone.pretrained": "openai",
        "preprocess.name": "lpcvc_sample",
        "preprocess.image.mean": None,
        "device.name": "xr2_gen2_proxy",
        "device.aihub_name": "XR2 Gen 2 (Proxy)",
        "runtime.name": "qnn_dlc",
        "data.name": "lpcvc_track1",
        "train.name": "none",
    },
    "track1_mean_std": {
        "backbone.name": "clip_vit_b16",
        "backbone.pretrained": "openai",
        "preprocess.name": "clip_mean_std",
        "preprocess.image.normalize_in_model": True,
        "device.name": "xr2_gen2_proxy",
        "runtime.name": "qnn_dlc",
    },
    "track2_baseline": {
        "track.name": "video",
        "track.objective": "top1",
        "backbone.name": "r2plus1d_18",
        "backbone.pretrained": "kinetics400",
        "preprocess.name": "lpcvc_sample",
        "preprocess.video.fps": 4,
        "preprocess.video.num_frames": 16,
        "device.name": "dragonwing_iq9075_evk",
        "runtime.name": "qnn_context_binary",
        "data.name": "qevd",
        "train.name": "finetune",
        # the sample's recipe, not the demo's defaults
        "train.trainable": ["layer4", "fc"],
        "train.lr": 1.0e-3,
        "train.clip_sampling": "random",
    },
    "track1_sweep": {"backbone.name": "clip_vit_b16", "tracking.run_name": None},
    "track2_sweep": {"backbone.name": "r2plus1d_18", "track.name": "video"},
    "tiny_sweep": {"backbone.name": "clip_tiny", "data.name": "demo_retrieval"},
    "track1_precision_sweep": {
        "backbone.name": "clip_vit_b16",
        "precision.name": "mixed",
        "precision.per_component.image_encoder": "fp16",
        "precision.per_component.text_encoder": "w8a8",
        "backbone.activation": "gelu_sigmoid",
        "export.rewrites": ["finite_mask"],
    },
    "track2_precision_sweep": {
        "backbone.name": "r2plus1d_18",
        "track.name": "video",
        "precision.name": "fp32",
        "precision.calibration_samples": 64,
    },
    "track1_finetune_demo": {
        "track.name": "retrieval",
        "backbone.name": "clip_tiny",
        "data.name": "demo_retrieval",
        "train.name": "finetune",
        "train.checkpoint.monitor": "val/recall_at_10",
        "train.hard_negatives.enabled": True,
    },
    "track1_npu_recipe": {
        "backbone.name": "clip_tiny",
        "backbone.image_size": 192,
        "backbone.activation": "relu",
        "train.name": "finetune",
        "precision.name": "w8a8",
        "precision.exclude": None,  # on the command line: hub=aihub refuses it
        "precision.sensitivity": True,
        "export.rewrites": [
            "finite_mask",
            "matmul_conv1x1",
            "fold_attention_scale",
            "drop_transposes",
        ],
    },
}


def test_every_experiment_is_checked_and_listed_in_the_readme():
    assert set(NAMES) == set(EXPECTED)
    readme = (EXPERIMENTS / "README.md").read_text()
    for name in NAMES:
        assert f"experiment={name}" in readme


@pytest.mark.parametrize("name", NAMES)
def test_experiment_composes_to_what_it_documents(name):
    cfg = compose_experiment(name)
    for key, value in EXPECTED[name].items():
        assert OmegaConf.select(cfg, key) == value, key
    text = (EXPERIMENTS / f"{name}.yaml").read_text()
    assert f"experiment={name}" in text and "Should reproduce" in text
    assert "RANDOM" in text or "random" in text  # honest about missing weights


@pytest.mark.parametrize("name", [n for n in NAMES if "sweep" in n])
def test_sweep_experiments_sweep_over_options_that_exist(name):
    cfg = compose_experiment(name)
    params = cfg.hydra.sweeper.params
    assert params, f"{name} defines no hydra.sweeper.params"
    for key, values in params.items():
        for value in str(values).split(","):
            if (CONF / key).is_dir():
                assert (CONF / key / f"{value}.yaml").is_file(), f"{key}={value}"
            else:
                assert OmegaConf.select(cfg, key) is not None, key


def test_track1_baselines_state_the_reference_numbers():
    assert "0.7260" in (EXPERIMENTS / "track1_baseline.yaml").read_text()
    assert "0.7299" in (EXPERIMENTS / "track1_mean_std.yaml").read_text()
    for ms in ("29.3", "5.4"):
        assert ms in (EXPERIMENTS / "track1_baseline.yaml").read_text()


def test_track2_sample_is_channel_last_on_the_device():
    cfg = compose_experiment("track2_baseline", "hub=aihub")
    assert cfg.track.channel_last is False  # exported NCTHW ...
    assert "video" in cfg.hub.channel_last_inputs  # ... compiled channel-last for the device


@pytest.mark.parametrize(
    ("search", "track", "budget"),
    [
        ("retrieval_optuna", "retrieval", 29.3 + 5.4),
        ("retrieval_finetune_optuna", "retrieval", 29.3 + 5.4),
        ("video_optuna", "video", None),
    ],
)
def test_hparams_search_is_an_optuna_multirun_that_maximises(search, track, budget):
    cfg = compose_hydra(f"hparams_search={search}")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.track.name == track
    assert cfg.budget.latency_ms == (pytest.approx(budget) if budget else None)
    assert sweeper.max_failure_rate > 0  # a failed trial does not end the search
    for key in sweeper.params:
        if (CONF / key).is_dir():
            choices = re.findall(r"\w+", str(sweeper.params[key]).removeprefix("choice"))
            assert all((CONF / key / f"{c}.yaml").is_file() for c in choices), key
        else:
            assert OmegaConf.select(cfg, key) is not None, key


def test_defaults_register_the_sweep_callback_and_leave_no_budget():
    cfg = compose_hydra()
    callback = instantiate(cfg.hydra.callbacks.mlflow_sweep)
    assert type(callback).__name__ == "MlflowSweepCallback"
    assert cfg.budget.latency_ms is None and cfg.cache.enabled is True
    assert cfg.cache.dir == f"{cfg.paths.cache_dir}/stages"


def test_a_shared_tracking_server_is_one_override_or_variable(monkeypatch):
    cfg = compose_hydra("tracking.uri=http://mlflow.internal:5000")
    assert cfg.tracking.uri == "http://mlflow.internal:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.7:5000")
    assert compose_hydra().tracking.uri == "http://10.0.0.7:5000"


def test_slurm_launchers_compose_with_site_settings():
    cfg = compose_hydra(
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=60",
        "hydra.launcher.gpus_per_node=1",
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node) == ("gpu", 60, 1)
    ours = compose_hydra("hydra/launcher=slurm", "hydra.launcher.account=lpcv")
    launcher = ours.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.account == "lpcv"
    assert launcher.cpus_per_task == 8 and launcher.array_parallelism == 16
    assert OmegaConf.select(ours, "hydra.launcher.submitit_folder").startswith(
        str(ours.hydra.sweep.dir)
    )
    joblib = compose_hydra("hydra/launcher=joblib", "hydra.launcher.n_jobs=2").hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher") and joblib.n_jobs == 2
