"""open_clip backbones for Track 1 and their export wrappers.

``backbone.pretrained`` is an open_clip tag (resolved from the local cache only: the Hugging Face
cache or open_clip's URL cache), a checkpoint file path, or null (random init).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from lpcvlab.config.schema import ClipBackboneConfig
from lpcvlab.config.teacher import CHECKPOINT_KEY, Teacher
from lpcvlab.config.weights import clip_cache_lookup
from lpcvlab.errors import ConfigError
from lpcvlab.models.weights import RANDOM, looks_like_path, warn_random_weights

log = logging.getLogger(__name__)

CONTEXT_LENGTH = 77


def _cached_checkpoint(model_name: str, tag: str, cache_dir: str | None) -> str | None:
    """Path of the tag's checkpoint if it is already on disk; no network access."""
    found = clip_cache_lookup(model_name, tag, cache_dir).found
    return str(found) if found is not None else None


@contextlib.contextmanager
def _quiet_root() -> Iterator[None]:
    """open_clip narrates model creation at INFO on the root logger; keep its warnings only."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


class ClipBackbone:
    """The backbone factory of Track 1: builds the open_clip model of a typed backbone config
    (weights from the local cache or a file, never the network) and its tokenizer."""

    def __init__(self, settings: ClipBackboneConfig) -> None:
        self.settings = settings
        self.name = settings.name

    @property
    def context_length(self) -> int:
        """The text encoder's input length (``backbone.context_length``, else 77)."""
        return int(self.settings.context_length or CONTEXT_LENGTH)

    def build(self) -> tuple[nn.Module, str]:
        """(model in eval mode, weights description: tag, path or ``random``)."""
        model, _, weights = build_clip(self.settings)
        return model, weights

    def build_with_original(self) -> tuple[nn.Module, str, nn.Module | None]:
        """:meth:`build`, and the model before ``backbone.activation`` swapped its MLP
        activation (None when nothing was swapped): what the swap costs is measured on it."""
        with _quiet_root():
            model, _, weights = _build_clip(_typed(self.settings), swap=False)
        if self.settings.activation is None:
            return model, weights, None
        original = copy.deepcopy(model)
        swap_activation(model, self.settings.activation)
        return model, weights, original

    def tokenizer(self) -> Any:
        return tokenizer_for(self.settings)


def build_clip(backbone: ClipBackboneConfig) -> tuple[nn.Module, Any, str]:
    """(model in eval mode, tokenizer, weights description) for a ``backbone`` config."""
    with _quiet_root():
        return _build_clip(_typed(backbone))


def _typed(backbone: Any) -> ClipBackboneConfig:
    """A typed backbone config (a mapping is accepted, for scripts and tests)."""
    if isinstance(backbone, ClipBackboneConfig):
        return backbone
    from omegaconf import OmegaConf

    node = OmegaConf.merge(OmegaConf.structured(ClipBackboneConfig), backbone)
    return OmegaConf.to_object(node)  # type: ignore[return-value]


def _build_clip(backbone: ClipBackboneConfig, swap: bool = True) -> tuple[nn.Module, Any, str]:
    """The model with its weights, then :func:`adapt_clip`'s levers (``swap``: the activation
    too)."""
    model, tokenizer, weights = _build_weights(backbone)
    return adapt_clip(model, backbone, swap=swap), tokenizer, weights


def _build_weights(backbone: ClipBackboneConfig) -> tuple[nn.Module, Any, str]:
    name = backbone.model_name
    tokenizer = tokenizer_for(backbone)
    model_cfg = backbone.model_cfg
    pretrained = backbone.pretrained
    cache_dir = backbone.cache_dir
    if model_cfg is not None:  # a custom architecture (clip_tiny): nothing to download
        model = open_clip.CLIP(**model_cfg)
        weights = RANDOM
        if pretrained:
            _load_file(model, pretrained)
            weights = str(pretrained)
        else:
            warn_random_weights(f"{backbone.name} ({name})", "backbone.pretrained is null")
        return model.eval(), tokenizer, weights

    if pretrained is None:
        model = open_clip.create_model(name, pretrained=None)
        warn_random_weights(f"{backbone.name} ({name})", "backbone.pretrained is null")
        return model.eval(), tokenizer, RANDOM
    pretrained = str(pretrained)
    if looks_like_path(pretrained):
        model = open_clip.create_model(
            name, pretrained=None, force_quick_gelu=bool(backbone.quick_gelu)
        )
        _load_file(model, pretrained)
        return model.eval(), tokenizer, pretrained
    path = _cached_checkpoint(name, pretrained, cache_dir)
    quick_gelu = bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
    model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    if path is None:
        warn_random_weights(
            f"{backbone.name} ({name})",
            f"open_clip weights {pretrained!r} are not in the local cache and nothing is "
            "downloaded at run time; put the checkpoint in the cache or set "
            "backbone.pretrained=/path/to/checkpoint",
        )
        return model.eval(), tokenizer, RANDOM
    log.info("loading %s weights %r from %s", name, pretrained, path)
    open_clip.load_checkpoint(model, path)
    return model.eval(), tokenizer, pretrained


