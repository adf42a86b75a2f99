"""Weights files in the exact layouts upstream publishes, with random values, and a server on
127.0.0.1 that hands them out as the Hugging Face Hub and download.pytorch.org do.

- :func:`openai_archive`: a TorchScript archive as OpenAI's ``clip.load`` leaves it in
  ``~/.cache/clip``: the weights (fp16), ``input_resolution``, ``context_length`` and
  ``vocab_size``, no ``attn_mask`` (``open_clip.load_openai_model`` reads it).
- :func:`hf_repo`: a Hugging Face repository of open_clip weights: ``open_clip_model.safetensors``
  and ``open_clip_config.json`` beside it.
- :class:`HubServer`: ``/<repo>/resolve/<revision>/<file>`` with the headers
  ``huggingface_hub``'s client reads (``X-Repo-Commit``, ``ETag``, ``Content-Length``), and any
  other path as a plain file (torch hub's ``load_state_dict_from_url``).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import torch
from torch import nn

# A CLIP small enough for tests whose shapes OpenAI's loader infers back exactly (heads = width
# / 64, MLP ratio 4): what open_clip.build_model_from_openai_state_dict builds from its weights.
TINY_OPENAI_CFG = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 224,
        "patch_size": 32,
        "width": 64,
        "layers": 1,
        "head_width": 64,
        "mlp_ratio": 4.0,
    },
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 64,
        "heads": 1,
        "layers": 1,
        "mlp_ratio": 4.0,
    },
}
# The same, as overrides of backbone=clip_tiny.
TINY_OPENAI = [
    "backbone=clip_tiny",
    "backbone.model_cfg.embed_dim=32",
    *(f"backbone.model_cfg.vision_cfg.{k}={v}" for k, v in TINY_OPENAI_CFG["vision_cfg"].items()),
    *(f"backbone.model_cfg.text_cfg.{k}={v}" for k, v in TINY_OPENAI_CFG["text_cfg"].items()),
]


def tiny_backbone(**overrides: object) -> dict:
    """A Track 1 backbone config (a mapping) of :data:`TINY_OPENAI_CFG`."""
    return {
        "name": "clip_tiny",
        "model_name": "clip_tiny",
        "tokenizer": "ViT-B-16",
        "pretrained": None,
        "model_cfg": dict(TINY_OPENAI_CFG),
        **overrides,
    }


def random_clip(quick_gelu: bool, seed: int = 0, cfg: dict | None = None) -> nn.Module:
    """An open_clip CLIP of ``cfg`` (default :data:`TINY_OPENAI_CFG`) with random weights whose
    scale makes the activation matter (GELU and QuickGELU give visibly different outputs)."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**(cfg or TINY_OPENAI_CFG), quick_gelu=quick_gelu)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embedding" not in name:
                p.normal_(0, 3.0 / p.shape[-1] ** 0.5)
    return model.eval()


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def openai_archive(state: dict[str, torch.Tensor], path: Path, image_size: int = 224) -> Path:
    """Write ``state`` (an open_clip CLIP's state dict) as OpenAI's TorchScript archive."""
    root = _Holder()
    for key, tensor in state.items():
        if key == "attn_mask":
            continue
        *parts, leaf = key.split(".")
        module = root
        for part in parts:
            if part not in module._modules:
                module.add_module(part, _Holder())
            module = module._modules[part]
        value = tensor.detach().clone()
        value = value.half() if value.is_floating_point() else value
        module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    root.register_buffer("input_resolution", torch.tensor(image_size))
    root.register_buffer("context_length", torch.tensor(state["positional_embedding"].shape[0]))
    root.register_buffer("vocab_size", torch.tensor(state["token_embedding.weight"].shape[0]))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(root), str(path))
    return path


def hf_repo(
    folder: Path,
    state: dict[str, torch.Tensor],
    model_cfg: dict,
    quick_gelu: bool,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> Path:
    """A Hugging Face repository folder of open_clip weights; returns the weights file."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    config = {
        "model_cfg": {**model_cfg, "quick_gelu": quick_gelu},
        "preprocess_cfg": {"mean": list(mean), "std": list(std)},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return weights


class HubServer:
    """A local file server: ``repos`` maps ``org/name`` to a folder served under
    ``/<org/name>/resolve/<revision>/<file>``; ``files`` maps any other path to a file. Counts
    the requests it answered (``requests``)."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, repos: dict[str, Path] | None = None, files: dict[str, Path] | None = None):
        self.repos = repos or {}
        self.files = files or {}
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return None

            def _find(self) -> Path | None:
                path = self.path.split("?")[0]
                if path in server.files:
                    return server.files[path]
                for repo, folder in server.repos.items():
                    prefix = f"/{repo}/resolve/"
                    if path.startswith(prefix):
                        name = path[len(prefix) :].split("/", 1)[-1]
                        found = folder / name
                        return found if found.is_file() else None
                return None

            def _answer(self, body: bool) -> None:
                server.requests.append((self.command, self.path))
                found = self._find()
                if found is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = found.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", server.COMMIT)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                self._answer(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(body=True)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
