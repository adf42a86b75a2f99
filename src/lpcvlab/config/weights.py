"""Where a backbone's weights come from and what they expect, settled when the config is loaded.

``backbone.pretrained`` is a tag (an open_clip tag for Track 1, ``kinetics400`` for Track 2), a
checkpoint file, or null. This module decides, before any data is read:

- what a file is (:func:`inspect_checkpoint`, from its bytes, nothing executed): an OpenAI
  TorchScript archive, a PyTorch state dict (``.pt``/``.pth``/``.bin``), a ``.safetensors`` file
  or an lpcvlab training checkpoint; anything else stops the run in one line naming what was found;
- the activation the weights were trained with (:func:`plan_weights`): a tag's own, QuickGELU for
  an OpenAI archive, an ``open_clip_config.json`` beside the file, an lpcvlab checkpoint's record,
  else ``backbone.quick_gelu``, which a path for an architecture published in both activations
  (ViT-B-16, ViT-B-32) must give;
- the normalisation the weights were trained with (the tag's open_clip config or torchvision
  weights' ``transforms()``, OpenAI's for an archive, the JSON's, the checkpoint's, else what every
  published weights of the architecture use), against which an explicit one is checked;
- whether a tag missing from the cache is fetched at the model stage (``backbone.download``,
  ``HF_HUB_OFFLINE``) and, when it is not, one warning with the places looked in and the command
  that fetches the file.

open_clip, torch and torchvision are imported only when a tag or a file needs them.
"""

from __future__ import annotations

import json
import logging
import os
import pickletools
import struct
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

from lpcvlab.config.schema import (
    BackboneConfig,
    ClipBackboneConfig,
    ImagePreprocessConfig,
    RunConfig,
    TinyVideoBackboneConfig,
    VideoBackboneConfig,
)
from lpcvlab.errors import ConfigError

log = logging.getLogger(__name__)
_reported: set[tuple[str, str]] = set()  # (backbone, tag) cache misses already reported

CHECKPOINT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors", ".ckpt"}
KINETICS = "kinetics400"
# torchvision's builders' weight enums, by architecture (the file name comes from their URL).
_KINETICS_ENUMS = {
    "r2plus1d_18": "R2Plus1D_18_Weights",
    "r3d_18": "R3D_18_Weights",
    "mc3_18": "MC3_18_Weights",
}
# torchvision's video preset (R(2+1)D's Kinetics-400): what video_tiny stands in for.
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
OPEN_CLIP_CONFIG = "open_clip_config.json"  # beside the weights in open_clip's HF repositories
# Where a training checkpoint keeps what built it (lpcvlab.config.teacher.CHECKPOINT_KEY).
RECORD_KEY = "lpcvlab"
# What a weights file is (CheckpointFile.kind, WeightsPlan.kind).
ARCHIVE = "openai_archive"  # TorchScript, as OpenAI's clip.load leaves it in ~/.cache/clip
STATE_DICT = "state_dict"  # torch.save of a state dict (or open_clip's / Lightning's wrapper)
SAFETENSORS = "safetensors"
LPCVLAB = "lpcvlab_checkpoint"  # a Lightning checkpoint lpcvlab's training wrote
TAG = "tag"
NONE = "none"  # backbone.pretrained=null
_TOLERANCE = 1e-6  # two normalisations closer than this are the same


def looks_like_path(value: str) -> bool:
    """A checkpoint path rather than a tag: has a separator or a checkpoint suffix."""
    return "/" in value or "\\" in value or Path(value).suffix in CHECKPOINT_SUFFIXES


# --------------------------------------------------------------------------- what a file is


@dataclass(frozen=True)
class CheckpointFile:
    """What :func:`inspect_checkpoint` found: ``kind`` and a few words for messages."""

    path: Path
    kind: str
    what: str


_FORMATS = (
    "an OpenAI TorchScript archive, a PyTorch state dict (.pt/.pth/.bin), a .safetensors file "
    "or an lpcvlab training checkpoint (.ckpt)"
)
_LEGACY_MAGIC = bytes.fromhex("80028a0a6cfc9c46f9206aa85019")  # torch.save before zip files


