"""Combinations of config groups that cannot run, found when the config is loaded.

Each check names the two groups (or the key) and says what to choose instead; they run before
any MLflow run, data or model work (:func:`lpcvlab.config.load_settings`).
"""

from __future__ import annotations

from typing import Any

from lpcvlab.config.schema import (
    AIHubConfig,
    ClipBackboneConfig,
    FinetuneConfig,
    MixedPrecisionConfig,
    NoTrainConfig,
    RetrievalDataConfig,
    RetrievalFinetuneConfig,
    RetrievalTrackConfig,
    RunConfig,
    VideoBackboneConfig,
    VideoDataConfig,
    VideoFinetuneConfig,
    VideoTrackConfig,
)
from lpcvlab.config.teacher import resolve_teacher
from lpcvlab.config.weights import check_weights
from lpcvlab.errors import ConfigError

TRACK1_BACKBONES = (
    "clip_vit_b16, clip_vit_b32, mobileclip2_s0, mobileclip2_s2, mobileclip2_b, clip_tiny"
)
TRACK2_BACKBONES = "r2plus1d_18, r3d_18, mc3_18, video_tiny"
TRACK1_DATA = "demo_retrieval, lpcvc_track1"
TRACK2_DATA = "demo_video, qevd"
TRACK1_PREPROCESS = "lpcvc_sample, clip_mean_std"
TRACK2_PREPROCESS = "lpcvc_sample, dynamic_fps, uniform_span"
AIHUB_DEVICES = "xr2_gen2_proxy, dragonwing_iq9075_evk, galaxy_s25"
# The runtimes with a documented fp16 compile option (conf/runtime/*.yaml: fp16_options).
FP16_RUNTIMES = "runtime=qnn_dlc, runtime=qnn_context_binary or runtime=precompiled_qnn_onnx"


def check_combinations(s: RunConfig) -> None:
    """Raise a ConfigError for the first combination of groups that cannot run."""
    if "gelu_sigmoid" in s.export.rewrites:  # a graph rewrite once; the model swap replaced it
        given = ",".join(s.export.rewrites)
        raise ConfigError(
            f"export.rewrites=[{given}]: gelu_sigmoid is not a graph rewrite; use "
            "backbone.activation=gelu_sigmoid (the model's GELUs swapped before export, so "
            "training adapts and parity measures it; Track 2's backbones have none) and drop it "
            "from export.rewrites"
        )
    if isinstance(s.track, RetrievalTrackConfig):
        _check_retrieval(s)
    elif isinstance(s.track, VideoTrackConfig):
        _check_video(s)
    if s.track.objective not in s.track.metrics():
        raise ConfigError(
            f"track.objective={s.track.objective!r} is not a metric of track={s.track.name}; "
            f"choose one of: {', '.join(s.track.metrics())}"
        )
    if isinstance(s.hub, AIHubConfig) and not s.device.aihub_name:
        raise ConfigError(
            f"device={s.device.name} has no AI Hub device (device.aihub_name is empty), so it "
            f"cannot go with hub=aihub: pick device={AIHUB_DEVICES.replace(', ', ' or device=')}, "
            "or use hub=local"
        )
    _check_precision(s)
    if isinstance(s.hub, AIHubConfig):
        _check_aihub_options(s)
    check_weights(s.backbone)  # a tag a tiny backbone lacks, a missing checkpoint file
    if isinstance(s.train, FinetuneConfig):
        kind = ClipBackboneConfig if isinstance(s.track, RetrievalTrackConfig) else None
        kind = VideoBackboneConfig if isinstance(s.track, VideoTrackConfig) else kind
        if kind is not None:
            resolve_teacher(s.train.distill, kind, s.track.name)


