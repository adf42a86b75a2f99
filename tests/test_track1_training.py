"""Track 1 training pieces, each on its own: freezing policy, schedule, loss, hard negatives,
weight averaging, the teacher's embedding cache, calibration on the training split, config."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from conftest import build_track_for, compose_config
from omegaconf import OmegaConf

from lpcvlab.config import load_settings
from lpcvlab.config.schema import RetrievalFinetuneConfig
from lpcvlab.config.teacher import CHECKPOINT_KEY, Teacher
from lpcvlab.data.images import ImagePreprocess
from lpcvlab.errors import ConfigError
from lpcvlab.models.clip import ClipTeacher, build_clip_teacher
from lpcvlab.training.averaging import (
    KeepForAveraging,
    WeightAveraging,
    average_states,
    interpolate,
    snapshot,
)
from lpcvlab.training.clip_distill import teacher_embeddings
from lpcvlab.training.contrastive import (
    ContrastiveModule,
    Validation,
    trainable_names,
    warmup_cosine,
)
from lpcvlab.training.hard_negatives import HardNegatives

TINY_CFG = OmegaConf.to_container(
    OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/backbone/clip_tiny.yaml").model_cfg
)


def _tiny_clip(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.CLIP(**TINY_CFG).eval()


# --------------------------------------------------------------------------- freezing


def test_unfreeze_policies_on_clip_tiny():
    model = _tiny_clip()
    names = [n for n, _ in model.named_parameters()]
    assert trainable_names(model, "all") == set(names)
    assert trainable_names(model, "projection") == {"visual.proj", "text_projection", "logit_scale"}
    last = trainable_names(model, "last_blocks", 1)
    # clip_tiny has 2 blocks per tower: the last one of each, what follows it, the heads.
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in last
    assert "transformer.resblocks.1.mlp.c_fc.weight" in last
    assert {"visual.ln_post.weight", "ln_final.weight", "visual.proj", "text_projection"} <= last
    assert not any(".resblocks.0." in n for n in last)
    assert "token_embedding.weight" not in last and "visual.conv1.weight" not in last
    assert trainable_names(model, "last_blocks", 5) >= {n for n in names if "resblocks" in n}


def test_unfreeze_finds_mobileclip2_blocks_and_heads():
    model = open_clip.create_model("MobileCLIP2-S0", pretrained=None)
    assert trainable_names(model, "projection") == {
        "logit_scale",
        "visual.trunk.head.fc.weight",
        "visual.trunk.head.fc.bias",
        "text.text_projection",
    }
    last = trainable_names(model, "last_blocks", 2)
    # FastViT: the last two blocks are the two of stage 3; then the final conv and the head.
    assert any(n.startswith("visual.trunk.stages.3.blocks.0.") for n in last)
    assert any(n.startswith("visual.trunk.stages.3.blocks.1.") for n in last)
    assert any(n.startswith("visual.trunk.final_conv.") for n in last)
    assert not any(n.startswith("visual.trunk.stages.2.") for n in last)
    assert any(n.startswith("text.transformer.resblocks.11.") for n in last)
    assert not any(n.startswith("text.transformer.resblocks.9.") for n in last)


def test_warmup_then_cosine_to_the_floor():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=100, warmup=0.1, min_lr=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


# --------------------------------------------------------------------------- the loss


def _module(model, **kw) -> ContrastiveModule:
    return ContrastiveModule(
        model,
        optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-3),
        validation=Validation([1, 2], [(1,), (2,)], [1, 10]),
        **kw,
    )


def test_contrastive_step_learns_and_masks_a_negative_equal_to_a_positive():
    model = _tiny_clip().train()
    tok = open_clip.get_tokenizer("ViT-B-16")
    images = torch.rand(4, 3, 224, 224)
    captions = ["a red circle", "a blue square", "a green cross", "a red circle"]
    batch = {
        "image": images,
        "text": tok(captions),
        "image_index": torch.arange(4),
        "caption_index": torch.arange(4),
        # the second negative is the first image's own caption: no negative for it
        "negative": tok(["a blue circle", "a red circle", "a red cross", "a blue circle"]),
        "has_negative": torch.tensor([True, True, False, True]),
    }
    module = _module(model)
    module.log = module.log_dict = lambda *a, **k: None  # no Trainer here
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = module.training_step(batch, 0)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_param_groups_split_towers_and_decay():
    model = _tiny_clip()
    groups = {g["name"]: g for g in _module(model, lr_text=5e-5).param_groups()}
    assert set(groups) == {"image", "image/no_decay", "scale/no_decay", "text", "text/no_decay"}
    assert groups["text"]["lr"] == 5e-5 and "lr" not in groups["image"]
    assert groups["scale/no_decay"]["weight_decay"] == 0.0
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- hard negatives


def test_hard_negatives_swap_replace_and_count():
    hn = HardNegatives([["left", "right"], ["red", "green", "blue"], ["solo"]])
    rng = random.Random(0)
    assert hn.perturb("a dog on the left", rng) == "a dog on the right"
    assert hn.perturb("Left of the cat", rng) == "Right of the cat"
    assert hn.perturb("the left dog and the right cat", rng) == "the right dog and the left cat"
    colour = hn.perturb("a red car", rng)
    assert colour in ("a green car", "a blue car")
    assert hn.perturb("a leftover sandwich", rng) is None  # whole words only
    assert hn.perturb("nothing to swap", rng) is None
    captions = ["a red car", "a cat", "on the left", "solo act"]
    assert sum(hn.can_perturb(c) for c in captions) == 2  # a group of one swaps nothing


# --------------------------------------------------------------------------- averaging


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 3, generator=g)
    w[0, 0] = -0.0  # kept bitwise by alpha = 0 (computing 1 * w + 0 * v would give +0.0)
    return {"w": w, "b": torch.randn(3, generator=g).half(), "n": torch.tensor(7)}


def _bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a
    )


def test_averaging_identical_checkpoints_changes_nothing():
    s = _state(0)
    for k in (1, 2, 3, 5):
        assert _bitwise(average_states([s] * k), s)
    mean = average_states([_state(0), _state(1)])
    assert torch.allclose(mean["w"], (_state(0)["w"] + _state(1)["w"]) / 2)


def test_wise_alpha_zero_is_the_start_bitwise_and_one_the_tuned():
    start, tuned = _state(0), _state(1)
    tuned["w"][1, 1] = float("nan")
    assert _bitwise(interpolate(start, tuned, 0.0), start)
    assert _bitwise(interpolate(start, tuned, 1.0), tuned)
    half = interpolate(_state(0), _state(1), 0.5)
    assert torch.allclose(half["w"], (_state(0)["w"] + _state(1)["w"]) / 2)
    assert half["b"].dtype == torch.float16


def _fake_trainer(epoch: int, score: float) -> SimpleNamespace:
    return SimpleNamespace(
        sanity_checking=False,
        current_epoch=epoch,
        callback_metrics={"val/recall_at_10": torch.tensor(score)},
    )


@pytest.mark.parametrize(
    ("mode", "kept"), [("last", ["epoch=2", "epoch=3"]), ("best", ["epoch=0", "epoch=2"])]
)
def test_keep_for_averaging_keeps_the_last_or_best_k(tmp_path, mode, kept):
    net = torch.nn.Linear(2, 2)
    keeper = KeepForAveraging(tmp_path, mode, 2, "val/recall_at_10", higher=True)
    for epoch, score in enumerate([0.6, 0.2, 0.5, 0.3]):
        with torch.no_grad():
            net.weight.fill_(epoch)
        keeper.on_validation_end(_fake_trainer(epoch, score), net)
    assert [p.stem for _, _, p in keeper.kept] == kept
    assert sorted(p.stem for p in tmp_path.glob("*.pt")) == kept
    mean = average_states(keeper.states())["weight"]
    assert torch.all(mean == np.mean([int(k.split("=")[1]) for k in kept]))


def test_weight_averaging_restores_the_start_with_alpha_zero(tmp_path):
    net = torch.nn.Linear(3, 2)
    before = snapshot(net)
    settings = RetrievalFinetuneConfig(wise_alpha=0.0, average="last", average_k=2)
    ckpt = SimpleNamespace(monitor="val/recall_at_10", mode="max")
    averaging = WeightAveraging(settings, net, tmp_path, ckpt)
    for epoch in range(3):  # "training"
        with torch.no_grad():
            net.weight.add_(1.0)
        averaging.keeper.on_validation_end(_fake_trainer(epoch, 0.1 * epoch), net)
    recorded: dict = {}
    run = SimpleNamespace(
        set_tags=lambda t: recorded.update(t), log_metrics=lambda m: recorded.update(m)
    )
    averaging.apply(net, run, None)
    assert _bitwise(snapshot(net), before)
    assert recorded["averaging/checkpoints"] == "epoch=1,epoch=2"
    assert recorded["train/wise_alpha"] == 0.0 and recorded["train/averaged_checkpoints"] == 2
    assert "WiSE-FT alpha=0" in recorded["weights_after_training"]


def test_average_best_needs_a_monitor(tmp_path):
    settings = RetrievalFinetuneConfig(average="best")
    with pytest.raises(ConfigError, match="train.average=best needs a monitored metric"):
        WeightAveraging(settings, torch.nn.Linear(1, 1), tmp_path, SimpleNamespace(monitor=None))


# --------------------------------------------------------------------------- distillation


def test_teacher_embeddings_are_computed_once_then_reused(tmp_path):
    teacher = ClipTeacher(_tiny_clip(3), open_clip.get_tokenizer("ViT-B-16"), "tiny teacher")
    pixels = np.random.default_rng(0).integers(0, 256, (5, 3, 224, 224), dtype=np.uint8)
    captions = ["a red circle", "a blue square", "the green cross", "a cat", "a dog", "x"]
    pre = ImagePreprocess()
    first = teacher_embeddings(teacher, pixels, captions, pre, "data-a", tmp_path, batch_size=2)
    assert not first.reused and first.image.shape == (5, 64) and first.text.shape == (6, 64)
    np.testing.assert_allclose(np.linalg.norm(first.image, axis=1), 1.0, rtol=1e-5)
    again = teacher_embeddings(teacher, pixels, captions, pre, "data-a", tmp_path, batch_size=4)
    assert again.reused and again.key == first.key
    np.testing.assert_array_equal(again.image, first.image)
    assert again.logit_scale == pytest.approx(first.logit_scale)
    other_data = teacher_embeddings(teacher, pixels, captions, pre, "data-b", tmp_path)
    assert not other_data.reused and other_data.key != first.key
    other = ClipTeacher(_tiny_clip(4), teacher.tokenizer, "another teacher")
    assert not teacher_embeddings(other, pixels, captions, pre, "data-a", tmp_path).reused


def test_teacher_checkpoint_must_record_a_track1_backbone(tmp_path):
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {}}, bare)
    with pytest.raises(ConfigError, match="does not record its backbone"):
        build_clip_teacher(Teacher(checkpoint=bare))
    video = tmp_path / "video.ckpt"
    torch.save({"state_dict": {}, CHECKPOINT_KEY: {"track": "video", "backbone": {}}}, video)
    with pytest.raises(ConfigError, match="track=video checkpoint cannot teach"):
        build_clip_teacher(Teacher(checkpoint=video))


def test_teacher_from_a_checkpoint_has_its_weights(tmp_path):
    model = _tiny_clip(5)
    backbone = OmegaConf.to_container(
        OmegaConf.load(Path(__file__).parents[1] / "conf/backbone/clip_tiny.yaml")
    )
    backbone.pop("defaults")
    path = tmp_path / "t.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {"state_dict": state, CHECKPOINT_KEY: {"track": "retrieval", "backbone": backbone}}, path
    )
    teacher = build_clip_teacher(Teacher(checkpoint=path))
    assert teacher.mean is None and str(path) in teacher.description
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(teacher.model.encode_image(x), model.encode_image(x))


# --------------------------------------------------------------------------- config, calibration


def test_finetune_loads_for_retrieval_and_needs_a_training_split():
    s = load_settings(compose_config("train=finetune", "backbone=clip_tiny"))
    assert isinstance(s.train, RetrievalFinetuneConfig)
    assert s.train.checkpoint["monitor"] == "val/recall_at_10"
    assert s.data.train.root.endswith("/train")
    cfg = compose_config("train=finetune", "data=lpcvc_track1", "data.root=/data/t1")
    with pytest.raises(ConfigError, match=r"needs a training split: set data\.train\.root="):
        load_settings(cfg)
    coco = compose_config(
        "train=finetune",
        "data=lpcvc_track1",
        "data.root=/data/t1",
        "data.train.format=coco",
        "data.train.root=/data/coco",
    )
    assert load_settings(coco).data.train.format == "coco"


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("train.unfreeze=half", ["train.unfreeze", "last_blocks"]),
        ("train.hard_negatives.word_groups=[]", ["train.hard_negatives.enabled", "word_groups"]),
        ("data.train.format=tsv", ["data.train.format", "coco"]),
        ("train.lr_text=0", ["train.lr_text", "> 0"]),
    ],
)
def test_bad_training_settings_are_named(override, words):
    cfg = compose_config("train=finetune", "train.hard_negatives.enabled=true", override)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    for w in words:
        assert w in str(err.value)


def test_calibration_comes_from_the_training_split(cfg_factory, tmp_path):
    cfg = cfg_factory("train=finetune", "data.demo.num_train_images=10")
    track = build_track_for(cfg)
    data = track.load_data(tmp_path, training=True)
    images = track.calibration_inputs(data, "image_encoder", 8)
    texts = track.calibration_inputs(data, "text_encoder", 8)
    assert images.shape == (8, 3, 224, 224) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert texts.shape == (8, 77) and texts.dtype == np.int64
    assert data.stats["train_images"] == 10 and data.stats["train_captions"] == 30
    assert [d.context for d in data.datasets] == ["evaluation", "training"]
    untrained = track.load_data(tmp_path, training=False)
    assert track.calibration_inputs(untrained, "image_encoder", 8) is None
