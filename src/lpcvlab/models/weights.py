"""Loading weights at the model stage: fetching a missing tag, saying what was loaded, and
checking the loaded model against the weights' authors' code (reference parity).

What the weights are and expect is settled when the config is loaded
(:mod:`lpcvlab.config.weights`); here a tag missing from the cache is fetched with the library
that owns it (``huggingface_hub`` through open_clip, torch hub through torchvision), with its
progress bar, into the standard caches. Without them the run goes on with random weights, says
so loudly, and is tagged ``weights=random`` so that no number from it is mistaken for a real one.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lpcvlab.config.weights import Fetch, WeightsPlan, hf_files, normalization_text
from lpcvlab.types import ReferenceParity
from lpcvlab.util import console

log = logging.getLogger(__name__)

RANDOM = "random"
_BANNER = "=" * 78
# A value under this fails the run (lpcvlab's model against the authors' on the same weights).
REFERENCE_COSINE_MIN = 0.9999
REFERENCE_SAMPLES = 2  # inputs per component: it runs in every run, so a few


def warn_random_weights(what: str, why: str) -> None:
    log.warning(
        "\n%s\nRANDOM WEIGHTS: %s is randomly initialised (%s).\n"
        "Accuracy from this run means nothing; the run is tagged weights=random.\n%s",
        _BANNER,
        what,
        why,
        _BANNER,
    )


def announce(source: str) -> None:
    """The one line that says which weights a run loaded."""
    console.stage("weights", source)


class _DropRandomInit(logging.Filter):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" for every model it
    builds without a tag; lpcvlab builds that way and loads the file itself (or says RANDOM
    WEIGHTS in its own banner), so the line is never true as printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def quiet_open_clip() -> Iterator[None]:
    """open_clip narrates model creation at INFO on the root logger: keep its warnings only,
    without its "initialized randomly" line."""
    root = logging.getLogger()
    level = root.level
    drop = _DropRandomInit()
    root.setLevel(max(level, logging.WARNING))
    handlers = list(root.handlers)
    for h in handlers:
        h.addFilter(drop)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        for h in handlers:
            h.removeFilter(drop)
        root.setLevel(level)


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """torch warns that ``torch.jit`` is deprecated on every load: OpenAI's archives are
    TorchScript, and reading them is the point."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit", category=FutureWarning)
        yield


# --------------------------------------------------------------------------- fetching


class FetchFailed(Exception):
    """A tag's file could not be fetched (no network, a refused request): the caller goes on
    with random weights and says why."""