def _check_precision(s: RunConfig) -> None:
    """Components the track has, and precisions the AI Hub runtime can deploy."""
    components = s.track.components()
    if isinstance(s.precision, MixedPrecisionConfig):
        for name, precision in s.precision.named().items():
            if name not in components:
                raise ConfigError(
                    f"precision.per_component.{name}={precision}: track={s.track.name} has no "
                    f"{name}; its components are {', '.join(components)}"
                )
    p = s.precision
    for op in p.exclude_op_types:
        import onnx.defs

        if not onnx.defs.has(op):
            raise ConfigError(
                f"precision.exclude_op_types: {op!r} is not an ONNX operator type; use ONNX "
                "names such as MatMul, Conv, Gemm, Softmax, LayerNormalization, Add, Mul"
            )
    # precision.sensitivity only measures (on this machine, with ONNX Runtime's emulation), so
    # it goes with either hub; keeping ops float changes the deployment, which AI Hub cannot.
    if isinstance(s.hub, AIHubConfig) and (p.exclude_op_types or p.exclude_nodes or p.exclude):
        raise ConfigError(
            "precision.exclude_op_types/exclude_nodes/exclude with hub=aihub: AI Hub's quantize "
            "job takes only the weight and activation types, no op or node to keep float; run "
            "the selective quantization with hub=local"
        )
    if not isinstance(s.hub, AIHubConfig):
        return  # hub=local emulates every precision
    for name in components:
        precision = s.precision.of(name)
        if precision not in s.runtime.precisions:
            key = (
                f"precision.per_component.{name}"
                if isinstance(s.precision, MixedPrecisionConfig)
                else "precision"
            )
            working = FP16_RUNTIMES if precision == "fp16" else "runtime=qnn_dlc"
            raise ConfigError(
                f"{name} in {precision} ({key}={precision}) cannot go with runtime="
                f"{s.runtime.name} on hub=aihub, which deploys {', '.join(s.runtime.precisions)}; "
                f"choose one of those, or {working}"
            )


def _check_aihub_options(s: RunConfig) -> None:
    """``hub.qairt_version`` is the one place of the QAIRT version; quantized I/O that the
    submission contract refuses would stop an ``export.lint=error`` run after its first compile."""
    hub = s.hub
    assert isinstance(hub, AIHubConfig)
    for key in ("extra_compile_options", "extra_profile_options", "extra_inference_options"):
        if "--qairt_version" in str(getattr(hub, key) or "").split():
            raise ConfigError(
                f"hub.{key} sets --qairt_version; set hub.qairt_version instead (it reaches "
                "compile, profile and inference jobs alike and keys the job ledger)"
            )
    lowered = [c for c in s.track.components() if s.precision.of(c) != "fp32"]
    lint = s.export.lint if s.export.lint is not None else "error"
    if hub.quantize_io and lowered and lint == "error" and not s.track.quantized_io():
        raise ConfigError(
            f"hub.quantize_io=true compiles {', '.join(lowered)} with quantized (or float16) "
            "I/O, which the submission contract refuses (track.contract.quantized_io=false): "
            "export.lint=error would stop the run after its first compile job. For a "
            "measurement add export.lint=warn (lpcvlab submit refuses such a run); to submit, "
            "keep hub.quantize_io=false"
        )


def _preprocess_fits(preprocess: Any, section: str, track: str, number: int, options: str) -> None:
    """A ``preprocess`` option without the track's section (``image`` or ``video``)."""
    if getattr(preprocess, section) is None:
        raise ConfigError(
            f"preprocess={preprocess.name} has no Track {number} {section} settings, so it "
            f"cannot go with track={track}; use "
            f"preprocess={options.replace(', ', ' or preprocess=')}"
        )


def _option_fits(group: str, option: Any, kind: type, track: str, options: str) -> None:
    """A ``group`` option the track cannot take: one line naming it and the ones it can."""
    if not isinstance(option, kind):
        verb = "read" if group == "data" else "use"
        raise ConfigError(
            f"{group}={option.name} is {option.what}, which track={track} cannot {verb}; "
            f"use {group}={options.replace(', ', f' or {group}=')}"
        )


def _train_fits(train: Any, kind: type, track: str, number: int) -> None:
    """A ``train`` option without the track's section (``conf/train_track/<name>-<track>``)."""
    if not isinstance(train, (NoTrainConfig, kind)):
        raise ConfigError(
            f"train={train.name} has no Track {number} section (conf/train_track/"
            f"{train.name}-{track}.yaml), so it cannot go with track={track}; use "
            "train=finetune or train=none"
        )


