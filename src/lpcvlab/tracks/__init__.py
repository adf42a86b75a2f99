"""Track plug-ins, chosen by the ``track`` group and built once from the typed config."""

from __future__ import annotations

import dataclasses

from lpcvlab.config.schema import (
    ClipBackboneConfig,
    FinetuneConfig,
    RetrievalDataConfig,
    RetrievalTrackConfig,
    RunConfig,
    VideoBackboneConfig,
    VideoDataConfig,
    VideoTrackConfig,
)
from lpcvlab.config.teacher import Teacher, resolve_teacher
from lpcvlab.config.weights import resolve_image, run_plan
from lpcvlab.errors import ConfigError
from lpcvlab.tracks.base import Track, TrackData

__all__ = ["Track", "TrackData", "build_track"]


def build_track(s: RunConfig) -> Track:
    """The track of ``s.track`` with the data, preprocessing and backbone factory it uses.

    (The combination of groups was checked when the config was loaded.)
    """
    teacher: Teacher | None = None
    if isinstance(s.train, FinetuneConfig):
        kind = ClipBackboneConfig if isinstance(s.track, RetrievalTrackConfig) else None
        teacher = resolve_teacher(s.train.distill, kind or VideoBackboneConfig, s.track.name)
    if isinstance(s.track, RetrievalTrackConfig):
        from lpcvlab.models.clip import ClipBackbone
        from lpcvlab.tracks.retrieval import RetrievalTrack

        assert isinstance(s.data, RetrievalDataConfig) and isinstance(
            s.backbone, ClipBackboneConfig
        )
        assert s.preprocess.image is not None
        plan = run_plan(s)  # the weights' activation and normalisation
        image, normalization_from = resolve_image(s.preprocess.image, plan)
        if s.backbone.image_size is not None:  # the images are resized to the model's side
            image = dataclasses.replace(image, size=int(s.backbone.image_size))
        return RetrievalTrack(
            s.track,
            s.data,
            image,
            ClipBackbone(s.backbone, plan),
            seed=s.seed,
            teacher=teacher,
            cache_dir=s.paths.cache_dir,
            normalization_from=normalization_from,
        )
    if isinstance(s.track, VideoTrackConfig):
        from lpcvlab.models.video import VideoBackbone
        from lpcvlab.tracks.video import VideoTrack

        assert isinstance(s.data, VideoDataConfig) and isinstance(s.backbone, VideoBackboneConfig)
        assert s.preprocess.video is not None
        return VideoTrack(
            s.track,
            s.data,
            s.preprocess.video,
            VideoBackbone(s.backbone, run_plan(s)),
            cache_dir=s.paths.cache_dir,
            seed=s.seed,
            teacher=teacher,
            train=s.train,
        )
    raise ConfigError(f"track={s.track.name!r} is not a known track; use track=retrieval or video")