def _load_file(model: nn.Module, path: str) -> None:
    if not Path(path).is_file():
        raise ConfigError(f"backbone.pretrained={path}: no such checkpoint file")
    log.info("loading weights from %s", path)
    open_clip.load_checkpoint(model, path)


class ImageEncoder(nn.Module):
    """``image`` (1,3,H,W) in [0,1] as the organisers upload it -> image embedding.

    When ``mean``/``std`` are given they are applied inside the graph, so that the deployed model
    takes exactly the tensor the organisers send.
    """

    def __init__(self, model: nn.Module, mean=None, std=None) -> None:
        super().__init__()
        self.model = model
        self.normalize = mean is not None
        if self.normalize:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            image = (image - self.mean) / self.std
        return self.model.encode_image(image)


class TextEncoder(nn.Module):
    """``text`` (1,77) int64 CLIP tokens -> text embedding (EOT pooled at the argmax token)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(text)


def tokenizer_for(backbone: Any) -> Any:
    """The CLIP BPE tokenizer of a backbone (a config, or a mapping with ``model_name`` and
    optionally ``tokenizer``), without building the model."""
    if isinstance(backbone, ClipBackboneConfig):
        name = backbone.tokenizer or backbone.model_name
    else:
        name = backbone.get("tokenizer") or backbone["model_name"]
    with _quiet_root():
        tokenizer = open_clip.get_tokenizer(name)
    length = (
        backbone.context_length
        if isinstance(backbone, ClipBackboneConfig)
        else backbone.get("context_length")
    )
    if length:  # the tokenizer pads / truncates to it when called without a length
        tokenizer.context_length = int(length)
    return tokenizer


class GeluSigmoid(nn.Module):
    """``x * sigmoid(1.702 x)``: GELU without ``Erf`` (what ``export.rewrites=[gelu_sigmoid]``
    makes of an exported graph), here in the model, so fine-tuning adapts to it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_sigmoid": GeluSigmoid}


def _is_activation(module: nn.Module) -> bool:
    return isinstance(module, (nn.GELU, nn.ReLU, GeluSigmoid, open_clip.transformer.QuickGELU))


def swap_activation(model: nn.Module, activation: str) -> int:
    """Replace every GELU-like activation module (GELU, QuickGELU, ReLU, GeluSigmoid) by
    ``activation``; returns how many were replaced."""
    make = _ACTIVATIONS[activation]
    swapped = 0
    for parent in list(model.modules()):
        for key, child in list(parent.named_children()):
            if _is_activation(child):
                setattr(parent, key, make())
                swapped += 1
    return swapped


def _resize_image_tower(model: nn.Module, size: int) -> None:
    """The ViT's positional embedding interpolated to the grid of ``size`` (bicubic with
    antialiasing, the class token kept, as open_clip's ``resize_pos_embed`` does)."""
    visual = getattr(model, "visual", None)
    pos = getattr(visual, "positional_embedding", None)
    conv = getattr(visual, "conv1", None)
    if pos is None or conv is None:
        raise ConfigError(
            f"backbone.image_size={size}: this image tower has no ViT positional embedding; "
            "leave backbone.image_size=null"
        )
    patch = int(conv.kernel_size[0])
    grid = size // patch
    old = int(round(math.sqrt(pos.shape[0] - 1)))
    if grid != old:
        token, cells = pos.data[:1], pos.data[1:]
        cells = cells.reshape(1, old, old, -1).permute(0, 3, 1, 2)
        cells = F.interpolate(
            cells, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False
        )
        cells = cells.permute(0, 2, 3, 1).reshape(grid * grid, -1)
        visual.positional_embedding = nn.Parameter(torch.cat([token, cells]))
    visual.grid_size = (grid, grid)
    visual.image_size = (size, size)


def _cut_text_tower(model: nn.Module, length: int) -> None:
    """The text positional embedding and causal mask cut to the first ``length`` positions."""
    tower = getattr(model, "text", model)  # CustomTextCLIP keeps its text tower apart
    pos = getattr(tower, "positional_embedding", None)
    if pos is None or pos.shape[0] < length:
        raise ConfigError(
            f"backbone.context_length={length}: the text tower has "
            f"{None if pos is None else pos.shape[0]} positions; use a smaller length or null"
        )
    tower.positional_embedding = nn.Parameter(pos.data[:length].clone())
    mask = getattr(tower, "attn_mask", None)
    if mask is not None:
        tower.register_buffer("attn_mask", mask[:length, :length].clone(), persistent=False)
    tower.context_length = length
    if hasattr(tower, "num_pos"):
        tower.num_pos = length


