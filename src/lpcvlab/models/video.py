"""torchvision video classifiers for Track 2 and their export wrapper.

``backbone.pretrained``: ``kinetics400`` (torchvision's Kinetics-400 weights, taken from the torch
hub cache only), a checkpoint path, or null (random init). The classifier head is resized to the
class map, so Kinetics weights give a pretrained trunk with a fresh head.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import video as tv_video

from lpcvlab.config.schema import TinyVideoBackboneConfig, VideoBackboneConfig
from lpcvlab.errors import ConfigError
from lpcvlab.models.weights import RANDOM, looks_like_path, warn_random_weights

log = logging.getLogger(__name__)

# R(2+1)D / R3D / MC3 were trained on Kinetics with this normalisation; it is baked into exports.
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)

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


def _cached_kinetics(weights_enum: Any) -> Path | None:
    """The torchvision checkpoint if the torch hub cache already has it; never downloads."""
    url = weights_enum.KINETICS400_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    return path if path.is_file() else None


def _replace_head(model: nn.Module, num_classes: int) -> None:
    if model.fc.out_features != num_classes:
        model.fc = nn.Linear(model.fc.in_features, num_classes)


def _load_state(model: nn.Module, path: Path, num_classes: int) -> None:
    """Load a torchvision, fine-tuned or Lightning checkpoint; a head of another size is reset."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a Lightning checkpoint also pickles its callbacks' state
        state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
        if any(k.startswith("net.model.") for k in state):
            # lpcvlab's own training checkpoint: the model inside VideoClassifier inside the
            # LightningModule; the normalisation buffers belong to the wrapper, not the model
            prefix = "net.model."
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        else:
            state = {k.removeprefix("model."): v for k, v in state.items()}
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
    head resized to the class map (weights from the torch hub cache or a file, never the
    network), and the normalisation baked into its export."""

    def __init__(self, settings: VideoBackboneConfig) -> None:
        self.settings = settings
        self.name = settings.name
        self.mean = tuple(float(v) for v in settings.mean)
        self.std = tuple(float(v) for v in settings.std)

    def build(self, num_classes: int) -> tuple[nn.Module, str]:
        """(model, weights description: ``kinetics400``, a path or ``random``)."""
        return build_video_model(self.settings, num_classes)


def _typed(backbone: Any) -> VideoBackboneConfig:
    """A typed backbone config (a mapping is accepted, for scripts and tests)."""
    if isinstance(backbone, VideoBackboneConfig):
        return backbone
    from omegaconf import OmegaConf

    schema = (
        TinyVideoBackboneConfig if backbone.get("arch") == "video_tiny" else VideoBackboneConfig
    )
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), backbone))  # type: ignore[return-value]


def build_video_model(backbone: VideoBackboneConfig, num_classes: int) -> tuple[nn.Module, str]:
    """(model, weights description) for a Track 2 ``backbone`` config."""
    backbone = _typed(backbone)
    arch = backbone.arch
    pretrained = backbone.pretrained
    if isinstance(backbone, TinyVideoBackboneConfig):
        model: nn.Module = TinyVideoNet(num_classes, width=int(backbone.width))
        builder_weights = None
    elif arch in _TORCHVISION:
        builder, builder_weights = _TORCHVISION[arch]
        model = builder(weights=None)
    else:
        raise ConfigError(
            f"backbone.arch={arch!r} is not a video model; "
            "use r2plus1d_18, r3d_18, mc3_18 or video_tiny"
        )
    if pretrained is None:
        if arch != "video_tiny":
            _replace_head(model, num_classes)
        warn_random_weights(f"{backbone.name} ({arch})", "backbone.pretrained is null")
        return model, RANDOM
    pretrained = str(pretrained)
    if looks_like_path(pretrained):
        path = Path(pretrained)
        if not path.is_file():
            raise ConfigError(f"backbone.pretrained={pretrained}: no such checkpoint file")
        if arch != "video_tiny":
            _replace_head(model, num_classes)
        _load_state(model, path, num_classes)
        return model, pretrained
    if pretrained != "kinetics400" or builder_weights is None:
        raise ConfigError(
            f"backbone={backbone.name} has no weights tagged {pretrained!r}; use "
            + ("backbone.pretrained=kinetics400, " if builder_weights is not None else "")
            + "a checkpoint path, or backbone.pretrained=null"
        )
    cached = _cached_kinetics(builder_weights)
    _replace_head(model, num_classes)
    if cached is None:
        warn_random_weights(
            f"{backbone.name} ({arch})",
            f"Kinetics-400 weights are not in the torch hub cache ({torch.hub.get_dir()}/"
            "checkpoints) and nothing is downloaded at run time; put the checkpoint there or set "
            "backbone.pretrained=/path/to/checkpoint",
        )
        return model, RANDOM
    log.info("loading Kinetics-400 weights from %s", cached)
    _load_state(model, cached, num_classes)
    return model, "kinetics400"


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
