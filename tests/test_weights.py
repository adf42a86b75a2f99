"""Every published weights format loads, its activation and normalisation are the weights' own,
the model as loaded matches the weights' authors' code, and a missing tag is fetched on first
use (through a server on 127.0.0.1: no test reaches the internet)."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf
from weights_files import (
    TINY_OPENAI,
    TINY_OPENAI_CFG,
    HubServer,
    hf_repo,
    openai_archive,
    random_clip,
)

from lpcvlab.config import load_settings
from lpcvlab.config import weights as config_weights
from lpcvlab.config.weights import clip_cache_lookup, inspect_checkpoint, plan_weights
from lpcvlab.errors import ConfigError
from lpcvlab.models.clip import build_clip
from lpcvlab.models.video import load_video
from lpcvlab.models.weights import quiet_open_clip
from lpcvlab.tracks import TrackData, build_track

IMAGE, TEXT, VIDEO = "image_encoder", "text_encoder", "video_classifier"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_CLIP = {
    "name": "clip_tiny",
    "model_name": "clip_tiny",
    "tokenizer": "ViT-B-16",
    "pretrained": None,
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 224,
            "patch_size": 32,
            "width": 32,
            "layers": 1,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    },
}


@pytest.fixture(autouse=True)
def _report_every_miss(monkeypatch):
    monkeypatch.setattr(config_weights, "_reported", set())


def _retrieval_inputs(n: int = 2) -> TrackData:
    rng = np.random.default_rng(0)
    images = rng.random((n, 3, 224, 224), dtype=np.float32)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    tokens = tokenizer(["a dog on a red sofa", "two people walking in the rain"][:n]).numpy()
    return TrackData(inputs={IMAGE: images, TEXT: tokens})


def _track(*overrides: str):
    """The Track 1 track a run of these overrides builds (config loaded and checked)."""
    return build_track(load_settings(compose_config(*overrides)))


def _equal_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    mine = model.state_dict()
    for key, value in state.items():
        if key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
            continue
        assert torch.equal(mine[key], value.to(mine[key].dtype)), key


# --------------------------------------------------------------------------- what a file is


@pytest.mark.parametrize(
    ("content", "found"),
    [
        (b"", "empty (0 bytes)"),
        (b"<!DOCTYPE html><html><body>Sign in</body></html>", "an HTML page"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "a Git LFS pointer"),
        (b"hello\n", "a text file starting 'hello'"),
        (b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a", "not a known format"),
    ],
)
def test_a_file_that_is_no_weights_is_named_with_what_it_holds(tmp_path, content, found):
    path = tmp_path / "ViT-B-16.pt"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        inspect_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and found in message


def test_pickled_objects_numpy_archives_and_empty_pickles_are_not_weights(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    torch.save({"epoch": 3}, tmp_path / "none.pt")
    np.savez(tmp_path / "jax.npz", a=np.zeros(3))
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hi")
    expected = {
        "model.pt": "a pickled Python object (torch.nn.modules.linear Linear)",
        "none.pt": "a PyTorch file holding no tensors",
        "jax.npz": "a NumPy .npz archive",
        "other.zip": "a zip archive without PyTorch's layout (it holds readme.txt)",
    }
    for name, found in expected.items():
        with pytest.raises(ConfigError, match=rf"is not a weights file .*{found[:20]}"):
            inspect_checkpoint(tmp_path / name)


def test_a_file_that_is_no_weights_stops_the_run_when_the_config_is_loaded(tmp_path):
    bad = tmp_path / "ViT-B-16.pt"
    bad.write_text("<html>rate limited</html>")
    with pytest.raises(ConfigError, match="an HTML page"):
        load_settings(compose_config("backbone=clip_vit_b16", f"backbone.pretrained={bad}"))


# --------------------------------------------------------------------------- Track 1 formats


def _write(fmt: str, folder: Path, model: torch.nn.Module) -> tuple[Path, dict, list[str]]:
    """The model's weights in ``fmt``: (file, the tensors it holds, extra overrides)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if fmt == "archive":
        path = openai_archive(state, folder / "tiny-openai.pt")
        return path, {k: v.half() for k, v in state.items()}, []
    if fmt == "hf_repo":  # safetensors with open_clip_config.json beside it
        path = hf_repo(folder / "repo", state, TINY_OPENAI_CFG, True, OPENAI_MEAN, OPENAI_STD)
        return path, state, []
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = folder / "tiny.safetensors"
        save_file(state, str(path))
        return path, state, ["backbone.quick_gelu=true"]
    if fmt == "open_clip_checkpoint":  # open_clip's training: {"state_dict": {"module.*"}}
        path = folder / "epoch_3.pt"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
        return path, state, ["backbone.quick_gelu=true"]
    path = folder / f"tiny.{fmt}"  # pt, bin: torch.save of the state dict
    torch.save(state, path)
    return path, state, ["backbone.quick_gelu=true"]


