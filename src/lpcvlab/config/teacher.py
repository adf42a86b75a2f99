"""Which network teaches a distilled student (``train.distill.teacher``).

The teacher is a backbone option of the student's track (``conf/backbone/<name>.yaml``, read with
the same schemas as ``backbone=``) or a checkpoint lpcvlab's training wrote, which records the
backbone it was trained with (:data:`CHECKPOINT_KEY`). This module is read when the config is
loaded, so a teacher that cannot be built stops the run before any work; it imports nothing
heavy (the checkpoint is only opened by the track, when it builds the teacher).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from lpcvlab.config.schema import BackboneConfig, DistillConfig
from lpcvlab.config.weights import looks_like_path
from lpcvlab.errors import ConfigError

# Where a training checkpoint keeps what built it: {"backbone": {...}, "track": "..."}.
CHECKPOINT_KEY = "lpcvlab"


def conf_dir() -> Path:
    """The config folder the run was composed from: Hydra's primary config source when a Hydra
    app is running, ``$LPCVLAB_CONF_DIR``, else the checkout's ``conf/`` (src layout)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        for source in HydraConfig.get().runtime.config_sources:
            if source.provider == "main" and source.schema == "file":
                return Path(source.path)
    env = os.environ.get("LPCVLAB_CONF_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "conf"


@dataclass(frozen=True)
class Teacher:
    """A resolved teacher: a backbone config (weights as its ``pretrained`` says), or a training
    checkpoint whose recorded backbone the track reads when it builds the teacher."""

    backbone: BackboneConfig | None = None
    checkpoint: Path | None = None

    @property
    def description(self) -> str:
        """What taught, for tags and cache keys."""
        if self.checkpoint is not None:
            return str(self.checkpoint)
        assert self.backbone is not None
        return f"{self.backbone.name} (weights {self.backbone.pretrained})"


def backbone_option(name: str, key: str = "backbone") -> BackboneConfig:
    """The typed config of the backbone option ``name`` (``conf/backbone/<name>.yaml``)."""
    from lpcvlab.config import as_schema, schema_for

    folder = conf_dir() / "backbone"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(
            f"{key}={name}: no such backbone option (conf/backbone/{name}.yaml) and no such "
            f"checkpoint file; choose one of: {', '.join(options)}, or a checkpoint path"
        )
    node = OmegaConf.load(path)
    body = OmegaConf.masked_copy(node, [k for k in node if k != "defaults"])
    schema = schema_for("backbone", body)
    if schema is None:
        raise ConfigError(f"{path}: not a backbone option any schema knows")
    return as_schema(body, schema)


def resolve_teacher(
    distill: DistillConfig, kind: type[BackboneConfig], track: str
) -> Teacher | None:
    """The teacher of ``distill`` for a student whose backbones are ``kind``; None when there is
    none. A ConfigError names the key when the option does not exist, is another track's, or the
    checkpoint file is missing."""
    value = distill.teacher
    if value is None:
        if distill.teacher_pretrained is not None:
            raise ConfigError(
                "train.distill.teacher_pretrained is set but train.distill.teacher is null: "
                "name the teacher (a backbone option or a checkpoint)"
            )
        return None
    if looks_like_path(value):
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"train.distill.teacher={value}: no such checkpoint file")
        if distill.teacher_pretrained is not None:
            raise ConfigError(
                "train.distill.teacher_pretrained goes with a backbone option, not with a "
                f"checkpoint (train.distill.teacher={value}); drop one of them"
            )
        return Teacher(checkpoint=path)
    backbone = backbone_option(value, "train.distill.teacher")
    if not isinstance(backbone, kind):
        raise ConfigError(
            f"train.distill.teacher={value} is {backbone.what}, which cannot teach a "
            f"track={track} student; choose a backbone option of that track"
        )
    if distill.teacher_pretrained is not None:
        backbone.pretrained = distill.teacher_pretrained
    return Teacher(backbone=backbone)
