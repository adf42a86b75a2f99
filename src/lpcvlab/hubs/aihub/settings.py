"""What the ``hub`` settings (:class:`~lpcvlab.config.schema.AIHubConfig`) turn into for AI Hub.

The options strings of compile, profile and inference jobs, the device layout of a channel-last
input, how a float array becomes what a compiled input takes (and an output a float array
again), and how many samples go into one uploaded dataset. Pure functions of settings, exported
models and tensor specs: nothing here talks to AI Hub.
"""

from __future__ import annotations

import shlex
from collections.abc import Collection, Sequence

import numpy as np

from lpcvlab.config.schema import AIHUB_DATASET_LIMIT_BYTES, AIHubConfig, validate
from lpcvlab.deploy.hazards import QNN_RUNTIMES
from lpcvlab.errors import ConfigError, RuntimeStageError
from lpcvlab.types import INTEGER_DTYPES, DeviceTensor, ExportResult

# The name AI Hub gives a compiled model's first output unless told otherwise.
AIHUB_DEFAULT_OUTPUT_NAME = "output_0"
# precision -> (weights_dtype, activations_dtype) of a quantize job (qai_hub.QuantizeDtype names)
QUANTIZE_DTYPES = {"w8a16": ("INT8", "INT16"), "w8a8": ("INT8", "INT8")}


def checked_settings(settings: AIHubConfig) -> AIHubConfig:
    """``settings`` after the checks :func:`lpcvlab.config.load_settings` runs on a composed
    config, for settings built in code: a ConfigError naming ``hub.<key>`` otherwise."""
    check_chunk_bytes(settings.chunk_bytes)
    try:
        validate(settings)
    except ConfigError as exc:
        raise ConfigError(f"hub.{exc}") from None
    return settings


def check_chunk_bytes(chunk_bytes: int) -> int:
    """``hub.chunk_bytes`` as an int, or a ConfigError: AI Hub refuses datasets over 2 GB."""
    if not 0 < int(chunk_bytes) <= AIHUB_DATASET_LIMIT_BYTES:
        raise ConfigError(
            f"hub.chunk_bytes={chunk_bytes} must be in (0, {AIHUB_DATASET_LIMIT_BYTES}]: "
            "AI Hub refuses datasets over 2 GB"
        )
    return int(chunk_bytes)


def qairt_option(version: str | None) -> list[str]:
    """``--qairt_version <hub.qairt_version>`` as tokens; none when null (AI Hub's default)."""
    return ["--qairt_version", str(version)] if version else []


def compile_options(
    exported: ExportResult,
    target_runtime: str,
    runtime_options: str | None = "",
    channel_last_inputs: Collection[str] = (),
    extra: str | None = "",
    precision_options: str = "",
    qairt_version: str | None = None,
) -> str:
    """The full ``options`` string of one component's compile job.

    Order: ``--target_runtime``, the runtime config's options, ``precision_options`` (the
    runtime's fp16 options for a component in fp16, ``--quantize_io``), ``--qairt_version``
    (``hub.qairt_version``, on the QNN targets, whose compilation it changes -- AIHM's
    ``qairt_version_changes_compilation``), what this component needs, then
    ``hub.extra_compile_options`` (last, so that a user's flag reads as the final word):

    - ``--force_channel_last_input <name>`` when the component's input is in
      ``channel_last_inputs`` and has a channel axis to move (rank >= 3) -- unless the exported
      graph already takes it channel-last (``TensorSpec.channel_last``);
    - ``--output_names <name>`` when the exported output is not AI Hub's default ``output_0``
      (Track 2's ``class_probs``), so the device output keeps the exported name.
    """
    if not target_runtime:
        raise ConfigError("runtime.target_runtime is empty; pick a runtime (runtime=qnn_dlc)")
    runtime_tokens = shlex.split(runtime_options or "") + shlex.split(precision_options or "")
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
    if target_runtime in QNN_RUNTIMES:
        parts += qairt_option(qairt_version)
    spec = exported.input
    if spec.name in channel_last_inputs and len(spec.shape) >= 3 and not spec.channel_last:
        parts += ["--force_channel_last_input", spec.name]
    if exported.output_name and exported.output_name != AIHUB_DEFAULT_OUTPUT_NAME:
        parts += ["--output_names", exported.output_name]
    parts += extra_tokens
    return shlex.join(parts)


def quantize_options(precision: str) -> str:
    """Options of a quantize job as AIHM sets them (``Precision.get_hub_quantize_options``):
    ``--range_scheme min_max`` for w8a16, AI Hub's defaults otherwise."""
    return "--range_scheme min_max" if precision == "w8a16" else ""


def profile_options(settings: AIHubConfig) -> str:
    """Options of a profile job: ``--max_profiler_iterations <hub.profile_iterations>``,
    ``--qairt_version <hub.qairt_version>``, then ``hub.extra_profile_options``."""
    parts = ["--max_profiler_iterations", str(int(settings.profile_iterations))]
    parts += qairt_option(settings.qairt_version)
    parts += shlex.split(settings.extra_profile_options or "")
    return shlex.join(parts)


def inference_options(settings: AIHubConfig) -> str:
    """Options of an inference job: ``--qairt_version <hub.qairt_version>``, then
    ``hub.extra_inference_options``, normalised."""
    parts = qairt_option(settings.qairt_version)
    parts += shlex.split(settings.extra_inference_options or "")
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
    chunk_bytes = check_chunk_bytes(chunk_bytes)
    sample_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    n = chunk_bytes // max(sample_bytes, 1)
    if n < 1:
        raise ConfigError(
            f"one sample of shape {tuple(shape)} {dtype} is {sample_bytes} bytes, more than "
            f"hub.chunk_bytes={chunk_bytes}; raise hub.chunk_bytes (at most 2 GB)"
        )
    return n


def to_device(x: np.ndarray, tensor: DeviceTensor) -> np.ndarray:
    """``x`` as the compiled input ``tensor`` takes it.

    A float array for quantized integer I/O is quantized as AIHM does it
    (``round(x / scale) + zero_point``, clipped to the integer type); integers (token IDs) are
    cast to the device's width; floats to the device's float width (float16 I/O). A float array
    for an integer input without a scale has no meaning on the device: refused, never cast.
    """
    x = np.asarray(x)
    dtype = np.dtype(tensor.dtype)
    if np.issubdtype(x.dtype, np.floating) and tensor.dtype in INTEGER_DTYPES:
        if tensor.scale is None or tensor.zero_point is None:
            raise RuntimeStageError(
                f"the compiled model takes {tensor.describe()} without a scale and zero point, "
                f"and the inputs are {x.dtype}: casting them would truncate the values; compile "
                "with float I/O (hub.quantize_io=false)"
            )
        q = np.rint(x.astype(np.float64) / float(tensor.scale)) + int(tensor.zero_point)
        info = np.iinfo(dtype)
        return np.ascontiguousarray(np.clip(q, info.min, info.max).astype(dtype))
    return np.ascontiguousarray(x, dtype=dtype)


def from_device(y: np.ndarray, tensor: DeviceTensor | None) -> np.ndarray:
    """A device output as float32 values: quantized integer outputs dequantized
    (``(q - zero_point) * scale``, as AIHM does), float16 widened, others as they are."""
    y = np.asarray(y)
    if tensor is not None and tensor.quantized:
        assert tensor.scale is not None
        zero = int(tensor.zero_point or 0)
        return ((y.astype(np.int64) - zero) * np.float64(tensor.scale)).astype(np.float32)
    if y.dtype == np.float16:
        return y.astype(np.float32)
    return y