def inspect_checkpoint(path: Path, key: str = "backbone.pretrained") -> CheckpointFile:
    """What the weights file ``path`` is, read from its bytes (no pickle is executed); a file
    that is none of the formats lpcvlab loads is a ConfigError naming what was found in it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)

    def refuse(found: str) -> ConfigError:
        return ConfigError(
            f"{key}={path} is not a weights file lpcvlab can load: it is {found}; give "
            f"{_FORMATS}, or backbone.pretrained=null (random weights)"
        )

    if size == 0:
        raise refuse("empty (0 bytes)")
    if zipfile.is_zipfile(path):
        return _inspect_zip(path, refuse)
    if head.startswith(_LEGACY_MAGIC):
        return CheckpointFile(path, STATE_DICT, "a PyTorch state dict (legacy format)")
    header = _safetensors_header(path, head, size)
    if header is not None:
        n = len([k for k in header if k != "__metadata__"])
        if not n:
            raise refuse("a .safetensors file holding no tensors")
        return CheckpointFile(path, SAFETENSORS, f"a .safetensors file of {n} tensors")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise refuse("a Python pickle that is not a PyTorch file (no tensors)")
    raise refuse(_describe_bytes(head))


def _inspect_zip(path: Path, refuse) -> CheckpointFile:  # noqa: ANN001 - a local closure
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        if any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in names):
            data = next((n for n in names if n.endswith("data.pkl")), None)
            strings = _pickle_strings(z.read(data))[0] if data else set()
            if not {"visual", "token_embedding"} <= strings:
                raise refuse("a TorchScript archive, but not of a CLIP model (no visual tower)")
            return CheckpointFile(path, ARCHIVE, "an OpenAI TorchScript archive")
        data = next((n for n in names if n.rsplit("/", 1)[-1] == "data.pkl"), None)
        if data is None:
            if any(n.endswith(".npy") for n in names):
                raise refuse("a NumPy .npz archive (JAX / big_vision weights)")
            listed = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise refuse(f"a zip archive without PyTorch's layout (it holds {listed})")
        strings, globals_ = _pickle_strings(z.read(data))
    if not any("rebuild_tensor" in g or "rebuild_parameter" in g for g in globals_):
        raise refuse("a PyTorch file holding no tensors")
    if RECORD_KEY in strings and "state_dict" in strings and "backbone" in strings:
        return CheckpointFile(path, LPCVLAB, "an lpcvlab training checkpoint")
    model = sorted(g for g in globals_ if _is_object(g))
    if model:
        raise refuse(
            f"a pickled Python object ({model[0]}), not a state dict; save "
            "model.state_dict() instead"
        )
    return CheckpointFile(path, STATE_DICT, "a PyTorch state dict")


# The modules a state dict's pickle may name (tensors, containers, numbers, Lightning's
# hyper-parameter containers); anything else is a pickled model object.
_PLAIN_MODULES = {"torch", "collections", "builtins", "__builtin__", "numpy", "_codecs", "enum"}
_PLAIN_MODULES |= {"pytorch_lightning", "lightning", "typing", "pathlib", "copyreg", "functools"}
_PLAIN_MODULES |= {"argparse", "omegaconf", "datetime"}


def _is_object(name: str) -> bool:
    """Whether a pickle global (``module name``) is a class of a model, not plain data."""
    module = name.split(" ")[0]
    return module.startswith("torch.nn") or module.split(".")[0] not in _PLAIN_MODULES


def _pickle_strings(data: bytes) -> tuple[set[str], set[str]]:
    """(every string, every ``module name`` global) a pickle names, read opcode by opcode."""
    strings: set[str] = set()
    globals_: set[str] = set()
    recent: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and ("STRING" in op.name or "UNICODE" in op.name):
                strings.add(str(arg))
                recent = [*recent[-1:], str(arg)]
            elif op.name == "GLOBAL":
                globals_.add(str(arg))
            elif op.name == "STACK_GLOBAL" and len(recent) == 2:
                globals_.add(f"{recent[0]} {recent[1]}")
    except Exception:  # noqa: BLE001 - a damaged pickle: what was read so far says enough
        pass
    return strings, globals_


def _safetensors_header(path: Path, head: bytes, size: int) -> dict | None:
    if len(head) < 10:
        return None
    (n,) = struct.unpack("<Q", head[:8])
    if not 2 <= n <= min(size - 8, 100 * 1024**2) or head[8:9] != b"{":
        return None
    with open(path, "rb") as f:
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return None
    return header if isinstance(header, dict) else None


def _describe_bytes(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file (unpack it first)"
    if head[257:262] == b"ustar":
        return "a tar archive (unpack it first)"
    binary = f"not a known format (it starts with bytes {head[:8].hex(' ')})"
    try:
        text = head.decode("utf-8").strip()
    except UnicodeDecodeError:
        return binary
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        return binary
    low = text.lower()
    if low.startswith("version https://git-lfs"):
        return "a Git LFS pointer, not the weights (run git lfs pull)"
    if low.startswith(("<!doctype html", "<html")):
        return "an HTML page (a failed download?)"
    first = text.splitlines()[0][:60] if text else ""
    return f"a text file starting {first!r}"


# --------------------------------------------------------------------------- the tag caches


@dataclass(frozen=True)
class CacheLookup:
    """Where a tag's checkpoint was looked for: ``found`` is the file, or None."""

    tag: str
    found: Path | None
    places: tuple[str, ...]  # "<folder> (file <name>)" for each place looked


