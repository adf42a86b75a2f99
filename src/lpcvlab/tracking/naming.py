"""What a run is called and where it came from: its name (the backbone and what distinguishes
it), its tags (track, groups, git commit), the command line and MLflow's source tags.

Nothing here imports MLflow at module level: ``run.py`` names a sweep's jobs before any run
exists.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Collection, Sequence
from pathlib import Path

from lpcvlab.config.schema import RunConfig
from lpcvlab.util.secrets import is_secret_key, mask_secrets

COMMAND_TAG = "command"

# Overrides that say where a run writes or how long it measures, not what it is: never in a name.
_PLUMBING = ("tracking.", "paths.", "hydra.", "cache.", "sweep.", "reproduce")
_PLUMBING_KEYS = frozenset(
    {
        "hub.profile_iterations",
        "hub.warmup_iterations",
        "hub.poll_interval_s",
        "hub.connect_timeout_s",
        "hub.ledger_path",
        "hub.chunk_bytes",
        "export.parity_samples",
        "data.workers",
    }
)
NAME_MAX = 100  # characters: what the runs table shows without widening the column
_VALUE_MAX = 32


def override_key(override: str) -> str:
    """``+a.b=1`` -> ``a.b``."""
    return override.split("=", 1)[0].lstrip("+~")


def shown_overrides(overrides: Sequence[str], swept: Collection[str] | None = None) -> list[str]:
    """The overrides a run's name shows: in a sweep (``swept`` = the swept keys, when known) the
    swept ones, else every one; never where the run writes, how long it measures, or a secret."""
    out = []
    for text in overrides:
        key = override_key(text)
        if "=" not in text or text.startswith("~") or is_secret_key(key):
            continue
        if key.startswith(_PLUMBING) or key in _PLUMBING_KEYS:
            continue
        if swept is not None and key not in swept:
            continue
        value = text.split("=", 1)[1]
        if len(value) > _VALUE_MAX:
            value = value[: _VALUE_MAX - 3] + "..."
        out.append(f"{key}={value}")
    return out


def compose_run_name(backbone: str, shown: Sequence[str], implied: Sequence[str] = ()) -> str:
    """``clip_tiny train=finetune seed=1``: the backbone, then what distinguishes the run (the
    ``shown`` overrides, then the ``implied`` ``key=value`` facts whose key no override named),
    cut to :data:`NAME_MAX` characters. ``backbone=`` itself is the first word."""
    parts = [o for o in shown if override_key(o) != "backbone"]
    keys = {override_key(o) for o in parts}
    parts += [f for f in implied if override_key(f) not in keys]
    name = " ".join([backbone, *parts])
    return name if len(name) <= NAME_MAX else name[: NAME_MAX - 3] + "..."


def run_name(s: RunConfig, shown: Sequence[str] = ()) -> str:
    """``tracking.run_name``, else the backbone and what distinguishes the run: ``shown`` (the
    command line's or sweep's overrides, :func:`lpcvlab.app.name_overrides`), then training,
    precision, hub and seed where they are not the defaults."""
    if s.tracking.run_name:
        return str(s.tracking.run_name)
    implied = [
        f"{key}={value}"
        for key, value, default in (
            ("train", s.train.name, "none"),
            ("precision", s.precision.name, "fp32"),
            ("hub", s.hub.name, "local"),
            ("seed", str(s.seed), "0"),
        )
        if value != default
    ]
    return compose_run_name(s.backbone.name, shown, implied)


def run_tags(s: RunConfig) -> dict[str, str]:
    """The tags every run carries: what it is (track, groups, seed, precision), where it was
    measured, and the commit it ran at."""
    tags = {
        "track": s.track.name,
        "backbone": s.backbone.name,
        "preprocess": s.preprocess.name,
        "data": s.data.name,
        "device": s.device.name,
        "runtime": s.runtime.name,
        "hub": s.hub.name,
        "train": s.train.name,
        "seed": str(s.seed),
        "precision": s.precision.name,
    }
    if s.hub.name == "local":
        tags["measured_on"] = "host_cpu"
    return tags | git_info()


def git_info(cwd: Path | None = None) -> dict[str, str]:
    """Commit and dirtiness of the lpcvlab checkout that ran (``git_dirty`` ignores untracked
    files). MLflow records the entry point's commit itself (``mlflow.source.git.commit``) but
    not whether the tree was dirty, which ``lpcvlab reproduce`` needs."""
    if cwd is None:
        cwd = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=20
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that started this process (``python run.py ...``, ``lpcvlab reproduce ...``),
    with the value of any ``key=value`` whose key names a secret masked."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(".py"):
        argv = ["python", *argv]
    elif argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(mask_secrets(argv))[:5000]


def source_tags(command: str | None = None) -> dict[str, str]:
    """MLflow's source tags for a run created without ``mlflow.start_run`` (entry point, type,
    user, git commit), plus the command line: what the run page shows as its source."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = {k: str(v) for k, v in resolve_tags().items()}
    return tags | {COMMAND_TAG: command or command_line()}
