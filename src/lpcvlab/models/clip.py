"""open_clip backbones for Track 1 and their export wrappers.

``backbone.pretrained`` is an open_clip tag (from the Hugging Face cache or open_clip's URL
cache, fetched there on first use), a checkpoint file (an OpenAI TorchScript archive, a state
dict, a ``.safetensors`` file, an lpcvlab training checkpoint), or null (random init). What the
file is, and the activation and normalisation of the weights, were settled when the config was
loaded (:func:`lpcvlab.config.weights.plan_weights`); :func:`clip_reference` builds the same
weights with open_clip's own entry points, which every run's reference parity compares against.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from lpcvlab.config import as_schema
from lpcvlab.config.schema import ClipBackboneConfig
from lpcvlab.config.teacher import CHECKPOINT_KEY, Teacher
from lpcvlab.config.weights import (
    ARCHIVE,
    LPCVLAB,
    TAG,
    WeightsPlan,
    looks_like_path,
    normalization_text,
    plan_weights,
    published_clip,
)
from lpcvlab.errors import ConfigError
from lpcvlab.models.weights import (
    RANDOM,
    Reference,
    announce,
    fetch_clip,
    fetch_or_warn,
    quiet_open_clip,
    quiet_torchscript,
    warn_random_weights,
)

log = logging.getLogger(__name__)

CONTEXT_LENGTH = 77
# What an OpenAI archive's state dict holds beside the weights (load_openai_model reads them).
_ARCHIVE_EXTRAS = ("input_resolution", "context_length", "vocab_size")


_quiet_root = quiet_open_clip  # open_clip's INFO narration and "initialized randomly" line


@dataclass
class LoadedClip:
    """A CLIP model with its weights in and no lever applied, what they are (``weights``: the
    tag, the path or ``random``) and the plan that loaded them."""

    model: nn.Module
    weights: str
    plan: WeightsPlan


class ClipBackbone:
    """The backbone factory of Track 1: builds the open_clip model of a typed backbone config
    (weights from the cache, fetched on first use, or a file) and its tokenizer.

    ``loaded`` keeps the model as loaded, before any lever, for the run's reference parity
    (:meth:`take_loaded`): the model itself when no lever changes it, else a copy.
    """

    def __init__(self, settings: ClipBackboneConfig, plan: WeightsPlan | None = None) -> None:
        self.settings = settings
        self.name = settings.name
        self.plan = plan or plan_weights(settings)
        self.loaded: LoadedClip | None = None

    @property
    def context_length(self) -> int:
        """The text encoder's input length (``backbone.context_length``, else 77)."""
        return int(self.settings.context_length or CONTEXT_LENGTH)

    def build(self) -> tuple[nn.Module, str]:
        """(model in eval mode, weights description: tag, path or ``random``)."""
        model, weights, _ = self.build_with_original()
        return model, weights

    def build_with_original(self) -> tuple[nn.Module, str, nn.Module | None]:
        """:meth:`build`, and the model before ``backbone.activation`` swapped its MLP
        activation (None when nothing was swapped): what the swap costs is measured on it."""
        s = as_schema(self.settings, ClipBackboneConfig)
        with _quiet_root():
            loaded = load_clip(s, self.plan)
        levers = s.image_size is not None or s.context_length is not None
        pristine = copy.deepcopy(loaded.model) if levers or s.activation else loaded.model
        self.loaded = LoadedClip(pristine, loaded.weights, loaded.plan)
        model = adapt_clip(loaded.model, s, swap=False)
        if s.activation is None:
            return model, loaded.weights, None
        original = copy.deepcopy(model) if levers else pristine  # neither is changed again
        swap_activation(model, s.activation)
        return model, loaded.weights, original

    def take_loaded(self) -> LoadedClip:
        """The model as loaded (see the class docstring), handed over once."""
        if self.loaded is None:
            raise RuntimeError("build the model first")
        loaded, self.loaded = self.loaded, None
        return loaded

    def tokenizer(self) -> Any:
        return tokenizer_for(self.settings)


def build_clip(
    backbone: ClipBackboneConfig, plan: WeightsPlan | None = None
) -> tuple[nn.Module, Any, str]:
    """(model in eval mode, tokenizer, weights description) for a ``backbone`` config."""
    typed = as_schema(backbone, ClipBackboneConfig)
    with _quiet_root():
        loaded = load_clip(typed, plan)
    return adapt_clip(loaded.model, typed), tokenizer_for(typed), loaded.weights


def _new_model(backbone: ClipBackboneConfig, quick_gelu: bool) -> nn.Module:
    """The architecture with fresh weights and the given activation."""
    if backbone.model_cfg is not None:  # a custom architecture (clip_tiny)
        return open_clip.CLIP(**{**backbone.model_cfg, "quick_gelu": quick_gelu})
    return open_clip.create_model(backbone.model_name, pretrained=None, force_quick_gelu=quick_gelu)