@pytest.mark.parametrize(
    "fmt", ["archive", "pt", "bin", "safetensors", "hf_repo", "open_clip_checkpoint"]
)
def test_each_track1_format_loads_its_tensors_and_matches_open_clip(tmp_path, fmt, capfd):
    model = random_clip(quick_gelu=True)
    path, state, extra = _write(fmt, tmp_path, model)
    track = _track(*TINY_OPENAI, f"backbone.pretrained={path}", *extra)
    bundle = track.build_model()
    _equal_state(bundle.model, state)
    assert bundle.weights == str(path)
    assert bundle.facts["weights/activation"] == "quick_gelu"
    parity = track.reference_parity(bundle, _retrieval_inputs())
    assert parity.failure() is None, parity.failure()
    assert min(parity.cosine_min.values()) >= 0.9999
    err = capfd.readouterr().err
    assert err.count("==> weights: ") == 1 and str(path) in err
    assert "initialized randomly" not in err
    if fmt in ("archive", "hf_repo"):  # the file says which normalisation: baked in
        assert bundle.facts["normalization/mean"] == ",".join(f"{v:.8g}" for v in OPENAI_MEAN)
        assert bundle.facts["normalization/where"] == "graph"
    if fmt == "archive":
        assert "load_openai_model" in parity.reference
    else:
        assert "create_model_and_transforms" in parity.reference


