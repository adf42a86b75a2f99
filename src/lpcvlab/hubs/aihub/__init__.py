"""Qualcomm AI Hub through the ``qai-hub`` client: compile, profile and run on real devices.

What one component goes through (``run_components`` does this for all components at once):

1. **compile** -- the exported ONNX file is uploaded (as a ``<name>.onnx/`` directory holding the
   graph and one ``.data`` file when its weights are external) and compiled with
   ``--target_runtime <runtime.target_runtime> <runtime.compile_options>`` plus the options the
   component itself needs (:func:`compile_options`) plus ``hub.extra_compile_options``.
2. **profile** -- an inference job with profiling on and random inputs,
   ``--max_profiler_iterations <hub.max_profiler_iterations>``; ``download_profile()`` is parsed
   by :func:`lpcvlab.profile.parse_profile`, the raw dict kept in ``ProfileResult.raw``.
3. **inference** -- the inputs go up as datasets of at most ``hub.chunk_bytes`` each (AI Hub
   refuses datasets over 2 GB), one inference job per chunk; the outputs come back in input
   order, and the first ``parity_samples`` are compared with ONNX Runtime on this machine
   (``device_parity_cosine_min``, ``device_parity_psnr`` in ``InferenceResult.metrics``).

Layout convention: the pipeline always hands inputs in the exported layout, ``(N, C, ...)`` for
a channel-first graph. When the compiled model takes an input channel-last
(``--force_channel_last_input``; Track 2's ``video`` is ``(1, 16, 112, 112, 3)`` on device), each
sample is transposed with ``np.moveaxis(x, 1, -1)`` before upload. The layout is read from the
compile job's target input shapes, so it follows what AI Hub actually built; 64-bit integer
inputs are cast to the device's dtype (int32 under ``--truncate_64bit_io``) the same way. Outputs
come back as the device produces them (no ``--force_channel_last_output`` is added).

Every job goes into a :class:`~lpcvlab.ledger.JobLedger` keyed by the content hash of its inputs,
device and options, so an identical rerun reuses finished jobs and an interrupted run picks up
its in-flight jobs instead of paying again (``hub.reuse=false`` forces new jobs).

The API token comes from ``QAI_HUB_API_TOKEN`` or the client's own config file
(``~/.qai_hub/client.ini``, or ``$QAIHUB_CLIENT_INI``). It is never logged, stored or returned:
messages that quote the service are scrubbed of it.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin

import numpy as np
import onnx
import onnxruntime as ort
import qai_hub
import qai_hub.client as hub_client
import requests
from omegaconf import DictConfig, ListConfig, OmegaConf
from qai_hub import api_utils
from qai_hub.public_rest_api import DEFAULT_HUB_API_URL, DEFAULT_HUB_WEB_URL, APIException
from tqdm.auto import tqdm

from lpcvlab.errors import ConfigError, RuntimeStageError
from lpcvlab.hashing import array_sha256, file_sha256
from lpcvlab.ledger import FAILED, SUBMITTED, SUCCESS, JobLedger, LedgerEntry, job_key
from lpcvlab.profile import parse_profile
from lpcvlab.runtimes.base import ComponentJob, JobListener
from lpcvlab.types import (
    CompileResult,
    ComponentRun,
    ExportResult,
    InferenceResult,
    JobEvent,
    ProfileResult,
)

log = logging.getLogger(__name__)

TOKEN_ENV = "QAI_HUB_API_TOKEN"
# AI Hub refuses larger datasets; hub.chunk_bytes may not exceed it.
AIHUB_DATASET_LIMIT_BYTES = 2 * 1024**3
# The name AI Hub gives a compiled model's first output unless told otherwise.
AIHUB_DEFAULT_OUTPUT_NAME = "output_0"
_MAX_BACKOFF_S = 60.0

_RateLimitedError: type[Exception] | None = getattr(hub_client, "RateLimitedError", None)
T = TypeVar("T")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class HubSettings:
    """The ``hub`` config group for ``hub=aihub``; see ``conf/hub/aihub.yaml`` for meanings."""

    max_profiler_iterations: int = 100
    extra_compile_options: str = ""
    extra_profile_options: str = ""
    extra_inference_options: str = ""
    channel_last_inputs: tuple[str, ...] = ("video",)
    reuse: bool = True
    share_with: tuple[str, ...] = ()
    poll_interval_s: float = 10.0
    retries: int = 5
    retry_backoff_s: float = 2.0
    chunk_bytes: int = 1_296_000_000
    parity_samples: int = 32
    ledger_path: str | None = None

    @classmethod
    def from_cfg(cls, hub_cfg: Any) -> HubSettings:
        """Validate the ``hub`` group: unknown keys are typos, and typos must not pass silently."""
        raw = _to_plain(hub_cfg)
        if not isinstance(raw, dict):
            raise ConfigError("the hub config group must be a mapping (conf/hub/aihub.yaml)")
        raw = dict(raw)
        raw.pop("name", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(
                f"unknown hub.{unknown[0]} for hub=aihub (known keys: {', '.join(sorted(known))}); "
                "check conf/hub/aihub.yaml and your overrides"
            )
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if name in ("channel_last_inputs", "share_with"):
                values[name] = _str_tuple(value, f"hub.{name}")
            elif name.startswith("extra_"):
                values[name] = "" if value is None else str(value).strip()
            else:
                values[name] = value
        settings = cls(**values)
        settings._check()
        return settings

    def _check(self) -> None:
        if int(self.max_profiler_iterations) < 1:
            raise ConfigError("hub.max_profiler_iterations must be >= 1")
        if float(self.poll_interval_s) < 0:
            raise ConfigError("hub.poll_interval_s must be >= 0 seconds")
        if int(self.retries) < 0:
            raise ConfigError("hub.retries must be >= 0")
        if float(self.retry_backoff_s) < 0:
            raise ConfigError("hub.retry_backoff_s must be >= 0 seconds")
        if not 0 < int(self.chunk_bytes) <= AIHUB_DATASET_LIMIT_BYTES:
            raise ConfigError(
                f"hub.chunk_bytes={self.chunk_bytes} must be in (0, {AIHUB_DATASET_LIMIT_BYTES}]: "
                "AI Hub refuses datasets over 2 GB"
            )
        if int(self.parity_samples) < 0:
            raise ConfigError("hub.parity_samples must be >= 0 (0 turns the parity check off)")


def _to_plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _str_tuple(value: Any, what: str) -> tuple[str, ...]:
    value = _to_plain(value)
    if value is None:
        return ()
    if isinstance(value, str):  # a single name or a comma-separated list on the command line
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple)):
        return tuple(str(v).strip() for v in value if str(v).strip())
    raise ConfigError(f"{what} must be a list of strings, got {value!r}")


def _select(cfg: Any, key: str) -> Any:
    if isinstance(cfg, DictConfig):
        return OmegaConf.select(cfg, key, default=None)
    node = cfg
    for part in key.split("."):
        if node is None:
            return None
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
    return node


# --------------------------------------------------------------------------- compile options


def compile_options(
    exported: ExportResult,
    target_runtime: str,
    runtime_options: str | None = "",
    channel_last_inputs: Collection[str] = (),
    extra: str | None = "",
) -> str:
    """The full ``options`` string of one component's compile job.

    Order: ``--target_runtime``, the runtime config's options, what this component needs, then
    ``hub.extra_compile_options`` (last, so that a user's flag reads as the final word):

    - ``--force_channel_last_input <name>`` when the component's input is in
      ``channel_last_inputs`` and has a channel axis to move (rank >= 3) -- unless the exported
      graph already takes it channel-last (``TensorSpec.channel_last``);
    - ``--output_names <name>`` when the exported output is not AI Hub's default ``output_0``
      (Track 2's ``class_probs``), so the device output keeps the exported name.
    """
    if not target_runtime:
        raise ConfigError("runtime.target_runtime is empty; pick a runtime (runtime=qnn_dlc)")
    runtime_tokens = shlex.split(runtime_options or "")
    extra_tokens = shlex.split(extra or "")
    for where, tokens in (
        ("runtime.compile_options", runtime_tokens),
        ("hub.extra_compile_options", extra_tokens),
    ):
        if "--target_runtime" in tokens:
            raise ConfigError(
                f"{where} sets --target_runtime; choose the target with runtime=<name> "
                f"(runtime.target_runtime={target_runtime!r}) instead"
            )
    parts = ["--target_runtime", target_runtime, *runtime_tokens]
    spec = exported.input
    exported_channel_last = bool(getattr(spec, "channel_last", False))
    if spec.name in channel_last_inputs and len(spec.shape) >= 3 and not exported_channel_last:
        parts += ["--force_channel_last_input", spec.name]
    if exported.output_name and exported.output_name != AIHUB_DEFAULT_OUTPUT_NAME:
        parts += ["--output_names", exported.output_name]
    parts += extra_tokens
    return shlex.join(parts)


def profile_options(settings: HubSettings) -> str:
    """Options of a profile job: the iteration count, then ``hub.extra_profile_options``."""
    parts = ["--max_profiler_iterations", str(int(settings.max_profiler_iterations))]
    parts += shlex.split(settings.extra_profile_options)
    return shlex.join(parts)


def forced_channel_last(options: str) -> set[str]:
    """Input names an options string compiles channel-last."""
    tokens = shlex.split(options)
    names: set[str] = set()
    for i, tok in enumerate(tokens):
        if tok == "--force_channel_last_input" and i + 1 < len(tokens):
            names.update(n.strip() for n in tokens[i + 1].split(",") if n.strip())
    return names


def channel_last_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """``(N, C, d1, ..., dk)`` -> ``(N, d1, ..., dk, C)``: the layout of a channel-last input."""
    return (int(shape[0]), *(int(d) for d in shape[2:]), int(shape[1]))


def samples_per_chunk(shape: Sequence[int], dtype: str, chunk_bytes: int) -> int:
    """How many samples of one model input (``shape`` includes the batch of 1) fit a chunk.

    With the default ``hub.chunk_bytes`` a ``(1, 3, 16, 112, 112)`` float32 clip gives 538, the
    chunk size of the official Track 2 sample.
    """
    sample_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    n = int(chunk_bytes) // max(sample_bytes, 1)
    if n < 1:
        raise ConfigError(
            f"one sample of shape {tuple(shape)} {dtype} is {sample_bytes} bytes, more than "
            f"hub.chunk_bytes={chunk_bytes}; raise hub.chunk_bytes (at most 2 GB)"
        )
    return n


# --------------------------------------------------------------------------- credentials


def load_client_config() -> qai_hub.ClientConfig:
    """The client configuration with its API token, or a ConfigError saying how to provide one.

    ``QAI_HUB_API_TOKEN`` wins; otherwise the file the ``qai-hub`` client itself reads
    (``$QAIHUB_CLIENT_INI`` or ``~/.qai_hub/client.ini``). Its API/web URLs are used either way,
    so an account on another AI Hub deployment keeps working.
    """
    path = api_utils.get_config_path()
    file_cfg = None
    unreadable = False
    if os.path.exists(path):
        try:
            file_cfg = api_utils.load_api_config_from_file(path)
        except Exception:  # noqa: BLE001 - parser messages may quote the file (and so the token)
            unreadable = True
    env_token = os.environ.get(TOKEN_ENV, "").strip()
    if env_token:
        return qai_hub.ClientConfig(
            api_token=env_token,
            api_url=file_cfg.api_url if file_cfg else DEFAULT_HUB_API_URL,
            web_url=file_cfg.web_url if file_cfg else DEFAULT_HUB_WEB_URL,
            verbose=False,
            default_project=file_cfg.default_project if file_cfg else None,
        )
    if file_cfg is not None and file_cfg.api_token.strip():
        file_cfg.verbose = False  # the client's own progress bars and polling prints stay off
        return file_cfg
    found = (
        f"{path} could not be read as an AI Hub client config (it needs an [api] section with "
        "api_url, web_url and api_token)"
        if unreadable
        else f"{path} has no api_token"
        if file_cfg is not None
        else f"{path} does not exist"
    )
    raise ConfigError(
        f"no Qualcomm AI Hub API token: {TOKEN_ENV} is not set and {found}. Run "
        "`qai-hub configure --api_token <your token>` (token from the Account page of "
        f"https://aihub.qualcomm.com) or export {TOKEN_ENV}=<your token>; "
        "hub=local runs without an account."
    )


class _Redactor:
    """Removes the API token from any text that leaves this module."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def __call__(self, text: object) -> str:
        out = str(text)
        if self._secret and len(self._secret) >= 4:
            out = out.replace(self._secret, "***")
        return out

    def __repr__(self) -> str:
        return "<redactor>"


def _plain(text: str) -> str:
    """The client wraps advice in box drawings; one line reads better in a log or an error."""
    text = re.sub(r"[┌┐└┘─│]+", " ", text)
    text = re.sub(r"(^|\s)\|(\s|$)", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: lost connections, timeouts, 5xx and rate limits."""
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return True
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return True
    if isinstance(exc, hub_client.InternalError):  # the client's wrapper for the cases above
        return True
    if _RateLimitedError is not None and isinstance(exc, _RateLimitedError):
        return True
    if isinstance(exc, APIException):
        return exc.status_code is not None and (exc.status_code >= 500 or exc.status_code == 429)
    return False


def _is_auth_failure(message: str) -> bool:
    return "Failed to authenticate" in message or "API token is missing" in message


# What the client and its transport raise; anything else is a bug and keeps its traceback.
_CLIENT_ERRORS = (hub_client.Error, APIException, requests.RequestException, ValueError)


def call_with_retries(
    fn: Callable[[], T],
    what: str,
    retries: int,
    backoff_s: float,
    redact: Callable[[object], str] = str,
    passthrough: tuple[type[BaseException], ...] = (),
) -> T:
    """``fn()`` with transient network errors retried after ``backoff_s * 2**attempt`` seconds.

    A rejected token becomes a ConfigError, any other client error a RuntimeStageError naming
    ``what``, its message scrubbed of the token and raised without the original exception
    attached (which may quote the token); ``passthrough`` types reach the caller untouched.
    """
    attempt = 0
    while True:
        try:
            return fn()
        except passthrough:
            raise
        except _CLIENT_ERRORS as exc:
            transient = _is_transient(exc)
            message = _plain(redact(exc)) or type(exc).__name__
        if transient and attempt < retries:
            delay = min(backoff_s * (2**attempt), _MAX_BACKOFF_S)
            attempt += 1
            log.warning(
                "AI Hub: %s failed (%s); retry %d of %d in %.1f s",
                what,
                message,
                attempt,
                retries,
                delay,
            )
            time.sleep(delay)
            continue
        break
    if _is_auth_failure(message):
        raise ConfigError(
            f"AI Hub rejected the API token while {what}. Check the token on the Account page of "
            f"https://aihub.qualcomm.com, then run `qai-hub configure --api_token <token>` or set "
            f"{TOKEN_ENV}."
        )
    tries = f" after {attempt + 1} tries" if transient else ""
    raise RuntimeStageError(f"AI Hub: {what} failed{tries}: {message}")


class HubClient(qai_hub.Client):
    """A ``qai_hub.Client`` whose ``get_job`` survives a network blip.

    ``submit_*_job`` creates a job and then fetches it with ``get_job``. Were that fetch to fail,
    retrying the whole submission would create -- and bill -- a second job; so the fetch itself
    is retried here, and every fetched ID is noted, so that a submission that still fails can
    tell whether its job exists (:meth:`AIHubRuntime._submit`).
    """

    def __init__(
        self, config: qai_hub.ClientConfig, retries: int = 5, backoff_s: float = 2.0
    ) -> None:
        super().__init__(config=config)
        self.retries = retries
        self.backoff_s = backoff_s
        self.fetched_job_ids: list[str] = []
        self._redact = _Redactor(config.api_token)

    def get_job(self, job_id: str, job_type: Any = None) -> Any:  # type: ignore[override]
        self.fetched_job_ids.append(job_id)
        parent = super()
        return call_with_retries(
            lambda: parent.get_job(job_id, job_type),
            f"fetching job {job_id}",
            self.retries,
            self.backoff_s,
            self._redact,
            passthrough=(hub_client.UserError,),
        )


def make_client(config: qai_hub.ClientConfig | None = None) -> HubClient:
    """A client bound to an explicit config (never the module-global one)."""
    return HubClient(config or load_client_config())


def list_devices(
    client: qai_hub.Client | None = None,
    attributes: Sequence[str] = (),
    retries: int = 3,
    backoff_s: float = 2.0,
) -> list[str]:
    """Names of the AI Hub devices this account can target (what ``device.aihub_name`` takes)."""
    client = client or make_client()
    redact = _Redactor(client.config.api_token)
    devices = call_with_retries(
        lambda: client.get_devices(attributes=list(attributes)),
        "listing devices",
        retries,
        backoff_s,
        redact,
    )
    return sorted({d.name for d in devices})


# --------------------------------------------------------------------------- model files


def _external_data_files(path: Path) -> list[Path]:
    model = onnx.load(str(path), load_external_data=False)
    locations: set[str] = set()
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for kv in tensor.external_data:
                if kv.key == "location":
                    locations.add(kv.value)
    return [path.parent / loc for loc in sorted(locations)]


def _stage_model(path: Path, data_files: list[Path], workdir: Path) -> Path:
    """A ``<stem>.onnx/`` directory with the graph and exactly one ``.data`` file, as AI Hub takes
    ONNX models with external weights. Files already in that shape are linked, not copied."""
    target = workdir / f"{path.stem}.onnx"
    target.mkdir(parents=True)
    single = len(data_files) == 1 and data_files[0]
    if single and single.suffix == ".data" and single.parent == path.parent:
        for src in (path, data_files[0]):
            try:
                os.link(src, target / src.name)
            except OSError:
                shutil.copy2(src, target / src.name)
        return target
    model = onnx.load(str(path))  # pulls in every external tensor
    onnx.save_model(
        model,
        str(target / f"{path.stem}.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{path.stem}.data",
        size_threshold=1024,
    )
    return target


# --------------------------------------------------------------------------- runtime


class _CreatedButUnfetched(Exception):
    """A submission created its job, then lost the connection before it could be fetched."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id
        self.reason = reason


@dataclass(frozen=True)
class HubTarget:
    """``CompileResult.handle`` of this runtime: the compiled model on AI Hub and its device I/O.

    Plain data (no client, no credentials), so it can be logged or pickled.
    """

    compile_job_id: str
    model_id: str
    device: str
    options: str
    input_name: str
    device_shape: tuple[int, ...]
    device_dtype: str
    channel_last: bool


@dataclass
class _ComponentState:
    exported: ExportResult
    inputs: np.ndarray | None = None
    compiled: CompileResult | None = None
    profile: ProfileResult | None = None
    chunk_outputs: list[np.ndarray | None] = field(default_factory=list)
    job_ids: dict[str, list[str]] = field(default_factory=dict)
    job_urls: dict[str, list[str]] = field(default_factory=dict)
    infer_started: float = 0.0
    inference: InferenceResult | None = None

    @property
    def component(self) -> str:
        return self.exported.component


@dataclass
class _Pending:
    kind: str
    state: _ComponentState
    job: Any  # a qai_hub Job
    entry: LedgerEntry
    on_success: Callable[[_Pending], list[_Pending]]
    label: str = ""
    code: str = ""
    started: float = field(default_factory=time.monotonic)
    restart: Callable[[], _Pending] | None = None  # set for reused jobs: submit anew

    @property
    def title(self) -> str:
        chunk = f" {self.label}" if self.label else ""
        return f"{self.state.component} {self.kind}{chunk} {self.job.job_id}"


class _ProgressLines:
    """One terminal line per job, showing its state (tqdm; off when not on a terminal)."""

    def __init__(self) -> None:
        self._bars: dict[int, Any] = {}

    def show(self, p: _Pending, text: str) -> None:
        bar = self._bars.get(id(p))
        if bar is None:
            bar = tqdm(
                total=1, bar_format="{desc}", position=len(self._bars), leave=True, disable=None
            )
            self._bars[id(p)] = bar
        bar.set_description_str(text, refresh=True)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


class AIHubRuntime:
    """The :class:`~lpcvlab.runtimes.base.Runtime` protocol on Qualcomm AI Hub."""

    name = "aihub"

    def __init__(
        self,
        client: qai_hub.Client,
        device: str,
        target_runtime: str,
        ledger: JobLedger,
        settings: HubSettings | None = None,
        runtime_options: str = "",
        channel_last_inputs: Iterable[str] = (),
        track: str | None = None,
    ) -> None:
        self.client = client
        self.device = device
        self.target_runtime = target_runtime
        self.runtime_options = runtime_options or ""
        self.settings = settings or HubSettings()
        self.settings._check()
        self.channel_last_inputs = frozenset(channel_last_inputs)
        self.ledger = ledger
        self.track = track
        self.job_listener: JobListener | None = None
        config = client.config  # raises the client's own error when it has none
        if isinstance(client, HubClient):
            client.retries = int(self.settings.retries)
            client.backoff_s = float(self.settings.retry_backoff_s)
        self._redact = _Redactor(config.api_token)
        self._api_url = config.api_url
        self._hub_device = qai_hub.Device(name=device)
        self._device_checked = False
        self._models: dict[str, Any] = {}
        self._digests: dict[Path, str] = {}
        self._external: dict[Path, list[Path]] = {}
        self._inference_kwargs = (
            {"profile": False}
            if "profile" in inspect.signature(client.submit_inference_job).parameters
            else {}
        )

    @classmethod
    def from_config(cls, cfg: Any) -> AIHubRuntime:
        """Build from the composed Hydra config; fails with a ConfigError before any upload."""
        settings = HubSettings.from_cfg(cfg.hub)
        device = _select(cfg, "device.aihub_name")
        if not device:
            raise ConfigError(
                f"device={_select(cfg, 'device.name')} has no AI Hub device (device.aihub_name "
                "is empty); pick an AI Hub device (device=xr2_gen2_proxy, "
                "device=dragonwing_iq9075_evk, device=galaxy_s25) or use hub=local"
            )
        target_runtime = _select(cfg, "runtime.target_runtime")
        if not target_runtime:
            raise ConfigError(
                "runtime.target_runtime is not set; pick runtime=qnn_dlc (Track 1) "
                "or runtime=qnn_context_binary (Track 2)"
            )
        channel_last = set(settings.channel_last_inputs)
        for key in ("runtime.channel_last_inputs", "track.channel_last_inputs"):
            channel_last.update(_str_tuple(_select(cfg, key), key))
        if settings.ledger_path:
            ledger_path = Path(settings.ledger_path)
        else:
            cache_dir = _select(cfg, "paths.cache_dir")
            if not cache_dir:
                raise ConfigError("set paths.cache_dir (or hub.ledger_path) for the AI Hub ledger")
            ledger_path = Path(cache_dir) / "aihub_ledger.jsonl"
        client = HubClient(load_client_config(), settings.retries, settings.retry_backoff_s)
        return cls(
            client=client,
            device=str(device),
            target_runtime=str(target_runtime),
            ledger=JobLedger(ledger_path),
            settings=settings,
            runtime_options=str(_select(cfg, "runtime.compile_options") or ""),
            channel_last_inputs=channel_last,
            track=_select(cfg, "track.name"),
        )

    # ------------------------------------------------------------------ protocol

    def compile(self, exported: ExportResult) -> CompileResult:
        state = _ComponentState(exported)
        self._drive([self._start_compile(state, follow_up=False)])
        assert state.compiled is not None
        return state.compiled

    def profile(self, compiled: CompileResult) -> ProfileResult:
        state = _ComponentState(compiled.exported, compiled=compiled)
        self._drive([self._start_profile(state)])
        assert state.profile is not None
        return state.profile

    def infer(self, compiled: CompileResult, inputs: np.ndarray) -> InferenceResult:
        state = _ComponentState(compiled.exported, inputs=inputs, compiled=compiled)
        self._drive(self._start_inference(state))
        return self._finish_inference(state)

    def run_components(self, jobs: list[ComponentJob]) -> dict[str, ComponentRun]:
        """All compile jobs go up before any wait; as each compile finishes, its profile and
        inference jobs go up at once, and every job is waited on together."""
        states = [_ComponentState(job.exported, inputs=job.inputs) for job in jobs]
        names = [s.component for s in states]
        if len(set(names)) != len(names):
            raise RuntimeStageError(f"component names must be unique, got {names}")
        for s in states:
            self._check_inputs(s.exported, s.inputs)
        self._drive([self._start_compile(s, follow_up=True) for s in states])
        runs: dict[str, ComponentRun] = {}
        for s in states:
            inference = self._finish_inference(s)
            assert s.compiled is not None and s.profile is not None
            runs[s.component] = ComponentRun(s.compiled, s.profile, inference)
        return runs

    def list_devices(self, attributes: Sequence[str] = ()) -> list[str]:
        """Device names this account sees."""
        return list_devices(
            self.client, attributes, self.settings.retries, self.settings.retry_backoff_s
        )

    # ------------------------------------------------------------------ plumbing

    def _call(
        self,
        fn: Callable[[], T],
        what: str,
        passthrough: tuple[type[BaseException], ...] = (),
    ) -> T:
        return call_with_retries(
            fn,
            what,
            int(self.settings.retries),
            float(self.settings.retry_backoff_s),
            self._redact,
            passthrough,
        )

    def _submit(self, fn: Callable[[], T], what: str) -> T:
        """Submit a job, retrying only while no job exists yet (see :class:`HubClient`)."""
        fetched = getattr(self.client, "fetched_job_ids", None)

        def attempt() -> T:
            seen = len(fetched) if fetched is not None else 0
            try:
                return fn()
            except Exception as exc:
                created = fetched[seen:] if fetched is not None else []
                if not created:
                    raise
                reason = _plain(self._redact(exc))
            # Raised outside the handler, so the original error (it may quote the token) is not
            # attached as __context__.
            raise _CreatedButUnfetched(created[-1], reason)

        return self._call(attempt, what, passthrough=(_CreatedButUnfetched,))

    def _emit(self, component: str, kind: str, job_id: str, url: str | None, status: str) -> None:
        if self.job_listener is not None:
            self.job_listener(JobEvent(component, kind, job_id, url, self._redact(status)))

    def _job_name(self, component: str, suffix: str = "") -> str:
        base = f"{self.track}-{component}" if self.track else component
        return f"{base} {suffix}".strip()

    def _ensure_device(self) -> None:
        """Fail early, and readably, when the account cannot see the configured device."""
        if self._device_checked:
            return
        devices = self._call(
            lambda: self.client.get_devices(name=self.device), f"looking up device {self.device!r}"
        )
        if not devices:
            raise ConfigError(
                f"AI Hub has no device named {self.device!r} for this account (device.aihub_name); "
                "run `lpcvlab hub devices` to see the names it accepts"
            )
        self._device_checked = True

    def _check_inputs(self, exported: ExportResult, inputs: np.ndarray | None) -> None:
        if inputs is None:
            return
        expected = tuple(exported.input.shape[1:])
        if inputs.ndim != len(exported.input.shape) or tuple(inputs.shape[1:]) != expected:
            raise RuntimeStageError(
                f"{exported.component}: inputs have shape {tuple(inputs.shape)}, expected "
                f"(N, {', '.join(map(str, expected))}) for input {exported.input.name!r}"
            )

    def _external_files(self, path: Path) -> list[Path]:
        if path not in self._external:
            self._external[path] = _external_data_files(path)
        return self._external[path]

    def _model_digest(self, exported: ExportResult) -> str:
        """The content hash of everything uploaded: the graph, plus external weights if any."""
        path = Path(exported.path)
        if path not in self._digests:
            data_files = self._external_files(path)
            if not data_files:
                self._digests[path] = exported.sha256
            else:
                h = hashlib.sha256(exported.sha256.encode())
                for data in data_files:
                    h.update(file_sha256(data).encode())
                self._digests[path] = h.hexdigest()
        return self._digests[path]

    def _start(
        self,
        kind: str,
        state: _ComponentState,
        inputs: dict[str, Any],
        options: str,
        submit: Callable[[], Any],
        on_success: Callable[[_Pending], list[_Pending]],
        label: str = "",
        force_new: bool = False,
    ) -> _Pending:
        """Reuse, resume or submit one job (in that order of preference) and track it.

        ``force_new`` skips the ledger (a reused job whose results are gone).
        """
        given = inputs
        inputs = {**inputs, "api_url": self._api_url}
        key = job_key(kind, self.device, options, inputs)
        entry = self.ledger.latest(key) if self.settings.reuse and not force_new else None
        job = None
        if entry is not None and entry.status in (SUBMITTED, SUCCESS):
            job = self._fetch_recorded(entry)
            if job is not None:
                how = "REUSED" if entry.status == SUCCESS else "RESUMED"
                log.info(
                    "AI Hub: %s %s job %s for %s (%s)",
                    "reusing finished" if how == "REUSED" else "resuming in-flight",
                    kind,
                    job.job_id,
                    state.component,
                    job.url,
                )
                self._emit(state.component, kind, job.job_id, job.url, how)
        if job is None:
            self._ensure_device()
            new_entry = LedgerEntry(
                key=key,
                kind=kind,
                component=state.component,
                job_id="",
                status=SUBMITTED,
                device=self.device,
                options=options,
                inputs=inputs,
            )
            lost: _CreatedButUnfetched | None = None
            try:
                job = submit()
            except _CreatedButUnfetched as exc:
                lost = exc
            if lost is not None:
                url = urljoin(self.client.config.web_url, f"jobs/{lost.job_id}/")
                self.ledger.record(replace(new_entry, job_id=lost.job_id, url=url))
                self._emit(state.component, kind, lost.job_id, url, SUBMITTED)
                raise RuntimeStageError(
                    f"{state.component}: AI Hub created {kind} job {lost.job_id} ({url}) but "
                    f"fetching it failed: {lost.reason}. It is in the ledger; rerun to pick it up."
                )
            entry = self.ledger.record(replace(new_entry, job_id=job.job_id, url=job.url))
            log.info(
                "AI Hub: submitted %s job %s for %s (%s)",
                kind,
                job.job_id,
                state.component,
                job.url,
            )
            self._emit(state.component, kind, job.job_id, job.url, SUBMITTED)
        assert entry is not None
        state.job_ids.setdefault(kind, []).append(job.job_id)
        state.job_urls.setdefault(kind, []).append(job.url)
        pending = _Pending(kind, state, job, entry, on_success, label)
        if entry.status == SUCCESS:
            pending.restart = lambda: self._start(
                kind, state, given, options, submit, on_success, label, force_new=True
            )
        return pending

    def _fetch_recorded(self, entry: LedgerEntry) -> Any | None:
        try:
            return self._call(
                lambda: self.client.get_job(entry.job_id),
                f"fetching {entry.kind} job {entry.job_id} from the ledger",
                passthrough=(hub_client.UserError,),
            )
        except hub_client.UserError as exc:
            log.warning(
                "AI Hub: ledger job %s (%s, %s) is not visible to this account (%s); "
                "submitting a new one",
                entry.job_id,
                entry.kind,
                entry.component,
                _plain(self._redact(exc)),
            )
            return None

    def _drive(self, initial: list[_Pending]) -> None:
        """Poll every tracked job until all are done, starting follow-up jobs as they finish."""
        inflight = list(initial)
        lines = _ProgressLines()
        try:
            while inflight:
                progressed = False
                for p in list(inflight):
                    status = self._poll(p, lines)
                    if status.success:
                        inflight.remove(p)
                        if p.entry.status != SUCCESS:
                            p.entry = self.ledger.update(p.entry, SUCCESS)
                            self._emit(p.state.component, p.kind, p.job.job_id, p.job.url, SUCCESS)
                        progressed = True
                        inflight.extend(p.on_success(p))
                    elif status.failure:
                        inflight.remove(p)
                        raise self._job_failed(p, status.message, inflight)
                if inflight and not progressed:
                    time.sleep(float(self.settings.poll_interval_s))
        except BaseException:
            if inflight:
                log.warning(
                    "AI Hub: stopped while these jobs were still running: %s. They are in the "
                    "ledger (%s); rerunning with the same inputs picks them up instead of paying "
                    "again.",
                    ", ".join(p.title for p in inflight),
                    self.ledger.path,
                )
            raise
        finally:
            lines.close()

    def _poll(self, p: _Pending, lines: _ProgressLines) -> Any:
        status = self._call(p.job.get_status, f"polling {p.kind} job {p.job.job_id}")
        elapsed = time.monotonic() - p.started
        lines.show(p, f"{p.title}: {status.code} ({elapsed:.0f} s)")
        if status.code != p.code:
            p.code = status.code
            if not (status.success or status.failure):
                log.info("AI Hub: %s: %s", p.title, status.code)
                self._emit(p.state.component, p.kind, p.job.job_id, p.job.url, status.code)
        return status

    def _job_failed(self, p: _Pending, reason: str | None, others: list[_Pending]) -> Exception:
        reason = _plain(self._redact(reason or "AI Hub gave no reason"))
        p.entry = self.ledger.update(p.entry, FAILED, reason)
        self._emit(p.state.component, p.kind, p.job.job_id, p.job.url, f"FAILED: {reason}")
        ids = "; ".join(f"{k} {', '.join(v)}" for k, v in p.state.job_ids.items())
        message = (
            f"{p.state.component}: AI Hub {p.kind} job {p.job.job_id} failed: {reason} "
            f"({p.job.url}). Job IDs of {p.state.component}: {ids}."
        )
        if p.kind == "compile":
            message += f" Compile options were: {p.entry.options!r}."
        if others:
            message += (
                " Still running on AI Hub (a rerun picks them up): "
                + ", ".join(o.title for o in others)
                + "."
            )
        log.error("%s", message)
        return RuntimeStageError(message)

    # ------------------------------------------------------------------ compile

    def _start_compile(self, state: _ComponentState, follow_up: bool) -> _Pending:
        exported = state.exported
        spec = exported.input
        options = compile_options(
            exported,
            self.target_runtime,
            self.runtime_options,
            self.channel_last_inputs,
            self.settings.extra_compile_options,
        )
        inputs = {
            "model_sha256": self._model_digest(exported),
            "input_specs": {spec.name: [list(spec.shape), spec.dtype]},
        }

        def submit() -> Any:
            model = self._upload_model(state)
            return self._submit(
                lambda: self.client.submit_compile_job(
                    model,
                    device=self._hub_device,
                    name=self._job_name(state.component),
                    input_specs={spec.name: (tuple(spec.shape), spec.dtype)},
                    options=options,
                ),
                f"submitting the compile job of {state.component}",
            )

        def on_success(p: _Pending) -> list[_Pending]:
            state.compiled = self._compiled_result(state, p)
            if not follow_up:
                return []
            follow = [self._start_profile(state)]
            if state.inputs is not None:
                follow.extend(self._start_inference(state))
            return follow

        pending = self._start("compile", state, inputs, options, submit, on_success)
        self._share(pending)
        return pending

    def _upload_model(self, state: _ComponentState) -> Any:
        path = Path(state.exported.path)
        data_files = self._external_files(path)
        with tempfile.TemporaryDirectory(prefix="lpcvlab-aihub-") as tmp:
            upload = _stage_model(path, data_files, Path(tmp)) if data_files else path
            model = self._call(
                lambda: self.client.upload_model(str(upload), name=self._job_name(state.component)),
                f"uploading {upload.name} ({state.component})",
            )
        log.info("AI Hub: uploaded %s as model %s", upload.name, model.model_id)
        self._emit(state.component, "upload", model.model_id, model.url, "UPLOADED")
        return model

    def _share(self, p: _Pending) -> None:
        emails = list(self.settings.share_with)
        if not emails:
            return
        self._call(
            lambda: p.job.modify_sharing(add_emails=emails),
            f"sharing compile job {p.job.job_id} with {', '.join(emails)}",
        )
        status = f"SHARED with {', '.join(emails)}"
        log.info("AI Hub: compile job %s (%s) %s", p.job.job_id, p.state.component, status)
        self._emit(p.state.component, "compile", p.job.job_id, p.job.url, status)

    def _compiled_result(self, state: _ComponentState, p: _Pending) -> CompileResult:
        job = p.job
        target = self._call(job.get_target_model, f"reading the target model of {job.job_id}")
        if target is None:
            raise RuntimeStageError(
                f"{state.component}: compile job {job.job_id} finished without a target model "
                f"({job.url})"
            )
        if hasattr(job, "get_target_shapes"):
            shapes = self._call(job.get_target_shapes, f"reading the shapes of {job.job_id}")
        else:  # clients before get_target_shapes()
            shapes = self._call(lambda: job.target_shapes, f"reading the shapes of {job.job_id}")
        name, shape, dtype, channel_last = self._device_input(state.exported, shapes, p.entry)
        self._models[target.model_id] = target
        handle = HubTarget(
            compile_job_id=job.job_id,
            model_id=target.model_id,
            device=self.device,
            options=p.entry.options,
            input_name=name,
            device_shape=shape,
            device_dtype=dtype,
            channel_last=channel_last,
        )
        return CompileResult(
            component=state.component,
            runtime=self.target_runtime,
            device=self.device,
            handle=handle,
            exported=state.exported,
            job_id=job.job_id,
            job_url=job.url,
        )

    def _device_input(
        self, exported: ExportResult, shapes: Any, entry: LedgerEntry
    ) -> tuple[str, tuple[int, ...], str, bool]:
        """Name, shape, dtype and layout of the compiled model's input, as AI Hub built it."""
        spec = exported.input
        shape = tuple(int(d) for d in spec.shape)
        cl_shape = channel_last_shape(shape) if len(shape) >= 3 else None
        forced = spec.name in forced_channel_last(entry.options)
        shapes = dict(shapes or {})
        name = spec.name
        found = shapes.get(spec.name)
        if found is None and len(shapes) == 1:
            name, found = next(iter(shapes.items()))
        if found is None:  # AI Hub reported no target shapes: derive them from the options
            channel_last = forced and cl_shape is not None
            dtype = spec.dtype
            if dtype == "int64" and "--truncate_64bit_io" in shlex.split(entry.options):
                dtype = "int32"
            return name, cl_shape if channel_last and cl_shape else shape, dtype, channel_last
        device_shape, dtype = tuple(int(d) for d in found[0]), str(found[1])
        if device_shape == shape and device_shape == cl_shape:
            channel_last = forced
        elif device_shape == shape:
            channel_last = False
        elif cl_shape is not None and device_shape == cl_shape:
            channel_last = True
        else:
            raise RuntimeStageError(
                f"{exported.component}: the compiled model takes {name} {device_shape} {dtype}, "
                f"which is neither the exported {shape} nor its channel-last form; check the "
                f"compile options {entry.options!r}"
            )
        return name, device_shape, dtype, channel_last

    def _target_model(self, handle: HubTarget) -> Any:
        model = self._models.get(handle.model_id)
        if model is None:
            model = self._call(
                lambda: self.client.get_model(handle.model_id),
                f"fetching compiled model {handle.model_id}",
            )
            self._models[handle.model_id] = model
        return model

    @staticmethod
    def _handle(state: _ComponentState) -> HubTarget:
        compiled = state.compiled
        if compiled is None or not isinstance(compiled.handle, HubTarget):
            raise RuntimeStageError(
                f"{state.component}: not compiled by the AI Hub runtime (handle "
                f"{type(getattr(compiled, 'handle', None)).__name__}); compile with hub=aihub first"
            )
        return compiled.handle

    # ------------------------------------------------------------------ profile

    def _start_profile(self, state: _ComponentState) -> _Pending:
        handle = self._handle(state)
        options = profile_options(self.settings)

        def submit() -> Any:
            model = self._target_model(handle)
            name = self._job_name(state.component, "profile")
            if "profile" in self._inference_kwargs:  # qai-hub >= 0.56: profiling is inference
                return self._submit(
                    lambda: self.client.submit_inference_job(
                        model,
                        device=self._hub_device,
                        inputs=None,
                        name=name,
                        options=options,
                        profile=True,
                    ),
                    f"submitting the profile job of {state.component}",
                )
            return self._submit(
                lambda: self.client.submit_profile_job(
                    model, device=self._hub_device, name=name, options=options
                ),
                f"submitting the profile job of {state.component}",
            )

        def on_success(p: _Pending) -> list[_Pending]:
            raw = self._call(p.job.download_profile, f"downloading profile {p.job.job_id}")
            state.profile = parse_profile(state.component, raw or {}, p.job.job_id, p.job.url)
            log.info(
                "AI Hub: %s on %s: %.3f ms, peak memory %.1f-%.1f MB, layers %s",
                state.component,
                self.device,
                state.profile.latency_ms,
                *state.profile.peak_memory_mb,
                state.profile.compute_units or "n/a",
            )
            return []

        inputs = {"compile_job": handle.compile_job_id}
        return self._start("profile", state, inputs, options, submit, on_success)

    # ------------------------------------------------------------------ inference

    def _device_batch(self, handle: HubTarget, batch: np.ndarray) -> np.ndarray:
        x = np.moveaxis(batch, 1, -1) if handle.channel_last else batch
        return np.ascontiguousarray(x, dtype=handle.device_dtype)

    def _start_inference(self, state: _ComponentState) -> list[_Pending]:
        assert state.inputs is not None
        self._check_inputs(state.exported, state.inputs)
        handle = self._handle(state)
        n = len(state.inputs)
        per = samples_per_chunk(handle.device_shape, handle.device_dtype, self.settings.chunk_bytes)
        bounds = [(a, min(a + per, n)) for a in range(0, n, per)]
        state.chunk_outputs = [None] * len(bounds)
        state.infer_started = time.perf_counter()
        options = shlex.join(shlex.split(self.settings.extra_inference_options))
        if len(bounds) > 1:
            log.info(
                "AI Hub: %s: %d samples in %d chunks of <= %d (hub.chunk_bytes=%d)",
                state.component,
                n,
                len(bounds),
                per,
                self.settings.chunk_bytes,
            )
        pending = []
        for ci, (a, b) in enumerate(bounds):
            label = f"{ci + 1}/{len(bounds)}" if len(bounds) > 1 else ""
            digest = array_sha256(self._device_batch(handle, state.inputs[a:b]))
            inputs = {"compile_job": handle.compile_job_id, "dataset_sha256": digest}

            # The device batch is rebuilt at submission rather than kept: a reused chunk needs
            # none, and holding every chunk until the end would double the inputs' memory.
            def submit(a: int = a, b: int = b, label: str = label) -> Any:
                assert state.inputs is not None
                batch = self._device_batch(handle, state.inputs[a:b])
                return self._submit_inference(state, handle, batch, label, options)

            def on_success(p: _Pending, ci: int = ci, expected: int = b - a) -> list[_Pending]:
                try:
                    state.chunk_outputs[ci] = self._download_outputs(state, p, expected)
                except RuntimeStageError as exc:
                    if p.restart is None:
                        raise
                    # AI Hub deletes datasets after 30 days: a reused job may have lost its
                    # outputs. Running it again is the only way to get them back.
                    log.warning(
                        "AI Hub: outputs of reused inference job %s are gone (%s); running it "
                        "again",
                        p.job.job_id,
                        exc,
                    )
                    state.job_ids["inference"].remove(p.job.job_id)
                    state.job_urls["inference"].remove(p.job.url)
                    return [p.restart()]
                return []

            pending.append(
                self._start("inference", state, inputs, options, submit, on_success, label)
            )
        return pending

    def _submit_inference(
        self,
        state: _ComponentState,
        handle: HubTarget,
        batch: np.ndarray,
        label: str,
        options: str,
    ) -> Any:
        name = self._job_name(state.component, f"inference {label}".strip())
        entries = {handle.input_name: [batch[i : i + 1] for i in range(len(batch))]}
        dataset = self._call(
            lambda: self.client.upload_dataset(entries, name=name),
            f"uploading the inputs of {name}",
        )
        log.info(
            "AI Hub: uploaded %d %s samples of %s as dataset %s",
            len(batch),
            "x".join(map(str, handle.device_shape)),
            state.component,
            dataset.dataset_id,
        )
        model = self._target_model(handle)
        return self._submit(
            lambda: self.client.submit_inference_job(
                model,
                device=self._hub_device,
                inputs=dataset,
                name=name,
                options=options,
                **self._inference_kwargs,
            ),
            f"submitting {name}",
        )

    def _download_outputs(self, state: _ComponentState, p: _Pending, expected: int) -> np.ndarray:
        out = self._call(p.job.download_output_data, f"downloading outputs of {p.job.job_id}")
        if not out:
            raise RuntimeStageError(
                f"{state.component}: inference job {p.job.job_id} produced no output data "
                f"({p.job.url})"
            )
        wanted = state.exported.output_name
        key = wanted if wanted in out else next(iter(out))
        if key != wanted:
            log.debug("AI Hub: %s has no output %r; reading %r", p.job.job_id, wanted, key)
        arrays = [np.asarray(a) for a in out[key]]
        if len(arrays) != expected:
            raise RuntimeStageError(
                f"{state.component}: inference job {p.job.job_id} returned {len(arrays)} outputs "
                f"for {expected} inputs ({p.job.url})"
            )
        return np.concatenate(arrays, axis=0) if arrays else np.empty((0,))

    def _finish_inference(self, state: _ComponentState) -> InferenceResult:
        assert state.inputs is not None
        if state.inference is not None:
            return state.inference
        missing = [i for i, c in enumerate(state.chunk_outputs) if c is None]
        if missing:
            raise RuntimeStageError(f"{state.component}: chunks {missing} have no outputs")
        chunks = [c for c in state.chunk_outputs if c is not None]
        outputs = np.concatenate(chunks, axis=0) if chunks else np.empty((0,))
        metrics = self._parity(state.exported, state.inputs, outputs)
        ids = state.job_ids.get("inference", [])
        urls = state.job_urls.get("inference", [])
        state.inference = InferenceResult(
            component=state.component,
            outputs=outputs,
            seconds=time.perf_counter() - state.infer_started,
            job_id=",".join(ids) or None,
            job_url=urls[0] if urls else None,
            metrics=metrics,
        )
        return state.inference

    def _parity(
        self, exported: ExportResult, inputs: np.ndarray, outputs: np.ndarray
    ) -> dict[str, float]:
        """Device outputs against ONNX Runtime on this machine, over the first samples."""
        n = min(int(self.settings.parity_samples), len(inputs), len(outputs))
        if n <= 0:
            return {}
        from lpcvlab.export import cosine_per_sample

        session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
        spec = exported.input
        feeds = (np.ascontiguousarray(inputs[i : i + 1], spec.dtype) for i in range(n))
        ref = np.concatenate([session.run(None, {spec.name: x})[0] for x in feeds], axis=0)
        dev = outputs[:n]
        if ref.size != dev.size:
            raise RuntimeStageError(
                f"{exported.component}: device outputs {dev.shape} do not match ONNX Runtime's "
                f"{ref.shape} on the same {n} inputs"
            )
        ref64 = ref.reshape(n, -1).astype(np.float64)
        dev64 = dev.reshape(n, -1).astype(np.float64)
        cos_min = float(cosine_per_sample(ref64, dev64).min())
        mse = float(np.mean((ref64 - dev64) ** 2))
        peak = float(np.max(np.abs(ref64))) if ref64.size else 0.0
        if mse == 0.0:
            psnr = math.inf
        else:
            psnr = 10.0 * math.log10(max(peak * peak, np.finfo(np.float64).tiny) / mse)
        log.info(
            "AI Hub: %s on %s vs ONNX Runtime over %d samples: cosine min %.6f, PSNR %.1f dB",
            exported.component,
            self.device,
            n,
            cos_min,
            psnr,
        )
        return {"device_parity_cosine_min": cos_min, "device_parity_psnr": psnr}