def load_clip(backbone: ClipBackboneConfig, plan: WeightsPlan | None = None) -> LoadedClip:
    """The model with its weights as the plan says (fetching a missing tag when allowed), in
    eval mode, no lever applied; a file that does not fit the architecture is a ConfigError."""
    plan = plan or plan_weights(backbone)
    name = backbone.model_name
    what = f"{backbone.name} ({name})"
    model = _new_model(backbone, bool(plan.quick_gelu))
    if plan.pretrained is None:
        warn_random_weights(what, "backbone.pretrained is null")
        return LoadedClip(model.eval(), RANDOM, plan)
    path, kind = plan.file, plan.kind
    source = "the cache"
    if path is None and plan.kind == TAG:
        path, why = fetch_or_warn(
            plan, what, lambda: fetch_clip(name, str(plan.pretrained), backbone.cache_dir)
        )
        if path is None:
            warn_random_weights(what, f"open_clip weights {plan.pretrained!r}: {why}")
            return LoadedClip(model.eval(), RANDOM, plan)
        source = "fetched"
    assert path is not None
    load_file(model, path, kind)
    plan = replace(plan, file=path, fetch=None)  # what was loaded (a fetched tag: its file)
    act = "QuickGELU" if plan.quick_gelu else "GELU"
    if plan.kind in (TAG, ARCHIVE) and plan.pretrained != str(path):
        announce(f"{plan.pretrained} ({name}, {act}) from {path} ({source})")
    else:
        announce(f"{path} ({name}, {act}; {plan.activation_from})")
    return LoadedClip(model.eval(), str(plan.pretrained), plan)


def read_state(path: Path, kind: str) -> dict[str, torch.Tensor] | None:
    """The state dict of an OpenAI archive (its extras dropped) or of an lpcvlab training
    checkpoint (the CLIP model's keys); None for the formats open_clip reads itself."""
    if kind == ARCHIVE:
        with quiet_torchscript():
            state = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        for key in _ARCHIVE_EXTRAS:
            state.pop(key, None)
        return state
    if kind == LPCVLAB:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        prefix = CHECKPOINT_PREFIX
        state = {
            k[len(prefix) :]: v
            for k, v in ckpt.get("state_dict", {}).items()
            if k.startswith(prefix)
        }
        if not state:
            raise ConfigError(f"{path}: the checkpoint holds no '{prefix}*' weights of a model")
        return state
    return None


def load_file(model: nn.Module, path: Path | str, kind: str) -> None:
    """Load a weights file of ``kind`` into ``model`` (strict); one line when it does not fit."""
    path = Path(path)
    try:
        state = read_state(path, kind)
        if state is None:
            open_clip.load_checkpoint(model, str(path))
        else:
            model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "size mismatch" in ln or "Missing" in ln), "")
        detail = detail or (lines[0] if lines else type(exc).__name__)
        raise ConfigError(
            f"backbone.pretrained={path} does not fit this architecture ({detail[:300]}); "
            "check backbone= against the checkpoint"
        ) from None


def _open_clip_name(backbone: ClipBackboneConfig) -> str:
    """The name open_clip's factory knows the architecture by: the built-in one, or a custom
    ``model_cfg`` registered with ``open_clip.add_model_config`` under a name of its hash."""
    if backbone.model_cfg is None:
        return backbone.model_name
    text = json.dumps(backbone.model_cfg, sort_keys=True)
    name = f"lpcvlab-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if open_clip.get_model_config(name) is None:
        folder = Path(tempfile.mkdtemp(prefix="lpcvlab-open-clip-"))
        (folder / f"{name}.json").write_text(text)
        open_clip.add_model_config(folder / f"{name}.json")
    return name


def clip_reference(
    backbone: ClipBackboneConfig,
    loaded: LoadedClip,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
) -> Reference:
    """The same weights built by open_clip's own entry points, with their own Normalize:
    ``load_openai_model`` for an OpenAI archive, else ``create_model_and_transforms`` with the
    file (the tag's activation and mean/std, the ones the plan settled, or ``mean``/``std``
    where the weights have none of their own). Random weights, and lpcvlab's own checkpoints,
    which open_clip cannot read, are given the loaded model's state dict."""
    plan = loaded.plan
    file = plan.file if loaded.weights != RANDOM else None
    with _quiet_root(), quiet_torchscript():
        if file is not None and plan.kind == ARCHIVE:
            model = open_clip.load_openai_model(str(file), precision="fp32", device="cpu")
            r_mean, r_std = tuple(model.visual.image_mean), tuple(model.visual.image_std)
            how = f"open_clip.load_openai_model({file}) with Normalize{_pair(r_mean, r_std)}"
        else:
            own = plan.normalization
            want_mean = own.mean if own is not None else (mean or (0.0, 0.0, 0.0))
            want_std = own.std if own is not None else (std or (1.0, 1.0, 1.0))
            by_file = file is not None and plan.kind != LPCVLAB
            name = _open_clip_name(backbone)
            model, _, val = open_clip.create_model_and_transforms(
                name,
                pretrained=str(file) if by_file else None,
                force_quick_gelu=bool(plan.quick_gelu),
                image_mean=tuple(want_mean),
                image_std=tuple(want_std),
            )
            if not by_file:
                model.load_state_dict(loaded.model.state_dict())
            r_mean, r_std = _normalize_of(val)
            source = str(file) if by_file else "lpcvlab's loaded state dict"
            how = (
                f"open_clip.create_model_and_transforms({name!r}, "
                f"pretrained={source}, force_quick_gelu={bool(plan.quick_gelu)}) with its "
                f"Normalize{_pair(r_mean, r_std)}"
            )
    model = model.float().eval()
    norm = _Normalize(r_mean, r_std)
    return Reference(
        how,
        model,
        r_mean,
        r_std,
        {
            "image_encoder": lambda x: model.encode_image(norm(x)),
            "text_encoder": lambda t: model.encode_text(t),
        },
    )