def fetch_clip(model_name: str, tag: str, cache_dir: str | None) -> Path:
    """Fetch open_clip tag ``tag`` of ``model_name`` as open_clip does (``huggingface_hub``,
    its safetensors first), into the Hugging Face cache (or ``cache_dir``)."""
    import open_clip
    from open_clip.pretrained import download_pretrained

    pcfg = open_clip.get_pretrained_cfg(model_name, tag)
    if pcfg.get("hf_hub"):
        _reachable(*hf_files(pcfg))
    try:
        found = download_pretrained(pcfg, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - offline, refused, not found: all end the same way
        raise FetchFailed(_first_line(exc)) from None
    if not found or not Path(found).is_file():
        raise FetchFailed("open_clip returned no file")
    return Path(found)


def _reachable(repo: str, names: list[str]) -> None:
    """One request, no retries: without network huggingface_hub would retry each file for
    half a minute before giving up."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    try:
        get_hf_file_metadata(hf_hub_url(repo, names[0]), timeout=10)
    except HfHubHTTPError:
        return  # the Hub answered (a file it does not have): open_clip tries the others
    except Exception as exc:  # noqa: BLE001 - no answer at all: no network
        raise FetchFailed(f"no answer from the Hugging Face Hub ({_first_line(exc)})") from None


def fetch_kinetics(weights: Any) -> Path:
    """Fetch torchvision's ``weights`` (a WeightsEnum member) with torch hub, into
    ``$TORCH_HOME/hub/checkpoints``, its hash checked as torchvision checks it."""
    import torch

    try:
        torch.hub.load_state_dict_from_url(
            weights.url, progress=console.is_terminal(), check_hash=True, map_location="cpu"
        )
    except Exception as exc:  # noqa: BLE001 - offline, refused, a bad hash: all end the same way
        raise FetchFailed(_first_line(exc)) from None
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def fetch_or_warn(
    plan: WeightsPlan, what: str, fetch: Callable[[], Path]
) -> tuple[Path | None, str]:
    """The tag's file, fetched when the plan allows it; (None, why) when it is not fetched (the
    warning said so when the config was loaded) or cannot be (said here, with the command)."""
    info: Fetch | None = plan.fetch
    assert info is not None
    if not info.allowed:
        return None, f"not fetched: {info.why_not}"
    console.stage("fetch", f"{plan.pretrained} for {what} with {info.owner}")
    try:
        path = fetch()
    except FetchFailed as exc:
        log.warning(
            "backbone.pretrained=%s: fetching it with %s failed (%s); looked in %s. Fetch it "
            "with `%s` when the network is there, or give backbone.pretrained=/path/to/"
            "checkpoint. This run goes on with RANDOM weights (tagged weights=random).",
            plan.pretrained,
            info.owner,
            exc,
            " and in ".join(plan.places),
            info.command,
        )
        return None, f"fetching failed: {exc}"
    console.stage("fetch", f"{plan.pretrained} saved in {path}")
    return path, ""


# --------------------------------------------------------------------------- reference parity


@dataclass
class Reference:
    """The weights' authors' model, ready to embed the organisers' input: ``components`` maps
    each lpcvlab component to the reference's function of the same input (its own
    normalisation inside); ``model`` is for the diagnosis when they disagree."""

    description: str
    model: Any  # torch.nn.Module
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    components: dict[str, Callable[[Any], Any]]


def reference_parity(
    ours: dict[str, Callable[[Any], Any]],
    ours_model: Any,
    ours_norm: tuple[Any, Any],
    reference: Reference,
    inputs: dict[str, Any],
) -> ReferenceParity:
    """Each component's outputs against the reference's on the same ``inputs`` (torch
    tensors): the minimum cosine, and when it is under :data:`REFERENCE_COSINE_MIN` or the
    activation or normalisation differ, what differs (activation, normalisation, weights)."""
    import torch
    import torch.nn.functional as F

    cosines: dict[str, float] = {}
    with torch.no_grad():
        for name, fn in ours.items():
            x = inputs[name]
            a = fn(x).float().flatten(1)
            b = reference.components[name](x).float().flatten(1)
            cosines[name] = float(F.cosine_similarity(a, b, dim=1).min())
    structural = _structural(ours_model, ours_norm, reference)
    differences: dict[str, list[str]] = {}
    for name, cos in cosines.items():
        found = list(structural)
        if cos < REFERENCE_COSINE_MIN:
            found += _weights_differ(ours_model, reference.model)
        if cos < REFERENCE_COSINE_MIN or structural:
            differences[name] = found or [
                "nothing found in the activation, normalisation or weights"
            ]
    return ReferenceParity(
        reference=reference.description,
        cosine_min=cosines,
        samples=min(len(v) for v in inputs.values()),
        differences=differences,
        threshold=REFERENCE_COSINE_MIN,
    )


_ACTIVATION_NAMES = ("GELU", "QuickGELU", "GeluSigmoid", "ReLU", "SiLU", "GELUTanh")


def _activations(model: Any) -> Counter:
    return Counter(
        type(m).__name__ for m in model.modules() if type(m).__name__ in _ACTIVATION_NAMES
    )


def _structural(ours_model: Any, ours_norm: tuple[Any, Any], reference: Reference) -> list[str]:
    found = []
    mine, theirs = _activations(ours_model), _activations(reference.model)
    if mine != theirs:
        found.append(f"activation: lpcvlab {_counts(mine)}, reference {_counts(theirs)}")
    a = normalization_text(*_normal(ours_norm))
    b = normalization_text(*_normal((reference.mean, reference.std)))
    if a != b:
        found.append(f"normalisation: lpcvlab {a}, reference {b}")
    return found


def _normal(pair: tuple[Any, Any]) -> tuple[Any, Any]:
    """Identity and none are the same normalisation."""
    mean, std = pair
    if mean is None or std is None:
        return None, None
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if all(abs(v) < 1e-6 for v in mean) and all(abs(v - 1) < 1e-6 for v in std):
        return None, None
    return mean, std


def _counts(c: Counter) -> str:
    return ", ".join(f"{n} x{k}" for n, k in sorted(c.items())) or "none"


def _weights_differ(ours: Any, reference: Any, limit: int = 3) -> list[str]:
    mine, theirs = ours.state_dict(), reference.state_dict()
    found = []
    only_mine = sorted(set(mine) - set(theirs))
    only_theirs = sorted(set(theirs) - set(mine))
    if only_mine or only_theirs:
        found.append(
            f"weights: keys only in lpcvlab's {only_mine[:limit]}, only in the reference's "
            f"{only_theirs[:limit]}"
        )
    diff = []
    for k in sorted(set(mine) & set(theirs)):
        a, b = mine[k], theirs[k]
        if a.shape != b.shape:
            diff.append(f"{k} shape {tuple(a.shape)} vs {tuple(b.shape)}")
        elif a.is_floating_point() and not bool((a.float() == b.float()).all()):
            diff.append(f"{k} (max |diff| {float((a.float() - b.float()).abs().max()):.3g})")
    if diff:
        found.append(f"weights: {len(diff)} tensor(s) differ, e.g. {'; '.join(diff[:limit])}")
    return found
