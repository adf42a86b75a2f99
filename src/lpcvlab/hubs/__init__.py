"""Hub back-ends, chosen by the ``hub`` config group: ``local`` and ``aihub``.

:func:`build_hub` is the one place a hub is built, from its typed settings and the ``device`` and
``runtime`` groups it targets; nothing else reads the ``hub`` group.
"""

from __future__ import annotations

from pathlib import Path

from lpcvlab.config.schema import (
    AIHubConfig,
    DeviceConfig,
    HubConfig,
    LocalHubConfig,
    RuntimeConfig,
)
from lpcvlab.errors import ConfigError
from lpcvlab.hubs.base import (
    ALL_STAGES,
    INFERENCE,
    ComponentJob,
    Hub,
    InFlight,
    JobListener,
    SequentialHub,
    drive,
)

__all__ = [
    "ALL_STAGES",
    "INFERENCE",
    "ComponentJob",
    "Hub",
    "InFlight",
    "JobListener",
    "SequentialHub",
    "build_hub",
    "drive",
]


def build_hub(
    settings: HubConfig,
    device: DeviceConfig,
    runtime: RuntimeConfig,
    *,
    track: str,
    cache_dir: str | Path,
) -> Hub:
    """The hub of ``settings`` targeting ``device`` and ``runtime``; no network is touched here
    (``Hub.preflight`` does that)."""
    if isinstance(settings, LocalHubConfig):
        from lpcvlab.hubs.local import LocalHub

        return LocalHub(settings, device, runtime)
    if isinstance(settings, AIHubConfig):
        from lpcvlab.hubs.aihub import AIHub

        return AIHub(settings, device, runtime, track=track, cache_dir=Path(cache_dir))
    raise ConfigError(f"hub={settings.name!r} is not a known hub; use hub=local or hub=aihub")