def _pretrained_cfg(model_name: str, tag: str) -> dict:
    import open_clip

    pcfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ConfigError(
            f"backbone.pretrained={tag!r} is not an open_clip tag for {model_name}; use one of "
            f"its tags ({', '.join(tags)}) as backbone.pretrained=TAG, a checkpoint path, or "
            "backbone.pretrained=null"
        )
    return dict(pcfg)


def hf_files(pcfg: dict) -> tuple[str, list[str]]:
    """(repository, file names open_clip tries in order) of a tag's Hugging Face weights."""
    repo, filename = os.path.split(pcfg.get("hf_hub", ""))
    names = [filename] if filename else ["open_clip_model.safetensors"]
    if not filename or filename == "open_clip_pytorch_model.bin":
        names.append("open_clip_pytorch_model.bin")
    return repo, names


def clip_cache_lookup(model_name: str, tag: str, cache_dir: str | None) -> CacheLookup:
    """Look for open_clip tag ``tag`` of ``model_name`` in the Hugging Face cache and in
    open_clip's URL cache; never touches the network. An unknown tag is a ConfigError."""
    pcfg = _pretrained_cfg(model_name, tag)
    places: list[str] = []
    if pcfg.get("hf_hub"):
        from huggingface_hub import constants, try_to_load_from_cache

        repo, names = hf_files(pcfg)
        root = cache_dir or constants.HF_HUB_CACHE
        for name in names:
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return CacheLookup(tag, Path(found), tuple(places))
        places.append(f"the Hugging Face cache {root} (repo {repo}, file {' or '.join(names)})")
    url = pcfg.get("url", "")
    if url:
        folder = Path(cache_dir or os.path.expanduser("~/.cache/clip"))
        candidate = folder / os.path.basename(url)
        if candidate.is_file():
            return CacheLookup(tag, candidate, tuple(places))
        places.append(f"{folder} (file {candidate.name})")
    return CacheLookup(tag, None, tuple(places))


def kinetics_enum(arch: str):  # noqa: ANN201 - a torchvision WeightsEnum member
    """torchvision's Kinetics-400 weights of ``arch`` (its URL, its transforms)."""
    import torchvision.models.video as tvv

    return getattr(tvv, _KINETICS_ENUMS[arch]).KINETICS400_V1


