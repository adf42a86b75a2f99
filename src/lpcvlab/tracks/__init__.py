"""Track plug-ins, chosen by ``track.name``."""

from __future__ import annotations

from lpcvlab.errors import ConfigError
from lpcvlab.tracks.base import Track, TrackData

__all__ = ["Track", "TrackData", "get_track"]


def get_track(name: str) -> Track:
    if name == "retrieval":
        from lpcvlab.tracks.retrieval import RetrievalTrack

        return RetrievalTrack()
    if name == "video":
        from lpcvlab.tracks.video import VideoTrack

        return VideoTrack()
    raise ConfigError(f"track={name!r} is not a known track; use track=retrieval or track=video")
