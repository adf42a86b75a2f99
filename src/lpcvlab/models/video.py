"""torchvision video classifiers for Track 2 and their export wrapper.

``backbone.pretrained``: ``kinetics400`` (torchvision's Kinetics-400 weights, from the torch hub
cache, fetched there on first use), a checkpoint path (a torchvision state dict, or an lpcvlab
training checkpoint), or null (random init). The classifier head is resized to the class map, so
Kinetics weights give a pretrained trunk with a fresh head. :func:`video_reference` builds the
same weights with torchvision's builder and its ``weights.transforms()`` normalisation, which
every run's reference parity compares against.
"""

from __future__ import annotations

import copy
import logging
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import video as tv_video

from lpcvlab.config import as_schema
from lpcvlab.config.schema import TinyVideoBackboneConfig, VideoBackboneConfig
from lpcvlab.config.weights import (
    KINETICS_MEAN,
    KINETICS_STD,
    LPCVLAB,
    TAG,
    WeightsPlan,
    kinetics_enum,
    normalization_text,
    plan_weights,
    resolve_video,
)
from lpcvlab.errors import ConfigError
from lpcvlab.models.weights import (
    RANDOM,
    Reference,
    announce,
    fetch_kinetics,
    fetch_or_warn,
    warn_random_weights,
)

log = logging.getLogger(__name__)

_TORCHVISION = {
    "r2plus1d_18": (tv_video.r2plus1d_18, tv_video.R2Plus1D_18_Weights),
    "r3d_18": (tv_video.r3d_18, tv_video.R3D_18_Weights),
    "mc3_18": (tv_video.mc3_18, tv_video.MC3_18_Weights),
}


class TinyVideoNet(nn.Module):
    """A small 3D CNN with R(2+1)D's layer names (``stem``, ``layer3``, ``layer4``, ``fc``), so
    freezing policies and checkpoints treat it like the real backbones; for tests and demos."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int, kernel, stride) -> nn.Sequential:
            pad = tuple(k // 2 for k in kernel)
            return nn.Sequential(
                nn.Conv3d(cin, cout, kernel, stride=stride, padding=pad, bias=False),
                nn.BatchNorm3d(cout),
                nn.ReLU(inplace=True),
            )

        self.stem = block(3, width, (1, 7, 7), (1, 4, 4))  # spatial only, as R(2+1)D's stem
        self.layer3 = block(width, 2 * width, (3, 3, 3), (1, 2, 2))  # motion
        self.layer4 = block(2 * width, 4 * width, (3, 3, 3), (2, 2, 2))
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.stem(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _replace_head(model: nn.Module, num_classes: int) -> None:
    if model.fc.out_features != num_classes:
        model.fc = nn.Linear(model.fc.in_features, num_classes)


def read_video_state(path: Path) -> dict[str, torch.Tensor]:
    """The model's state dict in a torchvision, fine-tuned or Lightning checkpoint (lpcvlab's
    own: the model inside VideoClassifier inside the LightningModule)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a Lightning checkpoint also pickles its callbacks' state
        state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
        if any(k.startswith("net.model.") for k in state):
            # the normalisation buffers belong to the wrapper, not the model
            prefix = "net.model."
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        else:
            state = {k.removeprefix("model."): v for k, v in state.items()}
    return state


def _load_state(model: nn.Module, path: Path, num_classes: int) -> None:
    """Load a torchvision, fine-tuned or Lightning checkpoint; a head of another size is reset."""
    state = read_video_state(path)
    head = state.get("fc.weight")
    if head is not None and head.shape[0] != num_classes:
        log.info(
            "checkpoint head has %d classes, not %d: head re-initialised",
            head.shape[0],
            num_classes,
        )
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of the wrong shape
        first = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln][:1]
        raise ConfigError(
            f"{path}: checkpoint does not fit this backbone ({first[0] if first else exc}); "
            "check backbone= against the checkpoint"
        ) from None
    if unexpected or [k for k in missing if not k.startswith("fc.")]:
        raise ConfigError(
            f"{path}: checkpoint does not fit this backbone (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); check backbone= against the checkpoint"
        )


class VideoBackbone:
    """The backbone factory of Track 2: builds a typed backbone config's classifier with its
    head resized to the class map (weights from the torch hub cache, fetched on first use, or a
    file), and the normalisation baked into its export (the weights' own unless given).

    ``loaded`` keeps the model as loaded (a copy, before training changes it) for the run's
    reference parity."""

    def __init__(self, settings: VideoBackboneConfig, plan: WeightsPlan | None = None) -> None:
        settings = _typed(settings)  # a mapping too (a checkpoint's record)
        self.settings = settings
        self.name = settings.name
        self.plan = plan or plan_weights(settings)
        self.mean, self.std, self.normalization_from = resolve_video(settings, self.plan)
        self.loaded: tuple[nn.Module, str] | None = None

    def build(self, num_classes: int) -> tuple[nn.Module, str]:
        """(model, weights description: ``kinetics400``, a path or ``random``)."""
        model, weights, plan = load_video(self.settings, num_classes, self.plan)
        self.plan = plan or self.plan
        self.loaded = (model, weights)
        return model, weights

    def take_loaded(self) -> tuple[nn.Module, str]:
        """The model as :meth:`build` loaded it and its weights description, handed over once
        (the model itself: training works on a copy)."""
        if self.loaded is None:
            raise RuntimeError("build the model first")
        loaded, self.loaded = self.loaded, None
        return loaded


