"""The track protocol: what a competition track plugs into the pipeline.

A track owns its data contract, its model factory and export wrappers, its training hook and its
metrics. It is built once from the typed config (:func:`lpcvlab.tracks.build_track`) with the
settings it needs; the pipeline owns everything between (export, hub, MLflow) and never looks
inside a track's data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lpcvlab.config.schema import DataConfig, TrainConfig
from lpcvlab.data.clips import CachedClips
from lpcvlab.types import DatasetRecord, EvalResult, ModelBundle, ReferenceParity, RunLog


@dataclass
class TrackData:
    """Validated data, loaded before any model compute is spent.

    ``inputs`` holds, per component, the tensors its deployed model receives, stacked along the
    batch axis: an ndarray, or an object that reads them from disk on demand with the same
    ``shape``/``len``/indexing and a ``content_sha256()`` (Track 2's
    :class:`~lpcvlab.data.clips.CachedClips`), which stages index a batch at a time and never
    convert whole; ``stats`` are logged as ``data/<key>`` metrics; ``reports`` (e.g. a CSV of
    skipped files) become artifacts; ``payload`` is the track's own (ground truth, file lists, ...);
    ``datasets`` name each split read with its content hash (MLflow's run inputs).
    """

    inputs: dict[str, np.ndarray | CachedClips]
    stats: dict[str, float] = field(default_factory=dict)
    reports: list[Path] = field(default_factory=list)
    payload: Any = None
    datasets: list[DatasetRecord] = field(default_factory=list)


def data_source(data: DataConfig) -> str:
    """Where a dataset comes from, as MLflow's dataset source: ``demo`` for generated data (its
    folder is a cache), else the data root."""
    if getattr(data, "demo", None) is not None:
        return "demo"
    return str(Path(str(data.root)).resolve())


class Track(Protocol):
    """A track may also offer ``calibration_inputs(data, component, n) -> np.ndarray | None``:
    up to ``n`` inputs of its training split for ``component``, in the exported layout, to
    calibrate a quantized deployment (without it, or when it returns None, evaluation inputs
    are used: :mod:`lpcvlab.deploy.precision.calibration`)."""

    name: str

    def load_data(self, work_dir: Path, *, training: bool) -> TrackData:
        """Read and check the evaluation data (and the training data when ``training``)."""
        ...

    def build_model(self) -> ModelBundle: ...

    def reference_parity(self, bundle: ModelBundle, data: TrackData) -> ReferenceParity:
        """The model :meth:`build_model` loaded, before anything changes it, against the
        weights' authors' code on the same weights and a few of the organisers' inputs."""
        ...

    def train(
        self,
        bundle: ModelBundle,
        data: TrackData,
        settings: TrainConfig,
        run: RunLog,
        work_dir: Path,
    ) -> ModelBundle:
        """Train a copy of ``bundle``'s model and return the trained bundle (``bundle`` is left
        as it was: its weights are the starting point)."""
        ...

    def evaluate(
        self, data: TrackData, outputs: dict[str, np.ndarray], work_dir: Path
    ) -> EvalResult: ...
