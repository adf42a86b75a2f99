"""The track protocol: what a competition track plugs into the pipeline.

A track owns its data contract, its model factory and export wrappers, and its metrics. The
pipeline owns everything between (export, runtime, MLflow) and never looks inside a track's data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lpcvlab.types import EvalResult, ModelBundle


@dataclass
class TrackData:
    """Validated data, loaded before any model compute is spent.

    ``inputs`` holds, per component, the tensors its deployed model receives, stacked along the
    batch axis; ``stats`` are logged as ``data/<key>`` metrics; ``reports`` (e.g. a CSV of skipped
    files) become artifacts; ``payload`` is the track's own (ground truth, file lists, ...).
    """

    inputs: dict[str, np.ndarray]
    stats: dict[str, float] = field(default_factory=dict)
    reports: list[Path] = field(default_factory=list)
    payload: Any = None


class RunLog(Protocol):
    """What a track may record while it trains or evaluates (the pipeline's MLflow recorder)."""

    run_id: str
    tracking_uri: str

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...


class Track(Protocol):
    name: str

    def load_data(self, cfg: Any, work_dir: Path) -> TrackData: ...

    def build_model(self, cfg: Any) -> ModelBundle: ...

    def train(
        self, cfg: Any, bundle: ModelBundle, data: TrackData, run: RunLog, work_dir: Path
    ) -> None: ...

    def evaluate(
        self, cfg: Any, data: TrackData, outputs: dict[str, np.ndarray], work_dir: Path
    ) -> EvalResult: ...
