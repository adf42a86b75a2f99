"""Runtime plug-ins, chosen by the ``hub`` config group."""

from __future__ import annotations

from typing import Any

from lpcvlab.errors import ConfigError
from lpcvlab.runtimes.base import ComponentJob, Runtime

__all__ = ["ComponentJob", "Runtime", "build_runtime"]


def build_runtime(cfg: Any) -> Runtime:
    """The runtime for ``cfg.hub.name`` with the chosen ``device`` and ``runtime`` configs."""
    name = cfg.hub.name
    if name == "local":
        from lpcvlab.runtimes.local import LocalRuntime

        return LocalRuntime(
            device=cfg.device.name,
            warmup_iterations=cfg.hub.warmup_iterations,
            profile_iterations=cfg.hub.profile_iterations,
            intra_op_threads=cfg.hub.intra_op_threads,
        )
    if name == "aihub":
        from lpcvlab.runtimes.aihub import AIHubRuntime

        return AIHubRuntime.from_config(cfg)
    raise ConfigError(f"hub={name!r} is not a known runtime host; use hub=local or hub=aihub")