def kinetics_lookup(arch: str) -> CacheLookup:
    """Look for torchvision's Kinetics-400 checkpoint of ``arch`` in the torch hub cache."""
    import torch

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / Path(kinetics_enum(arch).url).name
    found = path if path.is_file() else None
    return CacheLookup(KINETICS, found, (f"{folder} (file {path.name})",))


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Normalization:
    """A mean/std the weights were trained with, and where that was read."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str

    @property
    def identity(self) -> bool:
        return all(abs(m) < _TOLERANCE for m in self.mean) and all(
            abs(s - 1) < _TOLERANCE for s in self.std
        )

    def same(self, mean: list[float] | tuple[float, ...], std: list[float] | tuple) -> bool:
        pairs = zip((*self.mean, *self.std), (*mean, *std), strict=True)
        return all(abs(float(a) - float(b)) < _TOLERANCE for a, b in pairs)

    def text(self) -> str:
        return f"mean {_fmt(self.mean)} std {_fmt(self.std)}"


def _fmt(values: tuple[float, ...] | list[float]) -> str:
    return "(" + ", ".join(f"{float(v):.8g}" for v in values) + ")"


def normalization_text(mean: object, std: object) -> str:
    """``mean (a, b, c) std (d, e, f)``, or ``none``."""
    if mean is None or std is None:
        return "none"
    return f"mean {_fmt(mean)} std {_fmt(std)}"  # type: ignore[arg-type]


@dataclass(frozen=True)
class Fetch:
    """How a tag missing from the cache is fetched: by whom, into where, and the command."""

    owner: str  # "huggingface_hub" | "torch hub"
    target: str  # the cache it goes into
    command: str  # what a user runs to fetch it by hand
    allowed: bool  # backbone.download (null: not on demo data) and not HF_HUB_OFFLINE
    why_not: str = ""  # when not allowed


@dataclass(frozen=True)
class WeightsPlan:
    """What the model stage loads and what the weights expect (see the module docstring).

    ``file`` is what to load (None: random weights, or a tag still to fetch); ``quick_gelu`` is
    Track 1's activation (None for Track 2); ``normalization`` the weights' own (None: weights
    with none of their own: random, or an architecture nobody published).
    """

    pretrained: str | None
    kind: str
    file: Path | None
    quick_gelu: bool | None
    activation_from: str
    normalization: Normalization | None
    fetch: Fetch | None = None
    places: tuple[str, ...] = ()
    record: dict | None = None  # an lpcvlab checkpoint's record

    @property
    def activation(self) -> str:
        return "quick_gelu" if self.quick_gelu else "gelu"


def plan_weights(backbone: BackboneConfig, *, demo_data: bool = False) -> WeightsPlan:
    """The weights plan of ``backbone`` (``demo_data``: the run reads generated demo data,
    where ``backbone.download=null`` fetches nothing). ConfigError for weights that can never
    load, an activation nobody says, or an explicit value that contradicts the file's."""
    check_weights(backbone)
    if isinstance(backbone, ClipBackboneConfig):
        return _clip_plan(backbone, demo_data)
    if isinstance(backbone, VideoBackboneConfig):
        return _video_plan(backbone, demo_data)
    raise ConfigError(f"backbone={backbone.name} is not a CLIP or video backbone")