def _pair(mean: tuple, std: tuple) -> str:
    return f"({normalization_text(mean, std)})"


def _normalize_of(transform: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std of the Normalize in an open_clip image transform."""
    from torchvision.transforms import Normalize

    for t in getattr(transform, "transforms", []):
        if isinstance(t, Normalize):
            return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    raise RuntimeError("open_clip's transform has no Normalize")


class _Normalize:
    """torchvision's Normalize on a batch (N,3,H,W), as open_clip's transform applies it per
    image."""

    def __init__(self, mean: tuple, std: tuple) -> None:
        from torchvision.transforms import Normalize

        self.normalize = Normalize(mean, std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.normalize(img) for img in x])


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
    """``x * sigmoid(1.702 x)``: GELU without ``Erf`` (which the NPU compilers lack;
    ``backbone.activation=gelu_sigmoid``), swapped into the model so that fine-tuning adapts to
    it and the export holds it."""

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


def build_architecture(backbone: ClipBackboneConfig, quick_gelu: bool | None = None) -> nn.Module:
    """The backbone's architecture with fresh weights, nothing loaded and no banner: the weights
    of a checkpoint go in next. ``quick_gelu``: the activation they were trained with (None: the
    backbone's tag's, ``backbone.quick_gelu``, or the architecture's)."""
    if quick_gelu is None:
        quick_gelu = architecture_activation(backbone)
    with _quiet_root():
        return adapt_clip(_new_model(backbone, quick_gelu).eval(), backbone)


def architecture_activation(backbone: ClipBackboneConfig) -> bool:
    """QuickGELU or not, without reading any file: the tag's, ``backbone.quick_gelu``, the
    custom config's, else what every published weights of the architecture use (GELU when
    they differ)."""
    tag = backbone.pretrained
    if tag and not looks_like_path(str(tag)) and backbone.model_cfg is None:
        pcfg = open_clip.get_pretrained_cfg(backbone.model_name, str(tag)) or {}
        return bool(pcfg.get("quick_gelu", False))
    if backbone.quick_gelu is not None:
        return bool(backbone.quick_gelu)
    if backbone.model_cfg is not None:
        return bool(backbone.model_cfg.get("quick_gelu", False))
    return bool(published_clip(backbone.model_name)[0])


@dataclass
class ClipTeacher:
    """A distillation teacher, ready to embed: the model (eval mode), its tokenizer, what it is,
    and the input normalisation its weights expect (None: the student's own)."""

    model: nn.Module
    tokenizer: Any
    description: str
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


def build_clip_teacher(teacher: Teacher, demo_data: bool = False) -> ClipTeacher:
    """The teacher ``train.distill.teacher`` names: a backbone option built as ``backbone=``
    builds it (weights from the local cache or a file), or an lpcvlab Track 1 checkpoint: the
    backbone recorded in it (:data:`CHECKPOINT_KEY`) with the checkpoint's weights."""
    if teacher.checkpoint is None:
        assert teacher.backbone is not None
        backbone = as_schema(teacher.backbone, ClipBackboneConfig)
        plan = plan_weights(backbone, demo_data=demo_data)  # on demo data: nothing fetched
        model, tokenizer, weights = build_clip(backbone, plan)
        own = plan.normalization  # what its weights were trained with
        mean, std = (own.mean, own.std) if own is not None else (None, None)
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
    backbone = as_schema(record["backbone"], ClipBackboneConfig)
    prefix = CHECKPOINT_PREFIX
    state = {
        k[len(prefix) :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)
    }
    if not state:
        raise ConfigError(f"{key}: the checkpoint holds no '{prefix}*' weights of a CLIP model")
    model = build_architecture(backbone, record.get("quick_gelu"))
    model.load_state_dict(state)
    # Trained by lpcvlab: it saw what the student sees, so it gets the student's normalisation.
    return ClipTeacher(model.eval(), tokenizer_for(backbone), f"{backbone.name} ({path})")
