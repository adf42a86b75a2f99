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