def adapt_clip(model: nn.Module, backbone: ClipBackboneConfig, swap: bool = True) -> nn.Module:
    """Apply the backbone's device levers to a built model (weights already in): the image
    side, the text length and (``swap``) the MLP activation."""
    if backbone.image_size is not None:
        _resize_image_tower(model, int(backbone.image_size))
    if backbone.context_length is not None:
        _cut_text_tower(model, int(backbone.context_length))
    if swap and backbone.activation is not None:
        n = swap_activation(model, backbone.activation)
        log.info("backbone.activation=%s: %d activation module(s) swapped", backbone.activation, n)
    return model.eval()


# The attribute under which Track 1's LightningModule holds the open_clip model: its checkpoint
# keys start with this (lpcvlab.training.contrastive.ContrastiveModule).
CHECKPOINT_PREFIX = "model."


def build_architecture(backbone: ClipBackboneConfig) -> nn.Module:
    """The backbone's architecture with fresh weights, nothing loaded and no banner: the weights
    of a checkpoint go in next."""
    with _quiet_root():
        return adapt_clip(_architecture(backbone), backbone)


def _architecture(backbone: ClipBackboneConfig) -> nn.Module:
    if backbone.model_cfg is not None:
        return open_clip.CLIP(**backbone.model_cfg).eval()
    tag = backbone.pretrained
    quick_gelu = bool(backbone.quick_gelu)
    if tag and not looks_like_path(str(tag)):
        quick_gelu = bool(
            open_clip.get_pretrained_cfg(backbone.model_name, str(tag)).get("quick_gelu")
        )
    return open_clip.create_model(
        backbone.model_name, pretrained=None, force_quick_gelu=quick_gelu
    ).eval()


@dataclass
class ClipTeacher:
    """A distillation teacher, ready to embed: the model (eval mode), its tokenizer, what it is,
    and the input normalisation its weights expect (None: the student's own)."""

    model: nn.Module
    tokenizer: Any
    description: str
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


def _native_normalisation(backbone: ClipBackboneConfig) -> tuple[Any, Any]:
    """The mean/std an open_clip tag's weights were trained with (identity for MobileCLIP2's
    dfndr2b, CLIP's for openai); None for files, random weights and custom architectures."""
    tag = backbone.pretrained
    if backbone.model_cfg is not None or not tag or looks_like_path(str(tag)):
        return None, None
    cfg = open_clip.get_pretrained_cfg(backbone.model_name, str(tag)) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    return (tuple(mean), tuple(std)) if mean and std else (None, None)


def build_clip_teacher(teacher: Teacher) -> ClipTeacher:
    """The teacher ``train.distill.teacher`` names: a backbone option built as ``backbone=``
    builds it (weights from the local cache or a file), or an lpcvlab Track 1 checkpoint: the
    backbone recorded in it (:data:`CHECKPOINT_KEY`) with the checkpoint's weights."""
    if teacher.checkpoint is None:
        assert teacher.backbone is not None
        backbone = _typed(teacher.backbone)
        model, tokenizer, weights = build_clip(backbone)
        mean, std = _native_normalisation(backbone)
        return ClipTeacher(model, tokenizer, f"{backbone.name} ({weights})", mean, std)
    path = Path(teacher.checkpoint)
    key = f"train.distill.teacher={path}"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: one line naming it
        raise ConfigError(f"{key}: cannot read the checkpoint ({exc})") from None
    record = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(record, dict) or "backbone" not in record:
        raise ConfigError(
            f"{key}: the checkpoint does not record its backbone (no '{CHECKPOINT_KEY}' entry); "
            "use a checkpoint lpcvlab's training wrote, or a backbone option"
        )
    if record.get("track") != "retrieval":
        raise ConfigError(
            f"{key}: a track={record.get('track')} checkpoint cannot teach a track=retrieval "
            "student; use a Track 1 checkpoint or a CLIP backbone option"
        )
    backbone = _typed(record["backbone"])
    prefix = CHECKPOINT_PREFIX
    state = {
        k[len(prefix) :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)
    }
    if not state:
        raise ConfigError(f"{key}: the checkpoint holds no '{prefix}*' weights of a CLIP model")
    model = build_architecture(backbone)
    model.load_state_dict(state)
    # Trained by lpcvlab: it saw what the student sees, so it gets the student's normalisation.
    return ClipTeacher(model.eval(), tokenizer_for(backbone), f"{backbone.name} ({path})")
