"""Weights come from a local file or an existing cache, never from the network.

Without them the run goes on with random weights, says so loudly, and is tagged
``weights=random`` so that no number from it is mistaken for a real one.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

RANDOM = "random"
_BANNER = "=" * 78


def warn_random_weights(what: str, why: str) -> None:
    log.warning(
        "\n%s\nRANDOM WEIGHTS: %s is randomly initialised (%s).\n"
        "Accuracy from this run means nothing; the run is tagged weights=random.\n%s",
        _BANNER,
        what,
        why,
        _BANNER,
    )


def looks_like_path(value: str) -> bool:
    return (
        "/" in value
        or "\\" in value
        or Path(value).suffix in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"}
    )