def test_an_lpcvlab_training_checkpoint_loads_with_what_it_was_trained_with(tmp_path):
    model = random_clip(quick_gelu=True)
    backbone = dict(OmegaConf.to_container(compose_config(*TINY_OPENAI).backbone))
    ckpt = {
        "pytorch-lightning_version": "2.6.6",
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "lpcvlab": {
            "track": "retrieval",
            "backbone": backbone,
            "quick_gelu": True,
            "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        },
    }
    path = tmp_path / "best.ckpt"
    torch.save(ckpt, path)
    assert inspect_checkpoint(path).kind == "lpcvlab_checkpoint"
    track = _track(*TINY_OPENAI, f"backbone.pretrained={path}")
    bundle = track.build_model()
    _equal_state(bundle.model, model.state_dict())
    assert bundle.facts["weights/activation"] == "quick_gelu"
    assert bundle.facts["normalization/mean"] == "0.5,0.5,0.5"
    parity = track.reference_parity(bundle, _retrieval_inputs())
    assert parity.failure() is None, parity.failure()
    # An explicit normalisation other than the one it was trained with is refused.
    with pytest.raises(ConfigError, match="force_normalization=true"):
        load_settings(
            compose_config(*TINY_OPENAI, f"backbone.pretrained={path}", "preprocess=clip_mean_std")
        )


def test_a_loader_that_builds_the_wrong_activation_fails_reference_parity(tmp_path, monkeypatch):
    from lpcvlab.models import clip as clip_module

    path, _, _ = _write("archive", tmp_path, random_clip(quick_gelu=True))
    real = clip_module._new_model
    monkeypatch.setattr(clip_module, "_new_model", lambda b, quick_gelu: real(b, False))
    track = _track(*TINY_OPENAI, f"backbone.pretrained={path}")
    parity = track.reference_parity(track.build_model(), _retrieval_inputs())
    message = parity.failure()
    assert message is not None and "\n" not in message
    assert "image_encoder" in message and "text_encoder" in message
    assert "activation: lpcvlab GELU x2, reference QuickGELU x2" in message
    # On random weights the outputs can stay close (cosine above 0.9999 here): the graph is
    # compared too, so the wrong activation fails all the same.
    assert min(parity.cosine_min.values()) < 1.0


def test_random_weights_are_checked_against_open_clip_all_the_same(capfd):
    track = _track("backbone=clip_tiny", "preprocess=clip_mean_std")
    bundle = track.build_model()
    assert bundle.weights == "random"
    parity = track.reference_parity(bundle, _retrieval_inputs())
    assert parity.failure() is None and min(parity.cosine_min.values()) >= 0.9999
    assert "lpcvlab's loaded state dict" in parity.reference
    err = capfd.readouterr().err
    assert "initialized randomly" not in err and "==> weights: " not in err


@pytest.mark.slow
def test_a_full_size_openai_vit_b32_archive_in_the_cache_dir_matches_load_openai_model(tmp_path):
    """What `python run.py backbone=clip_vit_b32 backbone.cache_dir=DIR` loads with OpenAI's
    ViT-B-32.pt in DIR (random values, the real architecture: a 300 MB file)."""
    torch.manual_seed(0)
    with quiet_open_clip():
        source = open_clip.create_model("ViT-B-32", force_quick_gelu=True)
    state = {k: v.half() for k, v in source.state_dict().items()}
    openai_archive(source.state_dict(), tmp_path / "ViT-B-32.pt")
    del source
    track = _track("backbone=clip_vit_b32", f"backbone.cache_dir={tmp_path}")
    bundle = track.build_model()
    assert bundle.weights == "openai"
    _equal_state(bundle.model, state)
    assert bundle.facts["weights/activation"] == "quick_gelu"
    assert bundle.facts["normalization/where"] == "graph"
    assert bundle.facts["normalization/mean"] == ",".join(f"{v:.8g}" for v in OPENAI_MEAN)
    parity = track.reference_parity(bundle, _retrieval_inputs())
    assert parity.failure() is None, parity.failure()
    assert min(parity.cosine_min.values()) >= 0.9999
    assert parity.reference.startswith(f"open_clip.load_openai_model({tmp_path / 'ViT-B-32.pt'})")


# --------------------------------------------------------------------------- the activation


def _small_state_dict(path: Path) -> Path:
    torch.save({"visual.proj": torch.zeros(2, 2)}, path)  # what compose reads: the format
    return path


def test_a_vit_b16_state_dict_path_needs_its_activation_named(tmp_path):
    path = _small_state_dict(tmp_path / "ViT-B-16.pt")
    base = ("backbone=clip_vit_b16", f"backbone.pretrained={path}")
    with pytest.raises(ConfigError) as info:
        load_settings(compose_config(*base))
    message = str(info.value)
    assert "\n" not in message and "backbone.quick_gelu=true|false" in message
    for value in ("true", "false"):
        settings = load_settings(compose_config(*base, f"backbone.quick_gelu={value}"))
        assert plan_weights(settings.backbone).quick_gelu is (value == "true")
    # The file can say so: open_clip's JSON beside it, or OpenAI's archive format.
    (tmp_path / "open_clip_config.json").write_text('{"model_cfg": {"quick_gelu": true}}')
    assert plan_weights(load_settings(compose_config(*base)).backbone).quick_gelu is True
    with pytest.raises(ConfigError, match="contradicts"):
        load_settings(compose_config(*base, "backbone.quick_gelu=false"))


def test_an_openai_archive_is_quick_gelu_and_a_tag_keeps_its_own(tmp_path):
    archive = openai_archive(random_clip(True).state_dict(), tmp_path / "ViT-B-32.pt")
    settings = load_settings(
        compose_config("backbone=clip_vit_b32", f"backbone.pretrained={archive}")
    )
    plan = plan_weights(settings.backbone)
    assert plan.quick_gelu is True and plan.normalization.mean == OPENAI_MEAN
    with pytest.raises(ConfigError, match="OpenAI archive"):
        load_settings(
            compose_config(
                "backbone=clip_vit_b32",
                f"backbone.pretrained={archive}",
                "backbone.quick_gelu=false",
            )
        )
    with pytest.raises(ConfigError, match="a tag keeps its own"):
        load_settings(compose_config("backbone=clip_vit_b16", "backbone.quick_gelu=false"))
    tag = plan_weights(load_settings(compose_config("backbone=clip_vit_b16")).backbone)
    assert tag.quick_gelu is True and tag.activation_from == "tag openai"


# --------------------------------------------------------------------------- the normalisation


def test_an_explicit_normalisation_other_than_the_weights_is_refused_at_compose():
    with pytest.raises(ConfigError) as info:
        load_settings(compose_config("backbone=mobileclip2_s0", "preprocess=clip_mean_std"))
    message = str(info.value)
    assert "\n" not in message
    assert "preprocess=clip_mean_std" in message
    assert "mean (0.48145466, 0.4578275, 0.40821073)" in message  # what was asked
    assert "mean (0, 0, 0) std (1, 1, 1)" in message  # what the weights were trained with
    assert "preprocess.image.force_normalization=true" in message
    forced = ("backbone=mobileclip2_s0", "preprocess=clip_mean_std")
    load_settings(compose_config(*forced, "preprocess.image.force_normalization=true"))
    load_settings(compose_config("backbone=clip_vit_b16", "preprocess=clip_mean_std"))
    with pytest.raises(ConfigError, match="backbone.force_normalization=true"):
        video = ("track=video", "backbone=r3d_18", "backbone.mean=[0,0,0]", "backbone.std=[1,1,1]")
        load_settings(compose_config(*video))


def test_the_weights_own_normalisation_is_baked_by_default_and_the_baseline_bakes_none():
    track = build_track(load_settings(compose_config("backbone=clip_vit_b32")))
    assert tuple(track.image.mean) == OPENAI_MEAN and track.image.normalize_in_model
    assert track.facts()["normalization/from"].startswith("the weights' own (open_clip's config")
    baseline = compose_config("experiment=track1_baseline", "data=demo_retrieval")
    track = build_track(load_settings(baseline))
    assert track.image.mean is None
    assert track.facts()["normalization"] == "none"
    mobile = build_track(load_settings(compose_config("backbone=mobileclip2_s0")))
    assert mobile.image.mean is None  # identity: nothing to bake
    assert "dfndr2b" in mobile.facts()["normalization/from"]


# --------------------------------------------------------------------------- tags and fetching

TAG_ARCH = "lpcvlab_tiny_test"
TAG_REPO = "lpcvlab/tiny-test"


@pytest.fixture
def tiny_tag(tmp_path_factory, monkeypatch):
    """A tiny architecture with an open_clip tag ``test`` whose weights live in ``TAG_REPO``
    (QuickGELU, OpenAI's mean/std), registered as open_clip registers its own."""
    from open_clip import pretrained

    folder = tmp_path_factory.mktemp("configs")
    (folder / f"{TAG_ARCH}.json").write_text(__import__("json").dumps(TINY_OPENAI_CFG))
    if open_clip.get_model_config(TAG_ARCH) is None:
        open_clip.add_model_config(folder / f"{TAG_ARCH}.json")
    cfg = {
        "url": "",
        "hf_hub": f"{TAG_REPO}/",
        "mean": OPENAI_MEAN,
        "std": OPENAI_STD,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "quick_gelu": True,
    }
    monkeypatch.setitem(pretrained._PRETRAINED, TAG_ARCH, {"test": cfg})
    return TAG_ARCH


def _tag_overrides(cache: Path, *more: str) -> list[str]:
    return [
        "backbone=clip_vit_b32",
        f"backbone.model_name={TAG_ARCH}",
        "backbone.tokenizer=ViT-B-16",
        "backbone.pretrained=test",
        f"backbone.cache_dir={cache}",
        *more,
    ]


def _hf_endpoint(monkeypatch, url: str) -> None:
    """What HF_ENDPOINT=url sets when huggingface_hub is imported (it is, by now)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)


def test_a_tag_in_the_hugging_face_cache_loads_with_its_own_activation(tmp_path, tiny_tag):
    model = random_clip(quick_gelu=True)
    cache = tmp_path / "hf"
    snap = cache / "models--lpcvlab--tiny-test" / "snapshots" / "abc123"
    hf_repo(snap, model.state_dict(), TINY_OPENAI_CFG, True, OPENAI_MEAN, OPENAI_STD)
    (cache / "models--lpcvlab--tiny-test" / "refs").mkdir(parents=True)
    (cache / "models--lpcvlab--tiny-test" / "refs" / "main").write_text("abc123")
    track = _track(*_tag_overrides(cache))
    bundle = track.build_model()
    assert bundle.weights == "test"
    _equal_state(bundle.model, model.state_dict())
    assert tuple(track.image.mean) == OPENAI_MEAN
    parity = track.reference_parity(bundle, _retrieval_inputs())
    assert parity.failure() is None, parity.failure()


def test_a_missing_tag_is_fetched_through_huggingface_hub(tmp_path, tiny_tag, monkeypatch):
    model = random_clip(quick_gelu=True)
    repo = tmp_path / "served"
    hf_repo(repo, model.state_dict(), TINY_OPENAI_CFG, True, OPENAI_MEAN, OPENAI_STD)
    cache = tmp_path / "hf"
    with HubServer(repos={TAG_REPO: repo}) as server:
        _hf_endpoint(monkeypatch, server.url)
        # demo data fetches nothing unless asked: backbone.download=true
        track = _track(*_tag_overrides(cache, "backbone.download=true"))
        bundle = track.build_model()
    assert bundle.weights == "test"
    _equal_state(bundle.model, model.state_dict())
    fetched = list(cache.glob("models--lpcvlab--tiny-test/snapshots/*/open_clip_model.safetensors"))
    assert len(fetched) == 1
    assert ("GET", f"/{TAG_REPO}/resolve/main/open_clip_model.safetensors") in server.requests
    parity = track.reference_parity(bundle, _retrieval_inputs())
    assert parity.failure() is None, parity.failure()
    # The next run finds it in the cache: nothing fetched, the same weights.
    again = _track(*_tag_overrides(cache, "backbone.download=true"))
    assert again.backbone.plan.file == fetched[0] and again.backbone.plan.fetch is None


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "backbone.download=false", "demo data"])
def test_offline_a_missing_tag_runs_random_saying_how_to_fetch_it(
    tmp_path, tiny_tag, monkeypatch, caplog, offline
):
    from huggingface_hub import constants

    more = {"backbone.download=false": ["backbone.download=false"], "demo data": []}
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with HubServer() as server:
        _hf_endpoint(monkeypatch, server.url)
        with caplog.at_level(logging.WARNING):
            track = _track(*_tag_overrides(tmp_path, *more.get(offline, [])))
            bundle = track.build_model()
    assert server.requests == []  # nothing was asked of the network
    assert bundle.weights == "random"
    text = caplog.text
    assert f"hf download {TAG_REPO} open_clip_model.safetensors --cache-dir {tmp_path}" in text
    assert "RANDOM" in text and str(tmp_path) in text
    # still the tag's activation and normalisation: the graph is the real one
    assert bundle.facts["weights/activation"] == "quick_gelu"
    assert tuple(track.image.mean) == OPENAI_MEAN


def test_without_network_a_missing_tag_runs_random_saying_why(
    tmp_path, tiny_tag, monkeypatch, caplog
):
    with HubServer() as server:
        url = server.url
    _hf_endpoint(monkeypatch, url)  # nothing listens there any more: no network
    track = _track(*_tag_overrides(tmp_path, "backbone.download=true"))
    with caplog.at_level(logging.WARNING):
        assert track.build_model().weights == "random"
    text = caplog.text
    assert "fetching it with huggingface_hub failed (no answer from the Hugging Face Hub" in text
    assert f"hf download {TAG_REPO} open_clip_model.safetensors" in text and "RANDOM" in text
    assert "Retrying" not in text  # one request, not half a minute of retries


# --------------------------------------------------------------------------- Track 2


def _video_backbone(**kw):
    return OmegaConf.create({"name": "r3d", "arch": "r3d_18", "pretrained": None, **kw})


def test_video_head_sized_from_class_map_and_kinetics_checkpoint_loads(tmp_path, monkeypatch):
    from torchvision.models.video import r3d_18

    kinetics = r3d_18(weights=None)  # 400-class head, like the torchvision checkpoint
    path = tmp_path / "r3d_18-kinetics.pth"
    torch.save(kinetics.state_dict(), path)
    model, weights, _ = load_video(_video_backbone(pretrained=str(path)), num_classes=92)
    assert weights == str(path) and model.fc.out_features == 92
    assert torch.equal(model.stem[0].weight, kinetics.stem[0].weight)

    # The kinetics400 tag is taken from the torch hub cache when the file is there.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    offline = _video_backbone(pretrained="kinetics400", download=False)
    _, weights, _ = load_video(offline, 92)
    assert weights == "random"
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "r3d_18-b3b3357e.pth").write_bytes(path.read_bytes())
    model, weights, _ = load_video(_video_backbone(pretrained="kinetics400"), 92)
    assert weights == "kinetics400"
    assert torch.equal(model.stem[0].weight, kinetics.stem[0].weight)


def test_video_checkpoint_of_another_architecture_is_refused(tmp_path):
    from torchvision.models.video import mc3_18

    path = tmp_path / "mc3.pth"
    torch.save(mc3_18(weights=None).state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit"):
        load_video(_video_backbone(arch="r2plus1d_18", pretrained=str(path)), 92)


def _video_inputs(n: int = 2) -> TrackData:
    rng = np.random.default_rng(0)
    return TrackData(inputs={VIDEO: rng.random((n, 3, 4, 112, 112), dtype=np.float32)})


VIDEO_RUN = ["track=video", "preprocess.video.num_frames=4"]


def test_a_torchvision_pth_and_the_torch_hub_fetch_load_and_match_torchvision(
    tmp_path, monkeypatch
):
    from torchvision.models.video import MC3_18_Weights, mc3_18

    torch.manual_seed(0)
    source = mc3_18(weights=None)  # a random "Kinetics" checkpoint: 400 classes
    state = source.state_dict()
    pth = tmp_path / "mc3_18.pth"
    torch.save(state, pth)
    track = build_track(
        load_settings(compose_config(*VIDEO_RUN, "backbone=mc3_18", f"backbone.pretrained={pth}"))
    )
    bundle = track.build_model()
    _equal_state(bundle.model, {k: v for k, v in state.items() if not k.startswith("fc.")})
    assert bundle.facts["normalization/from"].startswith("the weights' own (torchvision's")
    parity = track.reference_parity(bundle, _video_inputs())
    assert parity.failure() is None, parity.failure()
    assert "MC3_18_Weights.KINETICS400_V1.transforms()" in parity.reference

    # kinetics400, not in the torch hub cache: fetched by torch hub from the (local) server,
    # under the name whose hash torch hub checks.
    import hashlib

    digest = hashlib.sha256(pth.read_bytes()).hexdigest()[:8]
    name = f"mc3_18-{digest}.pth"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with HubServer(files={f"/models/{name}": pth}) as server:
        url = f"{server.url}/models/{name}"
        monkeypatch.setattr(MC3_18_Weights.KINETICS400_V1.value, "url", url)
        tag = ("backbone=mc3_18", "backbone.pretrained=kinetics400", "backbone.download=true")
        track = build_track(load_settings(compose_config(*VIDEO_RUN, *tag)))
        bundle = track.build_model()
    assert bundle.weights == "kinetics400"
    assert (tmp_path / "hub" / "checkpoints" / name).is_file()
    _equal_state(bundle.model, {k: v for k, v in state.items() if not k.startswith("fc.")})
    parity = track.reference_parity(bundle, _video_inputs())
    assert parity.failure() is None, parity.failure()
    assert "get_state_dict" in parity.reference


def test_video_tiny_and_an_lpcvlab_video_checkpoint_keep_what_they_were_trained_with(tmp_path):
    track = build_track(load_settings(compose_config(*VIDEO_RUN)))  # video_tiny, random
    bundle = track.build_model()
    parity = track.reference_parity(bundle, _video_inputs())
    assert parity.failure() is None
    backbone = dict(OmegaConf.to_container(compose_config(*VIDEO_RUN).backbone))
    state = {f"net.model.{k}": v for k, v in bundle.model.state_dict().items()}
    state |= {"net.mean": torch.full((1, 3, 1, 1, 1), 0.5), "net.std": torch.ones(1, 3, 1, 1, 1)}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "lpcvlab": {"track": "video", "backbone": backbone}}, path)
    track = build_track(load_settings(compose_config(*VIDEO_RUN, f"backbone.pretrained={path}")))
    assert track.backbone.mean == (0.5, 0.5, 0.5)  # the buffers it was trained with
    bundle = track.build_model()
    assert track.reference_parity(bundle, _video_inputs()).failure() is None


# --------------------------------------------------------------------------- older API


def test_random_clip_is_tagged_and_announced(caplog):
    with caplog.at_level(logging.WARNING):
        _, _, weights = build_clip(OmegaConf.create(TINY_CLIP))
    assert weights == "random"
    assert "RANDOM WEIGHTS" in caplog.text


def test_clip_weights_from_a_file(tmp_path):
    torch.manual_seed(1)
    model, _, _ = build_clip(OmegaConf.create(TINY_CLIP))
    path = tmp_path / "clip_tiny.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(2)
    loaded, _, weights = build_clip(OmegaConf.create({**TINY_CLIP, "pretrained": str(path)}))
    assert weights == str(path)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_missing_checkpoint_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint file"):
        build_clip(OmegaConf.create({**TINY_CLIP, "pretrained": str(tmp_path / "nope.pt")}))


def test_open_clip_tag_resolves_from_an_existing_hf_cache_only(tmp_path):
    assert clip_cache_lookup("ViT-B-32", "openai", str(tmp_path)).found is None  # nothing fetched
    repo = tmp_path / "models--timm--vit_base_patch32_clip_224.openai"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snap / "open_clip_model.safetensors").write_bytes(b"weights")
    found = clip_cache_lookup("ViT-B-32", "openai", str(tmp_path)).found
    assert found == (snap / "open_clip_model.safetensors")


def test_unknown_open_clip_tag_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not an open_clip tag"):
        clip_cache_lookup("ViT-B-32", "no_such_tag", str(tmp_path))