def _typed(backbone: Any) -> VideoBackboneConfig:
    """A typed backbone config (a mapping is accepted, for scripts and tests)."""
    if isinstance(backbone, VideoBackboneConfig):
        return backbone
    tiny = backbone.get("arch") == "video_tiny"
    return as_schema(backbone, TinyVideoBackboneConfig if tiny else VideoBackboneConfig)


def _new_video_model(backbone: VideoBackboneConfig, num_classes: int) -> nn.Module:
    if isinstance(backbone, TinyVideoBackboneConfig):
        return TinyVideoNet(num_classes, width=int(backbone.width))
    if backbone.arch in _TORCHVISION:
        model = _TORCHVISION[backbone.arch][0](weights=None)
        _replace_head(model, num_classes)
        return model
    raise ConfigError(
        f"backbone.arch={backbone.arch!r} is not a video model; "
        "use r2plus1d_18, r3d_18, mc3_18 or video_tiny"
    )


def load_video(
    backbone: VideoBackboneConfig, num_classes: int, plan: WeightsPlan | None = None
) -> tuple[nn.Module, str, WeightsPlan | None]:
    """(model, weights description, the plan with the file it loaded: a fetched tag's)."""
    backbone = _typed(backbone)
    arch = backbone.arch
    pretrained = backbone.pretrained
    model = _new_video_model(backbone, num_classes)
    what = f"{backbone.name} ({arch})"
    if pretrained is None:
        warn_random_weights(what, "backbone.pretrained is null")
        return model, RANDOM, plan
    if isinstance(backbone, TinyVideoBackboneConfig) and str(pretrained) == "kinetics400":
        raise ConfigError(
            f"backbone={backbone.name} has no weights tagged {pretrained!r}; use a checkpoint "
            "path, or backbone.pretrained=null"
        )
    plan = plan or plan_weights(backbone)
    path = plan.file
    source = "the torch hub cache"
    if path is None and plan.kind == TAG:
        path, why = fetch_or_warn(plan, what, lambda: fetch_kinetics(kinetics_enum(arch)))
        if path is None:
            warn_random_weights(what, f"Kinetics-400 weights: {why}")
            return model, RANDOM, plan
        source = "fetched"
    assert path is not None
    _load_state(model, path, num_classes)
    plan = replace(plan, file=path, fetch=None)
    if plan.kind == TAG:
        announce(f"{pretrained} ({arch}) from {path} ({source}), a fresh {num_classes}-class head")
    else:
        announce(f"{path} ({arch})")
    return model, str(pretrained), plan


def video_reference(
    backbone: VideoBackboneConfig,
    plan: WeightsPlan,
    model: nn.Module,
    weights: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> Reference:
    """The same weights in torchvision's own builder, normalised by its ``weights.transforms()``
    (``video_tiny``, which has no torchvision builder: a fresh TinyVideoNet, normalised by
    R(2+1)D's). The class map's head is lpcvlab's (a deliberate change): the reference gets a
    copy of it. Random weights and lpcvlab's own checkpoints are given the loaded state dict."""
    backbone = _typed(backbone)
    if isinstance(backbone, TinyVideoBackboneConfig):
        ref: nn.Module = TinyVideoNet(model.fc.out_features, width=int(backbone.width))
        ref.load_state_dict(model.state_dict())
        own = plan.normalization
        r_mean, r_std = (own.mean, own.std) if own is not None else (mean, std)
        how = f"TinyVideoNet (lpcvlab's own) with Normalize({normalization_text(r_mean, r_std)})"
    else:
        builder, enum = _TORCHVISION[backbone.arch]
        ref = builder(weights=None)
        file = plan.file if weights != RANDOM else None
        if file is not None and plan.kind == TAG:
            state = enum.KINETICS400_V1.get_state_dict(progress=False)
            source = f"{enum.__name__}.KINETICS400_V1.get_state_dict()"
        elif file is not None and plan.kind != LPCVLAB:
            state = torch.load(file, map_location="cpu", weights_only=True)
            source = str(file)
        else:
            state = model.state_dict()
            source = "lpcvlab's loaded state dict"
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        ref.load_state_dict(state, strict=False)
        ref.fc = copy.deepcopy(model.fc)
        t = enum.KINETICS400_V1.transforms()
        r_mean, r_std = tuple(t.mean), tuple(t.std)
        how = (
            f"torchvision {builder.__name__}(weights={source}) with lpcvlab's class-map head and "
            f"{enum.__name__}.KINETICS400_V1.transforms()'s "
            f"Normalize({normalization_text(r_mean, r_std)})"
        )
    ref = ref.float().eval()
    r_mean, r_std = tuple(map(float, r_mean)), tuple(map(float, r_std))

    def classify(video: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.functional import normalize

        frames = video.permute(0, 2, 1, 3, 4)  # (N, T, C, H, W), as transforms() takes them
        frames = torch.stack([normalize(f, list(r_mean), list(r_std)) for f in frames])
        return ref(frames.permute(0, 2, 1, 3, 4))

    return Reference(how, ref, r_mean, r_std, {"video_classifier": classify})


class VideoClassifier(nn.Module):
    """``video`` as the device receives it -> ``class_probs`` logits (softmax is the scorer's).

    The Kinetics mean/std live in the graph so the device takes the [0,1] clip unchanged;
    ``channel_last`` takes ``(1,T,H,W,C)`` and permutes inside the graph.
    """

    def __init__(
        self, model: nn.Module, mean=KINETICS_MEAN, std=KINETICS_STD, channel_last: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self.channel_last = channel_last
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1, 1))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if self.channel_last:
            video = video.permute(0, 4, 1, 2, 3)
        return self.model((video - self.mean) / self.std)
