"""train.hard_negatives.kind=mined: the captions the current model confuses, mined each epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose_config
from test_compose import _outcome

from lpcvlab.config import load_settings
from lpcvlab.data.images import ImagePreprocess
from lpcvlab.training.contrastive import CaptionDataset, ContrastiveModule, Validation
from lpcvlab.training.hard_negatives import CaptionMiner

# image i owns captions offsets[i]:offsets[i+1]; caption 3 says what image 0's caption says
CAPTIONS = ["a red square", "a blue circle", "a green star", "a red square", "a grey moon"]
OFFSETS = np.array([0, 1, 2, 5])


def test_mining_keeps_the_most_similar_captions_of_other_images():
    sim = torch.tensor(
        [
            [0.2, 0.9, 0.1, 0.95, 0.3],  # 0: own 0.2; 3 is equal to its own caption
            [0.8, 0.7, 0.1, 0.2, 0.6],  # 1: own 0.7, confused by 0
            [0.1, 0.2, 0.9, 0.3, 0.4],  # 2: owns 2, 3, 4
        ]
    )
    miner = CaptionMiner(per_image=2)
    mined, stats = miner.mine(sim, OFFSETS, CAPTIONS)
    assert mined[0] == [1, 4]  # never 0 or 3 (its own text), most similar first
    assert mined[1] == [0, 4]
    assert mined[2] == [1]  # caption 0 is the text of its own caption 3: no negative
    # image 0's best own caption (3, 0.95) beats 0.9; image 1's (0.7) loses to caption 0
    assert stats.mined == 5 and stats.confused == 1
    assert stats.hit_at_10 == 1.0  # 5 captions: every own caption is in the top 10
    assert miner.history == [stats]


def test_the_dataset_draws_its_negative_from_the_mined_captions():
    class Tokenizer:
        def __call__(self, texts, context_length=None):
            return np.array([[CAPTIONS.index(t) + 1, 0] for t in texts])

    pixels = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    ds = CaptionDataset(pixels, CAPTIONS, OFFSETS, Tokenizer(), ImagePreprocess(size=4))
    assert "negative" not in ds[0]
    ds.mined = [[1], [], [0]]
    assert ds[0]["has_negative"] and ds[0]["negative"].tolist() == [2, 0]
    assert not ds[1]["has_negative"]

    model = torch.nn.Module()
    model.encode_image = lambda x: x.reshape(len(x), -1)[:, :2] + 1.0  # noqa: E731
    model.encode_text = lambda t: torch.nn.functional.one_hot(t[:, 0] % 2, 2).float()  # noqa: E731
    model.logit_scale = torch.nn.Parameter(torch.tensor(1.0))
    module = ContrastiveModule(model, torch.optim.SGD, Validation([], [], [10]))
    stats = ds.mine(module, CaptionMiner(per_image=1))
    assert len(ds.mined) == 3 and stats.mined == 3


def test_mined_needs_no_word_groups_and_the_kind_is_checked():
    base = ["backbone=clip_tiny", "train=finetune", "data.train.root=/tmp/x"]
    s = load_settings(
        compose_config(
            *base,
            "train.hard_negatives.enabled=true",
            "train.hard_negatives.kind=mined",
            "train.hard_negatives.word_groups=[]",
        )
    )
    assert s.train.hard_negatives.kind == "mined"
    message = _outcome(*base, "train.hard_negatives.kind=hardest")
    assert message is not None and "train.hard_negatives.kind" in message


@pytest.mark.parametrize("kind", ["words", "mined"])
def test_both_kinds_compose(kind):
    assert _outcome("experiment=track1_finetune_demo", f"train.hard_negatives.kind={kind}") is None