def _check_retrieval(s: RunConfig) -> None:
    _preprocess_fits(s.preprocess, "image", "retrieval", 1, TRACK1_PREPROCESS)
    _option_fits("backbone", s.backbone, ClipBackboneConfig, "retrieval", TRACK1_BACKBONES)
    check_clip_levers(s.backbone)
    _option_fits("data", s.data, RetrievalDataConfig, "retrieval", TRACK1_DATA)
    _train_fits(s.train, RetrievalFinetuneConfig, "retrieval", 1)
    if s.data.root is None:
        d = s.data
        raise ConfigError(
            f"data={d.name} needs data.root=/path/to/track1 (the folder with "
            f"{d.img_list}, {d.txt_list} and {d.images_dir}/)"
        )
    if isinstance(s.train, RetrievalFinetuneConfig) and s.data.train.root is None:
        t = s.data.train
        layout = (
            f"{t.annotations} and {t.images_dir}/"
            if t.format == "coco"
            else f"{t.img_list}, {t.txt_list} and {t.images_dir}/"
        )
        raise ConfigError(
            f"train=finetune needs a training split: set data.train.root=/path/to/train (the "
            f"folder with {layout}; data.train.format=coco reads COCO-captions JSON)"
        )
    if isinstance(s.train, RetrievalFinetuneConfig):
        devices = s.train.trainer.get("devices", 1)
        if _several_devices(devices) or int(s.train.trainer.get("num_nodes", 1) or 1) > 1:
            raise ConfigError(
                f"train.trainer.devices={devices} with track=retrieval: Track 1 trains on one "
                "device (its contrastive loss and the validation's Recall@10 are not gathered "
                "across processes); use train.trainer.devices=1 (several devices: track=video)"
            )


def vision_cfg(backbone: ClipBackboneConfig) -> dict:
    """The vision tower's config: ``model_cfg``'s, or open_clip's JSON for a named model (read
    from the installed package's files: no torch import at compose time)."""
    if backbone.model_cfg is not None:
        return dict(backbone.model_cfg.get("vision_cfg", {}))
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.find_spec("open_clip")
    roots = spec.submodule_search_locations if spec is not None else None
    path = Path(list(roots)[0]) / "model_configs" / f"{backbone.model_name}.json" if roots else None
    if path is None or not path.is_file():
        return {}
    return dict(json.loads(path.read_text()).get("vision_cfg", {}))


def check_clip_levers(backbone: ClipBackboneConfig) -> None:
    """``backbone.image_size`` needs an open_clip ViT tower and a multiple of its patch size."""
    size = backbone.image_size
    if size is None:
        return
    vision = vision_cfg(backbone)
    patch = vision.get("patch_size")
    if not patch or "timm_model_name" in vision:
        raise ConfigError(
            f"backbone.image_size={size}: backbone={backbone.name}'s image tower is not an "
            "open_clip ViT with a positional embedding to interpolate; leave "
            "backbone.image_size=null (set preprocess.image.size to resize its input)"
        )
    if size % int(patch):
        lower, upper = size // patch * patch, (size // patch + 1) * patch
        raise ConfigError(
            f"backbone.image_size={size} is not a multiple of backbone={backbone.name}'s patch "
            f"size {patch}; use backbone.image_size={lower or upper} or {upper}"
        )


def _check_video(s: RunConfig) -> None:
    _preprocess_fits(s.preprocess, "video", "video", 2, TRACK2_PREPROCESS)
    _option_fits("backbone", s.backbone, VideoBackboneConfig, "video", TRACK2_BACKBONES)
    _option_fits("data", s.data, VideoDataConfig, "video", TRACK2_DATA)
    _train_fits(s.train, VideoFinetuneConfig, "video", 2)
    if s.data.root is None:
        d = s.data
        raise ConfigError(
            f"data={d.name} needs data.root=/path/to/qevd (with {d.train_split}/ and "
            f"{d.val_split}/ class folders; `lpcvlab qevd organise` makes that layout)"
        )
    if isinstance(s.train, VideoFinetuneConfig):
        _check_relaunch(s.train)


# Lightning strategies that start their other processes by running the command line again.
RELAUNCHING = ("auto", "ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")


def _several_devices(devices: object) -> bool:
    if isinstance(devices, (list, tuple)):
        return len(devices) > 1
    return str(devices).strip() not in ("1", "[0]")


def _check_relaunch(train: VideoFinetuneConfig) -> None:
    """Lightning's ``ddp`` runs the command line again for its other processes: in a sweep
    that would be the whole sweep. Refused there unless a launcher already started one process
    per device (srun / submitit tasks, torchrun)."""
    import os

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    strategy = str(train.trainer.get("strategy", "auto"))
    if strategy not in RELAUNCHING or not _several_devices(train.trainer.get("devices", 1)):
        return
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    external = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 or "RANK" in os.environ
    if not external:
        raise ConfigError(
            f"train.trainer.strategy={strategy} with train.trainer.devices="
            f"{train.trainer.get('devices')} starts its other processes by running the command "
            "line again, which in a sweep (-m) runs the whole sweep again; in sweeps use "
            "train.trainer.strategy=ddp_spawn (docs/scaling.md)"
        )
