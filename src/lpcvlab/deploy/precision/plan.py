"""What each component is deployed in: built once from the ``precision`` settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lpcvlab.config.schema import QUANTIZED, MixedPrecisionConfig, PrecisionConfig


@dataclass(frozen=True, eq=False)
class Calibration:
    """The inputs that calibrate a quantized component's activation ranges.

    ``source`` says where they came from: ``train`` (the training split) or ``eval_spread``
    (evaluation inputs at evenly spaced positions, when the track has no training split).
    """

    samples: np.ndarray  # (N, *input.shape[1:]) in the exported input's dtype
    sha256: str
    source: str

    def __len__(self) -> int:
        return len(self.samples)


@dataclass(frozen=True)
class ComponentPrecision:
    """One component's precision, with its calibration data when it is quantized."""

    name: str = "fp32"
    calibration: Calibration | None = None
    # kept float inside a quantized component (precision.exclude_op_types / exclude_nodes)
    exclude_op_types: tuple[str, ...] = ()
    exclude_nodes: tuple[str, ...] = ()

    @property
    def quantized(self) -> bool:
        """Integer weights and activations (needs calibration data)."""
        return self.name in QUANTIZED

    def key(self) -> dict[str, Any]:
        """What a result computed at this precision depends on (cache and job keys)."""
        cal = self.calibration
        key: dict[str, Any] = {
            "precision": self.name,
            "calibration_sha256": cal.sha256 if cal is not None else None,
        }
        if self.exclude_op_types or self.exclude_nodes:  # older keys stay as they were
            key["exclude_op_types"] = sorted(self.exclude_op_types)
            key["exclude_nodes"] = sorted(self.exclude_nodes)
        return key


FP32 = ComponentPrecision()


class PrecisionPlan:
    """The ``precision`` settings as the pipeline uses them: a precision per component name,
    the calibration sample count, and the run's tags."""

    def __init__(self, settings: PrecisionConfig) -> None:
        self.settings = settings
        self.name = settings.name
        self.calibration_samples = int(settings.calibration_samples)

    def of(self, component: str) -> str:
        return self.settings.of(component)

    def excluded(self, component: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(op types, node names) kept float in ``component`` when it is quantized."""
        if not self.needs_calibration(component):
            return (), ()
        return tuple(self.settings.exclude_op_types), tuple(self.settings.exclude_nodes)

    def needs_calibration(self, component: str) -> bool:
        return self.of(component) in QUANTIZED

    def tags(self, components: list[str]) -> dict[str, str]:
        """``precision`` (the option) and ``precision/<component>`` for every component."""
        tags = {"precision": self.name}
        tags |= {f"precision/{c}": self.of(c) for c in components}
        if isinstance(self.settings, MixedPrecisionConfig):
            tags["precision/default"] = self.settings.default
        return tags