def _download(backbone: BackboneConfig, demo_data: bool) -> tuple[bool, str]:
    """(fetch a missing tag?, why not)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False, "HF_HUB_OFFLINE is set"
    if backbone.download is False:
        return False, "backbone.download=false"
    if backbone.download is None and demo_data:
        return False, "nothing is downloaded for demo data; backbone.download=true fetches it"
    return True, ""


def _clip_plan(b: ClipBackboneConfig, demo_data: bool) -> WeightsPlan:
    value = None if b.pretrained is None else str(b.pretrained)
    if b.model_cfg is not None:  # a custom architecture (clip_tiny): nobody published weights
        own = bool(b.model_cfg.get("quick_gelu", False))
        published: tuple[bool | None, Normalization | None] = (own, None)
        arch_from = "backbone.model_cfg"
    else:
        published = published_clip(b.model_name)
        arch_from = f"what every published {b.model_name} weights use"
    if value is None:
        qg = b.quick_gelu if b.quick_gelu is not None else bool(published[0])
        how = "backbone.quick_gelu" if b.quick_gelu is not None else f"the {b.model_name} config"
        return WeightsPlan(None, NONE, None, qg, how, published[1])
    if not looks_like_path(value):
        pcfg = _pretrained_cfg(b.model_name, value)
        qg = bool(pcfg.get("quick_gelu", False))
        _agree(b.quick_gelu, qg, f"tag {value}", "drop backbone.quick_gelu (a tag keeps its own)")
        lookup = clip_cache_lookup(b.model_name, value, b.cache_dir)
        norm = Normalization(
            tuple(pcfg["mean"]), tuple(pcfg["std"]), f"open_clip's config of tag {value}"
        )
        kind = TAG
        if lookup.found is not None and inspect_checkpoint(lookup.found).kind == ARCHIVE:
            kind = ARCHIVE  # OpenAI's archive in ~/.cache/clip: read as load_openai_model does
        fetch = None
        if lookup.found is None:
            allowed, why = _download(b, demo_data)
            from huggingface_hub import constants

            repo, names = hf_files(pcfg)
            where = b.cache_dir or constants.HF_HUB_CACHE
            cache = f" --cache-dir {b.cache_dir}" if b.cache_dir else ""
            fetch = Fetch(
                "huggingface_hub",
                f"{where} (repo {repo})",
                f"hf download {repo} {names[0]}{cache}",
                allowed,
                why,
            )
        return WeightsPlan(
            value, kind, lookup.found, qg, f"tag {value}", norm, fetch, lookup.places
        )
    path = Path(value).expanduser()
    found = inspect_checkpoint(path)
    if found.kind == ARCHIVE:
        _agree(b.quick_gelu, True, f"{path.name}, an OpenAI archive", "drop backbone.quick_gelu")
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        norm = Normalization(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, "OpenAI's CLIP")
        return WeightsPlan(value, ARCHIVE, path, True, "an OpenAI archive (QuickGELU)", norm)
    if found.kind == LPCVLAB:
        record = read_record(path)
        return _record_plan(b, value, path, record, published)
    beside = path.parent / OPEN_CLIP_CONFIG
    if beside.is_file():
        return _json_plan(b, value, path, found.kind, beside)
    if b.quick_gelu is not None:
        qg, how = b.quick_gelu, "backbone.quick_gelu"
    elif published[0] is not None:
        qg, how = bool(published[0]), arch_from
    else:
        raise ConfigError(
            f"backbone.pretrained={value}: {b.model_name}'s published weights come with QuickGELU "
            f"(OpenAI's) and with GELU (LAION's, DataComp's), and nothing in {found.what} says "
            f"which; add backbone.quick_gelu=true|false (true for OpenAI-trained weights)"
        )
    return WeightsPlan(value, found.kind, path, qg, how, published[1])


def _agree(given: bool | None, own: bool, where: str, fix: str) -> None:
    if given is not None and bool(given) != own:
        act = "QuickGELU" if own else "GELU"
        raise ConfigError(
            f"backbone.quick_gelu={str(given).lower()} contradicts {where}, whose weights were "
            f"trained with {act}; {fix}"
        )


def published_clip(model_name: str) -> tuple[bool | None, Normalization | None]:
    """(activation, normalisation) every published tag of ``model_name`` agrees on (None where
    they differ or there is none)."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model_name)
    cfgs = [open_clip.get_pretrained_cfg(model_name, t) for t in tags]
    acts = {bool(c.get("quick_gelu", False)) for c in cfgs}
    norms = {(tuple(c["mean"]), tuple(c["std"])) for c in cfgs if c.get("mean")}
    act = next(iter(acts)) if len(acts) == 1 else None
    if not tags:
        act = bool((open_clip.get_model_config(model_name) or {}).get("quick_gelu", False))
    norm = None
    if len(norms) == 1:
        mean, std = next(iter(norms))
        norm = Normalization(mean, std, f"what every published {model_name} weights use")
    return act, norm


