"""One seeding function for the whole run: Python, NumPy, torch, and Lightning's workers."""

from __future__ import annotations

import os
import random

import numpy as np


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (0 is a seed like any other).

    It also sets the variables Lightning's ``seed_everything(workers=True)`` sets, so that a
    Trainer seeds its DataLoader workers from the same seed, without importing Lightning (seconds)
    in runs that do not train.
    """
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    os.environ["PL_SEED_WORKERS"] = "1"


# Thread counts change float reductions, so results can depend on them: each run records them
# (params) and `lpcvlab reproduce` sets them back before it re-runs.
THREAD_PARAMS = ("threads.torch_intra_op", "threads.torch_inter_op", "threads.omp_num_threads")
UNSET = "unset"


def thread_params() -> dict[str, str]:
    """This process's thread settings as MLflow params: torch's intra-op and inter-op pools and
    ``OMP_NUM_THREADS`` (``unset`` when the variable is not set)."""
    import torch

    return {
        THREAD_PARAMS[0]: str(torch.get_num_threads()),
        THREAD_PARAMS[1]: str(torch.get_num_interop_threads()),
        THREAD_PARAMS[2]: os.environ.get("OMP_NUM_THREADS", UNSET),
    }


def restore_threads(params: dict[str, str]) -> list[str]:
    """Set the thread counts a run recorded (see :func:`thread_params`); returns what changed,
    as ``name=value`` strings. A run logged before they were recorded leaves them alone."""
    import torch

    changed = []
    omp = params.get(THREAD_PARAMS[2])
    if omp is not None and os.environ.get("OMP_NUM_THREADS", UNSET) != omp:
        if omp == UNSET:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp  # read by the processes the run starts
        changed.append(f"OMP_NUM_THREADS={omp}")
    intra = params.get(THREAD_PARAMS[0])
    if intra is not None and intra.isdigit() and int(intra) != torch.get_num_threads():
        torch.set_num_threads(int(intra))
        changed.append(f"torch intra-op threads={intra}")
    inter = params.get(THREAD_PARAMS[1])
    if inter is not None and inter.isdigit() and int(inter) != torch.get_num_interop_threads():
        try:
            torch.set_num_interop_threads(int(inter))
            changed.append(f"torch inter-op threads={inter}")
        except RuntimeError:  # only settable before the first inter-op parallel work
            changed.append(f"torch inter-op threads={inter} NOT set (already in use)")
    return changed
