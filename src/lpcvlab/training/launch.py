"""Which process of a multi-process (DDP) training launch this is.

One run trains on several devices when ``train.trainer.devices=N`` with a DDP strategy. The
process that was started by the user owns the run: MLflow, data, export, hub, metrics. The others
only train, and leave when training ends. They are started by:

- Lightning's ``ddp`` strategy, which runs the same command again with ``LOCAL_RANK=1..N-1``
  (and ``NODE_RANK`` on other nodes) once training starts;
- ``torchrun`` (``RANK``) or SLURM's ``srun`` with several tasks (``SLURM_PROCID``), which start
  every process at once.

(``ddp_spawn`` starts its workers inside the training call, without running the command again:
nothing here concerns it.)
"""

from __future__ import annotations

import os


def _int(name: str, default: int = 0) -> int:
    try:
        return int(os.environ.get(name, default) or default)
    except ValueError:
        return default


def worker_rank() -> int:
    """0 in the process that owns the run; else this training worker's rank (> 0)."""
    if "RANK" in os.environ:  # torchrun, or any launcher that sets the global rank
        return _int("RANK")
    if _int("SLURM_NTASKS", 1) > 1 and "SLURM_PROCID" in os.environ:
        return _int("SLURM_PROCID")
    local, node = _int("LOCAL_RANK"), _int("NODE_RANK", _int("GROUP_RANK"))
    return local + node * max(_int("LOCAL_WORLD_SIZE", 1), local + 1)