def _json_plan(
    b: ClipBackboneConfig, value: str, path: Path, kind: str, beside: Path
) -> WeightsPlan:
    try:
        cfg = json.loads(beside.read_text(encoding="utf-8"))
        model_cfg = dict(cfg.get("model_cfg") or {})
        pre = dict(cfg.get("preprocess_cfg") or {})
    except (ValueError, AttributeError, TypeError) as exc:
        raise ConfigError(
            f"{beside}: not open_clip's JSON config ({exc}); fix or remove it"
        ) from None
    qg = bool(model_cfg.get("quick_gelu", False))
    _agree(b.quick_gelu, qg, str(beside), "drop backbone.quick_gelu (the JSON says)")
    norm = None
    if pre.get("mean") and pre.get("std"):
        norm = Normalization(tuple(pre["mean"]), tuple(pre["std"]), str(beside))
    else:
        norm = published_clip(b.model_name)[1] if b.model_cfg is None else None
    return WeightsPlan(value, kind, path, qg, str(beside), norm)


def read_record(path: Path) -> dict:
    """The record an lpcvlab training checkpoint keeps of what built it (mapped lazily)."""
    import pickle

    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # Lightning also pickles its callbacks' state
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    record = ckpt.get(RECORD_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("backbone"), dict):
        raise ConfigError(f"backbone.pretrained={path}: its {RECORD_KEY!r} record is damaged")
    record = dict(record)
    if "normalization" not in record:  # written before the record kept it: the video buffers
        state = ckpt.get("state_dict", {})
        if "net.mean" in state and "net.std" in state:
            mean = [float(v) for v in state["net.mean"].flatten()]
            std = [float(v) for v in state["net.std"].flatten()]
            record["normalization"] = {"mean": mean, "std": std}
    return record


def _record_plan(
    b: ClipBackboneConfig,
    value: str,
    path: Path,
    record: dict,
    published: tuple[bool | None, Normalization | None],
) -> WeightsPlan:
    trained = record["backbone"]
    if record.get("track") != "retrieval" or trained.get("model_name") != b.model_name:
        raise ConfigError(
            f"backbone.pretrained={value} was trained as track={record.get('track')} "
            f"{trained.get('name')} ({trained.get('model_name') or trained.get('arch')}), not "
            f"backbone={b.name} ({b.model_name}); use backbone={trained.get('name')}"
        )
    qg = record.get("quick_gelu", trained.get("quick_gelu"))
    if qg is None:
        qg = published[0]
    if qg is None:
        qg = b.quick_gelu
    if qg is None:
        raise ConfigError(
            f"backbone.pretrained={value}: the checkpoint does not record its activation; add "
            "backbone.quick_gelu=true|false"
        )
    _agree(b.quick_gelu, bool(qg), f"{path.name}'s record", "drop backbone.quick_gelu")
    norm = _record_normalization(record, str(path))
    how = "the checkpoint's record"
    return WeightsPlan(value, LPCVLAB, path, bool(qg), how, norm, record=record)


def _record_normalization(record: dict, source: str) -> Normalization | None:
    n = record.get("normalization")
    if not isinstance(n, dict):
        return None
    if n.get("mean") is None:  # trained without any: identity
        return Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), f"{source} (trained without)")
    return Normalization(tuple(n["mean"]), tuple(n["std"]), f"{source} (what it was trained with)")


