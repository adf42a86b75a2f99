"""Where a backbone's weights come from, settled when the config is loaded.

Nothing is downloaded at run time: ``backbone.pretrained`` is a tag looked up in a local cache
(open_clip's for Track 1, torch hub's for Track 2), a checkpoint file, or null. A value that can
never work (a tag the architecture has no weights for, a file that does not exist) stops the run
here, before any data is read, with the override that fixes it; a tag whose file is simply not in
the cache is reported here, once, with where it was looked for and the file expected, and the
run goes on with random weights (tagged ``weights=random``) as the model stage says again.
Heavy libraries (open_clip, torch) are imported only for a tag that needs them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lpcvlab.config.schema import (
    BackboneConfig,
    ClipBackboneConfig,
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


def looks_like_path(value: str) -> bool:
    """A checkpoint path rather than a tag: has a separator or a checkpoint suffix."""
    return "/" in value or "\\" in value or Path(value).suffix in CHECKPOINT_SUFFIXES


@dataclass(frozen=True)
class CacheLookup:
    """Where a tag's checkpoint was looked for: ``found`` is the file, or None."""

    tag: str
    found: Path | None
    places: tuple[str, ...]  # "<folder> (file <name>)" for each place looked


def clip_cache_lookup(model_name: str, tag: str, cache_dir: str | None) -> CacheLookup:
    """Look for open_clip tag ``tag`` of ``model_name`` in the Hugging Face cache and in
    open_clip's URL cache; never touches the network. An unknown tag is a ConfigError."""
    import open_clip

    pcfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ConfigError(
            f"backbone.pretrained={tag!r} is not an open_clip tag for {model_name}; use one of "
            f"its tags ({', '.join(tags)}) as backbone.pretrained=TAG, a checkpoint path, or "
            "backbone.pretrained=null"
        )
    places: list[str] = []
    hf = pcfg.get("hf_hub", "")
    if hf:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, filename = os.path.split(hf)
        names = (
            [filename]
            if filename
            else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        )
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


def kinetics_lookup(arch: str) -> CacheLookup:
    """Look for torchvision's Kinetics-400 checkpoint of ``arch`` in the torch hub cache."""
    import torch
    import torchvision.models.video as tvv

    enum = getattr(tvv, _KINETICS_ENUMS[arch])
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / Path(enum.KINETICS400_V1.url).name
    found = path if path.is_file() else None
    return CacheLookup(KINETICS, found, (f"{folder} (file {path.name})",))


def check_weights(backbone: BackboneConfig) -> None:
    """Refuse a ``backbone.pretrained`` that can never load: a tag for a backbone that has no
    published weights, another track's tag, a checkpoint file that is not there. Cheap (no
    imports), so it runs with the other combination checks."""
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


def report_weights(backbone: BackboneConfig) -> CacheLookup | None:
    """Look a ``backbone.pretrained`` tag up in its cache once the config has passed every
    other check (it imports open_clip or torch, so a mistake elsewhere is reported first): an
    unknown open_clip tag is a ConfigError; a file not in the cache is reported, once per
    process, with where it was looked for and the file expected. None for null or a path."""
    value = backbone.pretrained
    if value is None or looks_like_path(str(value)):
        return None
    value = str(value)
    if isinstance(backbone, ClipBackboneConfig) and backbone.model_cfg is None:
        lookup = clip_cache_lookup(backbone.model_name, value, backbone.cache_dir)
    elif isinstance(backbone, VideoBackboneConfig) and backbone.arch in _KINETICS_ENUMS:
        lookup = kinetics_lookup(backbone.arch)
    else:
        return None
    name = backbone.name
    if lookup.found is None and (name, value) not in _reported:
        _reported.add((name, value))
        log.warning(
            "backbone.pretrained=%s (backbone=%s): the weights are not on this machine and "
            "nothing is downloaded; looked in %s. Put the file there (or give "
            "backbone.pretrained=/path/to/checkpoint), or set backbone.pretrained=null to run "
            "with random weights on purpose. This run goes on with RANDOM weights "
            "(tagged weights=random).",
            value,
            name,
            " and in ".join(lookup.places),
        )
    return lookup
