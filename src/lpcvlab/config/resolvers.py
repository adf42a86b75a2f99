"""OmegaConf resolvers the config files use; registered when ``lpcvlab.config`` is imported
(``run.py`` imports it before Hydra composes).

``${lpcvlab_uid:}``: a short random suffix, the same for the whole process, that makes each
run's work folder unique (``hydra.run.dir``: ``outputs/<date>/<time>_<uid>``) even when two
runs start in the same second. Hydra's ``${now:...}`` alone gave them one folder, and their
checkpoints, logs and exports overwrote each other. Cached like ``now``: the value travels with
the config into joblib workers and to Lightning's DDP processes (they get the resolved
``hydra.run.dir``).
"""

from __future__ import annotations

import secrets

from omegaconf import OmegaConf

_UID = secrets.token_hex(3)


def run_uid() -> str:
    """This process's suffix (6 hex digits)."""
    return _UID


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("lpcvlab_uid", run_uid, use_cache=True, replace=True)


register_resolvers()