def _video_plan(b: VideoBackboneConfig, demo_data: bool) -> WeightsPlan:
    value = None if b.pretrained is None else str(b.pretrained)
    tiny = isinstance(b, TinyVideoBackboneConfig)
    published = None
    if not tiny:
        t = kinetics_enum(b.arch).transforms()
        published = Normalization(
            tuple(t.mean), tuple(t.std), f"torchvision's {_KINETICS_ENUMS[b.arch]} transforms()"
        )
    if value is None:
        return WeightsPlan(None, NONE, None, None, "", published)
    if not looks_like_path(value):  # kinetics400 (check_weights refused anything else)
        lookup = kinetics_lookup(b.arch)
        fetch = None
        if lookup.found is None:
            import torch

            allowed, why = _download(b, demo_data)
            enum = _KINETICS_ENUMS[b.arch]
            fetch = Fetch(
                "torch hub",
                f"{torch.hub.get_dir()}/checkpoints",
                f'python -c "from torchvision.models.video import {enum} as W; '
                f'W.KINETICS400_V1.get_state_dict(progress=True)"',
                allowed,
                why,
            )
        return WeightsPlan(value, TAG, lookup.found, None, "", published, fetch, lookup.places)
    path = Path(value).expanduser()
    found = inspect_checkpoint(path)
    if found.kind == ARCHIVE:
        raise ConfigError(
            f"backbone.pretrained={value} is {found.what}, which Track 2 cannot use; give a "
            "torchvision state dict (.pth) or an lpcvlab training checkpoint (.ckpt)"
        )
    if found.kind == LPCVLAB:
        record = read_record(path)
        if record.get("track") not in (None, "video"):
            raise ConfigError(
                f"backbone.pretrained={value} was trained for track={record.get('track')}, "
                "not track=video"
            )
        norm = _record_normalization(record, str(path)) or published
        return WeightsPlan(value, LPCVLAB, path, None, "", norm, record=record)
    return WeightsPlan(value, found.kind, path, None, "", published)


# --------------------------------------------------------------------------- the checks


def check_weights(backbone: BackboneConfig) -> None:
    """Refuse a ``backbone.pretrained`` that can never load: a tag for a backbone that has no
    published weights, another track's tag, a checkpoint file that is not there or is not a
    weights file. Cheap (no imports), so it runs with the other combination checks."""
    value = backbone.pretrained
    if value is None:
        return
    value = str(value)
    name = backbone.name
    if looks_like_path(value):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"backbone.pretrained={value}: no such checkpoint file (looked for "
                f"{path.resolve()}); put the file there, or use backbone.pretrained=null "
                "(random weights)"
            )
        inspect_checkpoint(path)
        return
    tiny = isinstance(backbone, TinyVideoBackboneConfig) or (
        isinstance(backbone, ClipBackboneConfig) and backbone.model_cfg is not None
    )
    if tiny:
        raise ConfigError(
            f"backbone={name} has no published weights, so backbone.pretrained={value} cannot be "
            f"found for it; use backbone.pretrained=null (random weights) or a checkpoint path"
        )
    if isinstance(backbone, VideoBackboneConfig) and value != KINETICS:
        raise ConfigError(
            f"backbone.pretrained={value!r} is not a weights tag of backbone={name}; use "
            f"backbone.pretrained={KINETICS}, a checkpoint path, or backbone.pretrained=null"
        )


def check_normalization(
    plan: WeightsPlan,
    given: tuple[list[float], list[float]] | None,
    key: str,
    force_key: str,
    force: bool,
) -> None:
    """Refuse an explicit mean/std (``key``: where it was set) that differs from the weights'
    own, naming both and the override that forces it (``force_key``)."""
    own = plan.normalization
    if given is None or own is None or force or own.same(*given):
        return
    raise ConfigError(
        f"{key} sets {normalization_text(*given)}, but the weights "
        f"({plan.pretrained or 'random'}) were trained with {own.text()} ({own.source}); leave "
        f"the mean/std null to bake the weights' own, or force it with {force_key}=true"
    )


def resolve_image(
    image: ImagePreprocessConfig, plan: WeightsPlan
) -> tuple[ImagePreprocessConfig, str]:
    """``image`` with the mean/std the run applies filled in (the weights' own when none is
    given; none with ``normalize=false`` or an identity), and where they come from."""
    own = plan.normalization
    if not image.normalize:
        origin = "preprocess.image.normalize=false (none: the organisers' sample)"
        return replace(image, mean=None, std=None), origin
    if image.mean is not None:
        origin = "preprocess.image.mean/std"
        if own is not None and not own.same(image.mean, image.std or []):
            origin += f" (forced; the weights' own: {own.text()})"
        return image, origin
    if own is None:
        origin = "none (the weights have no normalisation of their own)"
        return replace(image, mean=None, std=None), origin
    origin = f"the weights' own ({own.source})"
    if own.identity:
        return replace(image, mean=None, std=None), origin + ": none"
    return replace(image, mean=list(own.mean), std=list(own.std)), origin


