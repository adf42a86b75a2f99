"""train.distill.teacher is resolved when the config is loaded: a teacher that cannot be built
stops the run before any work, with one line naming the key."""

from __future__ import annotations

import pytest
from conftest import compose_config

from lpcvlab.config import load_settings
from lpcvlab.config.schema import TinyVideoBackboneConfig, VideoBackboneConfig
from lpcvlab.config.teacher import Teacher, backbone_option, resolve_teacher
from lpcvlab.errors import ConfigError


def test_backbone_option_is_read_with_its_schema():
    tiny = backbone_option("video_tiny")
    assert isinstance(tiny, TinyVideoBackboneConfig) and tiny.width == 16
    assert backbone_option("r2plus1d_18").arch == "r2plus1d_18"


def test_teacher_option_with_other_weights():
    cfg = compose_config(
        "track=video",
        "train.distill.teacher=r2plus1d_18",
        "train.distill.teacher_pretrained=/nowhere/teacher.pt",
    )
    s = load_settings(cfg)
    teacher = resolve_teacher(s.train.distill, VideoBackboneConfig, "video")
    assert isinstance(teacher, Teacher) and teacher.checkpoint is None
    assert teacher.backbone.name == "r2plus1d_18"
    assert teacher.backbone.pretrained == "/nowhere/teacher.pt"


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["train.distill.teacher=r9000"], "train.distill.teacher=r9000: no such backbone option"),
        (["train.distill.teacher=clip_tiny"], "cannot teach a track=video student"),
        (["train.distill.teacher=/nowhere/t.ckpt"], "no such checkpoint file"),
        (["train.distill.teacher_pretrained=kinetics400"], "train.distill.teacher is null"),
    ],
)
def test_bad_teacher_is_refused_at_load(overrides, says):
    cfg = compose_config("track=video", *overrides)
    with pytest.raises(ConfigError, match=says):
        load_settings(cfg)


def test_no_teacher_no_distillation():
    s = load_settings(compose_config("track=video"))
    assert resolve_teacher(s.train.distill, VideoBackboneConfig, "video") is None