def resolve_video(backbone: VideoBackboneConfig, plan: WeightsPlan) -> tuple[tuple, tuple, str]:
    """(mean, std, where they come from) baked into the video export: as given, else the
    weights' own, else Kinetics-400's (torchvision's video preset, the official model's)."""
    own = plan.normalization
    if backbone.mean is not None and backbone.std is not None:
        mean, std = tuple(map(float, backbone.mean)), tuple(map(float, backbone.std))
        origin = "backbone.mean/std"
        if own is not None and not own.same(mean, std):
            origin += f" (forced; the weights' own: {own.text()})"
        return mean, std, origin
    if own is not None:
        return tuple(own.mean), tuple(own.std), f"the weights' own ({own.source})"
    return KINETICS_MEAN, KINETICS_STD, "Kinetics-400's (the weights have none of their own)"


def is_demo(s: RunConfig) -> bool:
    """Whether the run reads generated demo data (``backbone.download=null`` fetches nothing)."""
    return getattr(s.data, "demo", None) is not None


def run_plan(s: RunConfig) -> WeightsPlan:
    """The weights plan of a run's backbone (what :func:`plan_weights` says for it)."""
    return plan_weights(s.backbone, demo_data=is_demo(s))


def report_weights(s: RunConfig) -> WeightsPlan | None:
    """The weights plan, checked, once the config has passed every other check (it imports
    open_clip or torch, so a mistake elsewhere is reported first): an activation nobody says,
    or an explicit normalisation that differs from the weights', is a ConfigError; a tag not in
    the cache that will not be fetched is reported, once per process, with where it was looked
    for and the command that fetches it. None for backbones that need nothing looked up."""
    backbone, image = s.backbone, s.preprocess.image
    if backbone.pretrained is None and not _needs_published(backbone, image):
        return None
    plan = run_plan(s)
    if isinstance(backbone, ClipBackboneConfig) and image is not None:
        if image.normalize and image.mean is not None:
            given = (list(image.mean), list(image.std or []))
            key = f"preprocess={s.preprocess.name} (preprocess.image.mean/std)"
            force = "preprocess.image.force_normalization"
            check_normalization(plan, given, key, force, image.force_normalization)
    if isinstance(backbone, VideoBackboneConfig) and backbone.mean is not None:
        given = (list(backbone.mean), list(backbone.std or []))
        key, force = "backbone.mean/std", "backbone.force_normalization"
        check_normalization(plan, given, key, force, backbone.force_normalization)
    fetch = plan.fetch
    key = (backbone.name, str(backbone.pretrained))
    if fetch is not None and not fetch.allowed and key not in _reported:
        _reported.add(key)
        log.warning(
            "backbone.pretrained=%s (backbone=%s): the weights are not on this machine and are "
            "not fetched (%s); looked in %s. Fetch them with `%s` (or run with network access "
            "and backbone.download=true), give backbone.pretrained=/path/to/checkpoint, or set "
            "backbone.pretrained=null to run with random weights on purpose. This run goes on "
            "with RANDOM weights (tagged weights=random).",
            backbone.pretrained,
            backbone.name,
            fetch.why_not,
            " and in ".join(plan.places),
            fetch.command,
        )
    elif fetch is not None and key not in _reported:
        _reported.add(key)
        log.info(
            "backbone.pretrained=%s is not in the cache: the model stage fetches it with %s "
            "into %s",
            backbone.pretrained,
            fetch.owner,
            fetch.target,
        )
    return plan


def _needs_published(backbone: BackboneConfig, image: ImagePreprocessConfig | None) -> bool:
    """Random weights need a lookup only to check an explicit normalisation against the
    architecture's published one."""
    if isinstance(backbone, VideoBackboneConfig):
        return backbone.mean is not None and not isinstance(backbone, TinyVideoBackboneConfig)
    if isinstance(backbone, ClipBackboneConfig) and backbone.model_cfg is None:
        return image is not None and image.normalize and image.mean is not None
    return False
