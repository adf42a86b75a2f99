"""The stages of one component on AI Hub: what each submits, and what it makes of a finished job.

1. **compile** (:meth:`Stages.start_compile`) -- the exported ONNX file is uploaded (as a
   ``<name>.onnx/`` directory holding the graph and one ``.data`` file when its weights are
   external) and compiled with ``--target_runtime <runtime.target_runtime>
   <runtime.compile_options>`` plus what the component needs plus ``hub.extra_compile_options``
   (:func:`~lpcvlab.hubs.aihub.settings.compile_options`); the job is shared with
   ``hub.share_with``. The compiled model's input name, shape, dtype and layout are read from the
   job's target shapes (:class:`HubTarget`), so they follow what AI Hub actually built.
2. **profile** (:meth:`Stages.start_profile`) -- an inference job with profiling on and random
   inputs, ``--max_profiler_iterations <hub.profile_iterations>``; ``download_profile()`` is
   parsed by :func:`lpcvlab.hubs.profile.parse_profile`.
3. **inference** (:meth:`Stages.start_inference`) -- the inputs go up as datasets of at most
   ``hub.chunk_bytes`` each (AI Hub refuses datasets over 2 GB), one job per chunk, at most
   ``hub.inference_window`` in flight (each finished chunk starts the next); every chunk goes
   up from an h5 file in a temporary folder of lpcvlab's and its outputs come down into one, so
   neither the client's Dataset nor its job keeps the arrays and no file is left behind: memory
   stays flat in the number of chunks. A chunk whose arrays are already on AI Hub (the same
   content uploaded by this or an earlier run, :class:`~lpcvlab.hubs.aihub.jobs.DatasetRecords`)
   is not uploaded again. Outputs come back in input order and are kept in ``outputs_dir``, so a
   reused job whose outputs AI Hub has deleted (after 30 days) is read from there (run again
   only when that copy is gone too), and the first ``hub.parity_samples`` are compared with
   ONNX Runtime on this machine (:func:`lpcvlab.hubs.parity.device_parity`).

When compile finishes, :meth:`Stages.after_compile` starts the stages the component asked for
(``ComponentJob.stages``); every job goes through the :class:`~lpcvlab.hubs.aihub.jobs.JobDriver`,
which knows jobs only by kind, ledger key and ID.

Layout convention: inputs arrive in the exported layout, ``(N, C, ...)`` for a channel-first
graph. When the compiled model takes an input channel-last (``--force_channel_last_input``;
Track 2's ``video`` is ``(1, 16, 112, 112, 3)`` on device), each sample is transposed with
``np.moveaxis(x, 1, -1)`` before upload; 64-bit integer inputs are cast to the device's dtype
(int32 under ``--truncate_64bit_io``). Outputs come back as the device produces them.

**Precision.** A component in w8a16 or w8a8 starts with a **quantize** job
(:meth:`Stages.start_quantize`): the export and its calibration data (uploaded as a dataset, in
the exported layout) go to ``submit_quantize_job`` with ``weights_dtype=INT8`` and
``activations_dtype=INT16`` or ``INT8``; the ledger keys it by the model's hash, the calibration
data's hash and both dtypes. When it succeeds, its quantized ONNX model (QDQ) is what
:meth:`Stages.start_compile` compiles -- no upload, and the compile key names the quantize job
instead of the export's hash -- and it is downloaded (``Model.download``, into
``<models_dir>/<quantize job ID>/``, once per job) as ``QuantizeResult.model``: the graph that is
deployed, which the run logs as the component's model. A component in fp16 is made as AIHM
makes its fp16 models: the fp32 export is uploaded and compiled with the runtime's fp16 options
(``runtime.fp16_options``: ``--quantize_full_type float16`` on the QNN runtimes) before
``hub.extra_compile_options``; the export converted to fp16 on this machine
(:func:`~lpcvlab.deploy.precision.emulate.emulate`) is only shown to ``graph_check`` (the device
lint), as the quantized graph is, before its compile job. ``hub.quantize_io`` adds
``--quantize_io`` to either (integer / float16 I/O). In both cases the device outputs are compared
with the fp32 export on this machine (``device_parity_*``): the quantized model lives on AI Hub,
so that number includes the quantization error.

**What was built.** After each compile job the target model's I/O is read from its
``TensorSpec`` (:func:`~lpcvlab.hubs.aihub.client.target_io`: name, shape, dtype, scale and zero
point) and shown to ``compiled_check`` (the submission contract's check) before the profile and
inference jobs; inputs are quantized and outputs dequantized with those scales where the I/O is
quantized (:func:`~lpcvlab.hubs.aihub.settings.to_device` / ``from_device``). The target model
itself (``.dlc`` / ``.bin``) is downloaded once per job into ``<models_dir>/<compile job ID>/``
with its sha256 (``CompileResult.artifact``), and the QAIRT version it reports is an event.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import inspect
import io
import logging
import os
import secrets
import shlex
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import onnx
import qai_hub
import qai_hub.client as hub_client
from qai_hub.util.dataset_entries_converters import dataset_entries_to_h5, h5_to_dataset_entries

from lpcvlab.config.schema import AIHubConfig
from lpcvlab.deploy.hazards import QNN_RUNTIMES
from lpcvlab.deploy.precision import FP32, ComponentPrecision
from lpcvlab.deploy.precision.emulate import emulate
from lpcvlab.errors import RuntimeStageError
from lpcvlab.hubs.aihub.client import find_job_by_name, guard, submit, target_io
from lpcvlab.hubs.aihub.jobs import (
    DatasetRecord,
    DatasetRecords,
    Emit,
    JobDriver,
    JobTrail,
    LedgerEntry,
    Pending,
    dataset_key,
)
from lpcvlab.hubs.aihub.settings import (
    QUANTIZE_DTYPES,
    channel_last_shape,
    compile_options,
    forced_channel_last,
    from_device,
    inference_options,
    profile_options,
    quantize_options,
    samples_per_chunk,
    to_device,
)
from lpcvlab.hubs.base import ALL_STAGES, INFERENCE, PROFILE, CompiledCheck, GraphCheck
from lpcvlab.hubs.parity import device_parity
from lpcvlab.hubs.profile import parse_profile
from lpcvlab.types import (
    CompiledIO,
    CompileResult,
    DeviceTensor,
    ExportResult,
    InferenceResult,
    ProfileResult,
    QuantizeResult,
)
from lpcvlab.util.hashing import array_sha256, file_sha256
from lpcvlab.util.io import atomic_write

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubTarget:
    """``CompileResult.handle`` of this hub: the compiled model on AI Hub and its device I/O
    (the target model's TensorSpecs: name, shape, dtype, and scale / zero point of quantized
    I/O).

    Plain data (no client, no credentials), so it can be logged or pickled.
    """

    compile_job_id: str
    model_id: str
    device: str
    options: str
    io: CompiledIO
    channel_last: bool

    @property
    def input(self) -> DeviceTensor:
        return self.io.inputs[0]

    @property
    def input_name(self) -> str:
        return self.input.name

    @property
    def device_shape(self) -> tuple[int, ...]:
        return self.input.shape

    @property
    def device_dtype(self) -> str:
        return self.input.dtype

    def output(self, name: str) -> DeviceTensor | None:
        """The compiled output called ``name`` (the only one when no name matches)."""
        named = [t for t in self.io.outputs if t.name == name]
        if named:
            return named[0]
        return self.io.outputs[0] if len(self.io.outputs) == 1 else None


@dataclass
class ComponentState:
    """One component on its way through the stages: what is asked for, and what came back."""

    exported: ExportResult
    inputs: np.ndarray | None = None
    wanted: frozenset[str] = ALL_STAGES
    precision: ComponentPrecision = FP32
    quantized: QuantizeResult | None = None  # how a non-fp32 component was made
    quantized_model: Any = None  # the quantize job's target model, compiled instead of the export
    onnx_input: DeviceTensor | None = None  # the ONNX compile's input (int32 text tokens)
    compiled: CompileResult | None = None
    profile: ProfileResult | None = None
    chunk_outputs: list[np.ndarray | None] = field(default_factory=list)
    infer_started: float = 0.0
    inference: InferenceResult | None = None
    trail: JobTrail = field(init=False)

    def __post_init__(self) -> None:
        self.trail = JobTrail(self.exported.component)

    @property
    def component(self) -> str:
        return self.exported.component


# --------------------------------------------------------------------------- model files


def external_data_files(path: Path) -> list[Path]:
    """The external-data files an ONNX graph refers to (none for a self-contained file)."""
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


def stage_model(path: Path, data_files: list[Path], workdir: Path) -> Path:
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


def find_onnx(path: Path) -> Path | None:
    """The ONNX graph in what ``Model.download`` returned: the ``.onnx`` file itself, a
    ``.zip`` (an ONNX directory with external weights, extracted beside it) or a directory."""
    path = Path(path)
    if path.is_file() and path.suffix == ".zip":
        folder = path.with_name(path.name.removesuffix(".zip") + ".unzipped")
        if not folder.is_dir():
            with zipfile.ZipFile(path) as archive:
                archive.extractall(folder)
        path = folder
    if path.is_file():
        return path if path.suffix == ".onnx" else None
    if not path.is_dir():
        return None
    graphs = sorted(p for p in path.rglob("*.onnx") if p.is_file())
    if not graphs:
        zips = sorted(path.glob("*.zip"))
        return find_onnx(zips[0]) if len(zips) == 1 else None
    return graphs[0] if len(graphs) == 1 else None


def _downloaded(folder: Path) -> Path | None:
    """What ``Model.download`` left in ``folder``: its one file or directory, else None."""
    if not folder.is_dir():
        return None
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 else None


def _artifact_sha256(path: Path) -> str:
    """sha256 of a file; of a directory, over its files' relative paths and contents."""
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def check_inputs(exported: ExportResult, inputs: np.ndarray | None) -> None:
    """``inputs`` are ``(N, *exported.input.shape[1:])``; a RuntimeStageError otherwise."""
    if inputs is None:
        return
    expected = tuple(exported.input.shape[1:])
    if inputs.ndim != len(exported.input.shape) or tuple(inputs.shape[1:]) != expected:
        raise RuntimeStageError(
            f"{exported.component}: inputs have shape {tuple(inputs.shape)}, expected "
            f"(N, {', '.join(map(str, expected))}) for input {exported.input.name!r}"
        )


def _read_outputs(path: Path) -> dict[str, list[np.ndarray]] | None:
    """The entries of a device-outputs h5 file; None when it cannot be read (cut short)."""
    try:
        with h5py.File(path, "r") as h5:
            return h5_to_dataset_entries(h5)
    except OSError:
        return None


# A recorded dataset is reused while AI Hub keeps it at least this long (a job started on it
# must not outlive it).
DATASET_MARGIN = dt.timedelta(days=1)


def _utcnow(like: dt.datetime) -> dt.datetime:
    """Now, aware or naive as ``like`` is (the client's times may be either)."""
    now = dt.datetime.now(dt.timezone.utc)
    return now if like.tzinfo is not None else now.replace(tzinfo=None)


# --------------------------------------------------------------------------- stages


class Stages:
    """Compile, profile and inference of components on one device, through one job driver."""

    def __init__(
        self,
        client: qai_hub.Client,
        driver: JobDriver,
        settings: AIHubConfig,
        *,
        device: str,
        target_runtime: str,
        runtime_options: str,
        channel_last_inputs: Iterable[str],
        track: str,
        fp16_options: str = "",
        models_dir: Path | None = None,
        outputs_dir: Path | None = None,
        datasets: DatasetRecords | None = None,
        redact: Callable[[object], str],
        emit: Emit,
    ) -> None:
        self.client = client
        self.driver = driver
        self.settings = settings
        self.device = device
        self.target_runtime = target_runtime
        self.runtime_options = runtime_options
        self.channel_last_inputs = frozenset(channel_last_inputs)
        self.track = track
        self.fp16_options = fp16_options
        # The device hazard check of a graph made or downloaded here, before it is compiled.
        self.graph_check: GraphCheck | None = None
        # The submission contract's check of each compiled model's I/O (io_contract).
        self.compiled_check: CompiledCheck | None = None
        # Where quantize jobs' models come down to (one folder per job): the deployed graph.
        self.models_dir = Path(models_dir) if models_dir is not None else None
        # Where inference jobs' device outputs are kept (one h5 file per job): a reused job is
        # read from here, never paid again when AI Hub has deleted its outputs.
        self.outputs_dir = Path(outputs_dir) if outputs_dir is not None else None
        # Which AI Hub dataset holds which arrays: inputs go up once while AI Hub keeps them.
        self.datasets = datasets
        self._redact = redact
        self._emit = emit
        self._hub_device = qai_hub.Device(name=device)
        self.sleep: Callable[[float], None] = time.sleep  # waits out 429s (tests: no wait)
        self._models: dict[str, Any] = {}
        self._digests: dict[Path, str] = {}
        self._external: dict[Path, list[Path]] = {}
        # qai-hub >= 0.56: a profile job is an inference job with profile=True.
        self._profiling_is_inference = (
            "profile" in inspect.signature(client.submit_inference_job).parameters
        )

    # ------------------------------------------------------------------ plumbing

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        return guard(fn, what, self._redact)

    def _job_model(self, state: ComponentState, job: Any, kind: str) -> Any:
        """The model a finished compile or quantize job made; a job without one fails its run."""
        target = self._call(job.get_target_model, f"reading the model of {job.job_id}")
        if target is None:
            raise RuntimeStageError(
                f"{state.component}: {kind} job {job.job_id} finished without a model ({job.url})"
            )
        return target

    def _submit(self, fn: Callable[[], Any], what: str) -> Any:
        return submit(self.client, fn, what, self._redact)

    def _submit_inference_job(
        self, model: Any, inputs: Any, name: str, options: str, what: str, profile: bool = False
    ) -> Any:
        kwargs = {"profile": profile} if self._profiling_is_inference else {}
        return self._submit(
            lambda: self.client.submit_inference_job(
                model, device=self._hub_device, inputs=inputs, name=name, options=options, **kwargs
            ),
            what,
        )

    def _qairt_key(self) -> str:
        """``hub.qairt_version`` as the ledger keys it: a job run under another is not reused."""
        return self.settings.qairt_version or "default"

    def _job_name(self, component: str, suffix: str = "") -> str:
        base = f"{self.track}-{component}" if self.track else component
        return f"{base} {suffix}".strip()

    def _external_files(self, path: Path) -> list[Path]:
        if path not in self._external:
            self._external[path] = external_data_files(path)
        return self._external[path]

    def _check(self, component: str, label: str, path: Path) -> None:
        if self.graph_check is not None:
            self.graph_check(component, label, path)

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

    # ------------------------------------------------------------------ compile

    def start_quantize(self, state: ComponentState) -> Pending:
        """AIHM's flow for a quantized component: the export is first compiled to an ONNX target
        (``--target_runtime onnx --output_names <out>``, plus ``--truncate_64bit_io`` for a
        64-bit input); :meth:`_start_quantize_job` quantizes that model when it is done."""
        exported = state.exported
        spec = exported.input
        if state.precision.calibration is None:
            raise RuntimeStageError(f"{state.component}: {state.precision.name} needs calibration")
        parts = ["--target_runtime", "onnx", "--output_names", exported.output_name]
        if spec.dtype in ("int64", "uint64") and "--truncate_64bit_io" in shlex.split(
            self.runtime_options
        ):
            parts.append("--truncate_64bit_io")
        options = shlex.join(parts)
        inputs = {
            "model_sha256": self._model_digest(exported),
            "input_specs": {spec.name: [list(spec.shape), spec.dtype]},
        }

        submit_job = self._compile_submitter(state, spec.dtype, options, onnx=True)

        def on_success(p: Pending) -> list[Pending]:
            target = self._job_model(state, p.job, "ONNX compile")
            io = self._target_io(target, p.job.job_id)
            state.onnx_input, _ = self._device_input(exported, io, p.entry)
            return [self._start_quantize_job(state, target, p.job.job_id)]

        return self.driver.start(
            "onnx_compile", state.trail, inputs, options, submit_job, on_success
        )

    def _start_quantize_job(self, state: ComponentState, onnx_model: Any, onnx_job: str) -> Pending:
        """``submit_quantize_job`` of the ONNX model with the calibration data (cast to the ONNX
        model's input dtype: int32 for token IDs under ``--truncate_64bit_io``), options as AIHM
        sets them (``--range_scheme min_max`` for w8a16); compile follows its model."""
        cal = state.precision.calibration
        assert cal is not None and state.onnx_input is not None
        input_name, input_dtype = state.onnx_input.name, state.onnx_input.dtype
        weights, activations = QUANTIZE_DTYPES[state.precision.name]
        options = quantize_options(state.precision.name)
        inputs = {
            "onnx_compile_job": onnx_job,
            "calibration_sha256": cal.sha256,
            "weights_dtype": weights,
            "activations_dtype": activations,
        }
        base = self._job_name(state.component, f"quantize {state.precision.name}")

        def submit_job() -> Any:
            # A name of its own per submission: a job whose creation answer was lost is found
            # again by it (client.find_job_by_name) instead of being paid for twice.
            name = f"{base} [{secrets.token_hex(4)}]"
            samples = np.asarray(cal.samples).astype(input_dtype, copy=False)
            dataset = self._dataset(
                state.component, f"{base} calibration", input_name, samples, "calibration "
            )
            return submit(
                self.client,
                lambda: self.client.submit_quantize_job(
                    onnx_model,
                    dataset,
                    weights_dtype=qai_hub.QuantizeDtype[weights],
                    activations_dtype=qai_hub.QuantizeDtype[activations],
                    name=name,
                    options=options,
                ),
                f"submitting the quantize job of {state.component}",
                self._redact,
                find=lambda: find_job_by_name(self.client, qai_hub.JobType.QUANTIZE, name),
                retry_rate_limits=True,  # the client retries 429s for compile, not quantize
                sleep=self.sleep,
            )

        def on_success(p: Pending) -> list[Pending]:
            target = self._job_model(state, p.job, "quantize")
            state.quantized_model = target
            deployed = self._download_quantized(state, target, p.job.job_id)
            if deployed is not None:  # its hazards, before its compile job is paid for
                self._check(state.component, state.precision.name, Path(deployed.path))
            state.quantized = QuantizeResult(
                component=state.component,
                precision=state.precision.name,
                method=(
                    f"AI Hub quantize job (weights {weights}, activations {activations}"
                    + (f", {options}" if options else "")
                    + ") of the ONNX-compiled export"
                ),
                seconds=time.monotonic() - p.started,
                calibration_samples=len(cal),
                calibration_sha256=cal.sha256,
                calibration_source=cal.source,
                job_id=p.job.job_id,
                job_url=p.job.url,
                model=deployed,
            )
            return [self.start_compile(state)]

        return self.driver.start("quantize", state.trail, inputs, options, submit_job, on_success)

    def _download_quantized(
        self, state: ComponentState, target: Any, job_id: str
    ) -> ExportResult | None:
        """The quantize job's model, downloaded into ``<models_dir>/<job ID>/`` (once per job:
        a reused job's file is read again): the graph that is deployed, logged as the
        component's model. None when the hub has no folder for it."""
        if self.models_dir is None:
            return None
        folder = self.models_dir / job_id
        path = find_onnx(folder) if folder.is_dir() else None
        if path is None:
            folder.mkdir(parents=True, exist_ok=True)
            with contextlib.redirect_stdout(io.StringIO()):  # "Downloaded model to <path>"
                got = self._call(
                    lambda: target.download(str(folder)),
                    f"downloading the quantized model {target.model_id} of {job_id}",
                )
            path = find_onnx(Path(got))
            if path is None:
                raise RuntimeStageError(
                    f"{state.component}: quantize job {job_id} gave {Path(got).name}, which "
                    f"holds no .onnx graph; open {target.url} to check the model"
                )
        log.info("AI Hub: %s: quantized model of %s is %s", state.component, job_id, path)
        exported = state.exported
        spec = exported.input
        if state.onnx_input is not None:  # the ONNX compile's input (int32 text tokens)
            spec = dataclasses.replace(spec, dtype=state.onnx_input.dtype)
        return dataclasses.replace(
            exported,
            path=path,
            sha256=file_sha256(path),
            input=spec,
            parity_cosine_min=float("nan"),  # measured against fp32 by the fidelity gate
            parity_samples=0,
            seconds=0.0,
            rewrite_sites={},
            rewrite_cosine_min={},
            op_counts={},
        )

    def start_compile(self, state: ComponentState) -> Pending:
        """Upload and compile one export -- or the model its quantize job made -- (or reuse or
        resume its compile job); share it."""
        exported = state.exported
        spec = exported.input
        fp16 = state.precision.name == "fp16"
        quantized = state.quantized_model is not None
        # fp16: the fp32 export compiled with the runtime's fp16 options, as AIHM does.
        # --quantize_io (hub.quantize_io, AIHM's choice) makes a quantized or fp16 model's I/O
        # integer / float16, which the submission contract refuses: off by default.
        precision_options = self.fp16_options if fp16 else ""
        if self.settings.quantize_io and (fp16 or quantized):
            precision_options = f"{precision_options} --quantize_io".strip()
        options = compile_options(
            exported,
            self.target_runtime,
            self.runtime_options,
            self.channel_last_inputs,
            self.settings.extra_compile_options,
            precision_options=precision_options,
            qairt_version=self.settings.qairt_version,
        )
        # The quantized ONNX model takes what the ONNX compile made of the input (int32 text).
        dtype = state.onnx_input.dtype if quantized and state.onnx_input else spec.dtype
        if fp16 and state.quantized is None:
            state.quantized = self._fp16_checked(state, options)
        source = (
            {"quantize_job": state.quantized.job_id}
            if state.quantized_model is not None and state.quantized is not None
            else {"model_sha256": self._model_digest(exported)}
        )
        inputs = {**source, "input_specs": {spec.name: [list(spec.shape), dtype]}}
        if self.target_runtime in QNN_RUNTIMES:  # the ledger never reuses across versions
            inputs["qairt_version"] = self._qairt_key()

        submit_job = self._compile_submitter(state, dtype, options)

        def on_success(p: Pending) -> list[Pending]:
            state.compiled = self._compiled_result(state, p)
            if self.compiled_check is not None and state.compiled.io is not None:
                # the submission contract, before the profile and inference are paid for
                self.compiled_check(
                    state.component, state.compiled.io, f"compile job {p.job.job_id}"
                )
            return self.after_compile(state)

        pending = self.driver.start("compile", state.trail, inputs, options, submit_job, on_success)
        self._share(pending)
        return pending

    def _compile_submitter(
        self, state: ComponentState, dtype: str, options: str, onnx: bool = False
    ) -> Callable[[], Any]:
        """What submits a compile job of the component's source model (the ONNX-target compile
        of AIHM's quantize flow with ``onnx``), its input of ``dtype``."""
        spec = state.exported.input
        what = "ONNX compile job" if onnx else "compile job"

        def submit_job() -> Any:
            model = self._source_model(state)
            return self._submit(
                lambda: self.client.submit_compile_job(
                    model,
                    device=self._hub_device,
                    name=self._job_name(state.component, "onnx" if onnx else ""),
                    input_specs={spec.name: (tuple(spec.shape), dtype)},
                    options=options,
                ),
                f"submitting the {what} of {state.component}",
            )

        return submit_job

    def after_compile(self, state: ComponentState) -> list[Pending]:
        """The jobs of the stages the component asked for, once it is compiled."""
        follow = []
        if PROFILE in state.wanted:
            follow.append(self.start_profile(state))
        if INFERENCE in state.wanted and state.inputs is not None:
            follow.extend(self.start_inference(state))
        return follow

    def _source_model(self, state: ComponentState) -> Any:
        """The model compile (or quantize) takes: the quantize job's model when there is one,
        else the fp32 export, uploaded (an fp16 component too: AI Hub converts it)."""
        if state.quantized_model is not None:
            return state.quantized_model
        path = Path(state.exported.path)
        data_files = self._external_files(path)
        with tempfile.TemporaryDirectory(prefix="lpcvlab-aihub-") as tmp:
            upload = stage_model(path, data_files, Path(tmp)) if data_files else path
            model = self._call(
                lambda: self.client.upload_model(str(upload), name=self._job_name(state.component)),
                f"uploading {upload.name} ({state.component})",
            )
        log.info("AI Hub: uploaded %s as model %s", upload.name, model.model_id)
        self._emit(state.component, "upload", model.model_id, model.url, "UPLOADED")
        return model

    def _fp16_checked(self, state: ComponentState, options: str) -> QuantizeResult:
        """The fp16 component as AIHM makes it: the fp32 export goes up and AI Hub converts it
        (``options``). The export converted to fp16 on this machine (ONNX Runtime's float16
        converter, as ``hub=local`` emulates it) is only shown to the device lint, before the
        compile job is paid for; what runs is the compile job's target model, logged as the
        deployed artifact."""
        made = emulate(state.exported, state.precision)
        assert made.model is not None
        self._check(state.component, "fp16", Path(made.model.path))
        return QuantizeResult(
            component=state.component,
            precision="fp16",
            method=(
                f"AI Hub compile of the fp32 export with {options!r} (the local fp16 "
                "conversion is only checked for device hazards)"
            ),
            seconds=made.seconds,
        )

    def _share(self, p: Pending) -> None:
        emails = list(self.settings.share_with)
        if not emails:
            return
        self._call(
            lambda: p.job.modify_sharing(add_emails=emails),
            f"sharing compile job {p.job.job_id} with {', '.join(emails)}",
        )
        status = f"SHARED with {', '.join(emails)}"
        log.info("AI Hub: compile job %s (%s) %s", p.job.job_id, p.component, status)
        self._emit(p.component, "compile", p.job.job_id, p.job.url, status)

    def _compiled_result(self, state: ComponentState, p: Pending) -> CompileResult:
        job = p.job
        target = self._job_model(state, job, "compile")
        io = self._target_io(target, job.job_id)
        first, channel_last = self._device_input(state.exported, io, p.entry)
        io = CompiledIO((first, *(t for t in io.inputs if t.name != first.name)), io.outputs)
        self._models[target.model_id] = target
        # The compiled model the submission form asks for, recorded as it becomes known.
        self._emit(state.component, "target_model", target.model_id, target.url, "COMPILED")
        version = self._qairt_version(target, job.job_id)
        if version:
            self._emit(state.component, "qairt_version", job.job_id, None, version)
        artifact = self._download_target(state, target, job.job_id)
        handle = HubTarget(
            compile_job_id=job.job_id,
            model_id=target.model_id,
            device=self.device,
            options=p.entry.options,
            io=io,
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
            io=io,
            artifact=artifact,
            artifact_sha256=_artifact_sha256(artifact) if artifact is not None else None,
            toolchain=f"QAIRT {version}" if version else None,
        )

    def _target_io(self, target: Any, job_id: str) -> CompiledIO:
        return target_io(target, job_id, self._redact)

    def _qairt_version(self, target: Any, job_id: str) -> str:
        """The QAIRT version the compiled model reports (its metadata), '' when none."""
        key = getattr(getattr(qai_hub, "ModelMetadataKey", None), "QAIRT_SDK_VERSION", None)
        if key is None:
            return ""
        metadata = self._call(lambda: target.metadata, f"reading the metadata of {job_id}")
        return str((metadata or {}).get(key, "") or "")

    def _download_target(self, state: ComponentState, target: Any, job_id: str) -> Path | None:
        """The compile job's target model (``.dlc`` / ``.bin`` / ONNX), downloaded into
        ``<models_dir>/<compile job ID>/`` once per job: what AI Hub built and the device
        runs, logged as the deployed artifact. None when the hub has no folder for it."""
        if self.models_dir is None:
            return None
        folder = self.models_dir / job_id
        found = _downloaded(folder)
        if found is None:
            partial = self.models_dir / f".{job_id}.{secrets.token_hex(4)}"
            partial.mkdir(parents=True)
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # "Downloaded model to <path>"
                    self._call(
                        lambda: target.download(str(partial)),
                        f"downloading the compiled model {target.model_id} of {job_id}",
                    )
                try:  # whole or not at all: a broken download is retried
                    partial.rename(folder)
                except OSError:  # another process of a sweep brought the same file down first
                    if _downloaded(folder) is None:
                        raise
            finally:
                shutil.rmtree(partial, ignore_errors=True)
            found = _downloaded(folder)
            if found is None:
                raise RuntimeStageError(
                    f"{state.component}: compile job {job_id} gave no file to download; open "
                    f"{target.url} to check the model"
                )
        log.info("AI Hub: %s: compiled model of %s is %s", state.component, job_id, found)
        return found

    def _device_input(
        self, exported: ExportResult, io: CompiledIO, entry: LedgerEntry
    ) -> tuple[DeviceTensor, bool]:
        """The compiled model's input the export's input became, and whether it is channel-last."""
        spec = exported.input
        shape = tuple(int(d) for d in spec.shape)
        cl_shape = channel_last_shape(shape) if len(shape) >= 3 else None
        forced = spec.name in forced_channel_last(entry.options)
        found = next((t for t in io.inputs if t.name == spec.name), None)
        if found is None and len(io.inputs) == 1:
            found = io.inputs[0]
        if found is None:
            raise RuntimeStageError(
                f"{exported.component}: the compiled model has no input {spec.name!r} (it takes "
                f"{', '.join(t.describe() for t in io.inputs) or 'none'}); check the compile "
                f"options {entry.options!r}"
            )
        device_shape = tuple(found.shape)
        if device_shape == shape and device_shape == cl_shape:
            channel_last = forced
        elif device_shape == shape:
            channel_last = False
        elif cl_shape is not None and device_shape == cl_shape:
            channel_last = True
        else:
            raise RuntimeStageError(
                f"{exported.component}: the compiled model takes {found.describe()}, whose shape "
                f"is neither the exported {shape} nor its channel-last form; check the compile "
                f"options {entry.options!r}"
            )
        return found, channel_last

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
    def _handle(state: ComponentState) -> HubTarget:
        compiled = state.compiled
        if compiled is None or not isinstance(compiled.handle, HubTarget):
            raise RuntimeStageError(
                f"{state.component}: not compiled on AI Hub (handle "
                f"{type(getattr(compiled, 'handle', None)).__name__}); compile with hub=aihub first"
            )
        return compiled.handle

    # ------------------------------------------------------------------ profile

    def start_profile(self, state: ComponentState) -> Pending:
        """A profile job of the compiled model; its result lands in ``state.profile``."""
        handle = self._handle(state)
        options = profile_options(self.settings)

        def submit_job() -> Any:
            model = self._target_model(handle)
            name = self._job_name(state.component, "profile")
            what = f"submitting the profile job of {state.component}"
            if self._profiling_is_inference:
                return self._submit_inference_job(model, None, name, options, what, profile=True)
            return self._submit(
                lambda: self.client.submit_profile_job(
                    model, device=self._hub_device, name=name, options=options
                ),
                what,
            )

        def on_success(p: Pending) -> list[Pending]:
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

        inputs = {"compile_job": handle.compile_job_id, "qairt_version": self._qairt_key()}
        return self.driver.start("profile", state.trail, inputs, options, submit_job, on_success)

    # ------------------------------------------------------------------ inference

    def _device_batch(self, handle: HubTarget, batch: np.ndarray) -> np.ndarray:
        """Inputs as the compiled model takes them: channel-last where it is, quantized with
        its scale and zero point where its input is quantized (never a bare cast)."""
        x = np.moveaxis(batch, 1, -1) if handle.channel_last else batch
        return to_device(x, handle.input)

    def start_inference(self, state: ComponentState) -> list[Pending]:
        """One inference job per chunk of ``state.inputs``, at most ``hub.inference_window`` of
        them in flight: each finished chunk starts the next, so memory stays flat in the number
        of chunks. :meth:`finish_inference` joins the outputs."""
        assert state.inputs is not None
        check_inputs(state.exported, state.inputs)
        handle = self._handle(state)
        n = len(state.inputs)
        per = samples_per_chunk(handle.device_shape, handle.device_dtype, self.settings.chunk_bytes)
        bounds = [(a, min(a + per, n)) for a in range(0, n, per)]
        state.chunk_outputs = [None] * len(bounds)
        state.infer_started = time.perf_counter()
        options = inference_options(self.settings)
        window = max(1, int(self.settings.inference_window))
        if len(bounds) > 1:
            log.info(
                "AI Hub: %s: %d samples in %d chunks of <= %d (hub.chunk_bytes=%d), at most %d "
                "in flight (hub.inference_window)",
                state.component,
                n,
                len(bounds),
                per,
                self.settings.chunk_bytes,
                window,
            )

        def start_chunk(ci: int) -> Pending:
            a, b = bounds[ci]
            label = f"{ci + 1}/{len(bounds)}" if len(bounds) > 1 else ""
            # state.inputs may read from disk (Track 2's CachedClips): a chunk at a time
            digest = array_sha256(self._device_batch(handle, state.inputs[a:b]))
            inputs = {
                "compile_job": handle.compile_job_id,
                "dataset_sha256": digest,
                "qairt_version": self._qairt_key(),
            }

            # The device batch is rebuilt at submission rather than kept: a reused chunk needs
            # none, and holding every chunk until the end would double the inputs' memory.
            def submit_job() -> Any:
                assert state.inputs is not None
                batch = self._device_batch(handle, state.inputs[a:b])
                return self._submit_inference(state, handle, batch, digest, label, options)

            def on_success(p: Pending) -> list[Pending]:
                follow = [start_chunk(ci + window)] if ci + window < len(bounds) else []
                try:
                    state.chunk_outputs[ci] = self._download_outputs(state, p, b - a)
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
                    state.trail.drop("inference", p.job.job_id, p.job.url)
                    return [p.restart(), *follow]
                return follow

            return self.driver.start(
                "inference", state.trail, inputs, options, submit_job, on_success, label
            )

        return [start_chunk(ci) for ci in range(min(window, len(bounds)))]

    def _submit_inference(
        self,
        state: ComponentState,
        handle: HubTarget,
        batch: np.ndarray,
        digest: str,
        label: str,
        options: str,
    ) -> Any:
        name = self._job_name(state.component, f"inference {label}".strip())
        dataset = self._dataset(state.component, name, handle.input_name, batch, digest=digest)
        model = self._target_model(handle)
        return self._submit_inference_job(model, dataset, name, options, f"submitting {name}")

    def _dataset(
        self,
        component: str,
        name: str,
        input_name: str,
        batch: np.ndarray,
        what: str = "",
        digest: str | None = None,
    ) -> Any:
        """The AI Hub dataset holding ``batch`` (sample ``i`` as ``batch[i:i+1]`` under
        ``input_name``): the one this or any earlier run uploaded with the same arrays, while AI
        Hub keeps it, else uploaded now and recorded. The look-up and upload hold the arrays'
        claim, so two configs or processes needing them upload them once."""
        digest = digest or array_sha256(batch)
        if self.datasets is None or not self.settings.reuse:
            return self._upload_dataset(component, name, input_name, batch, what)
        api_url = self.client.config.api_url
        key = dataset_key(input_name, digest, api_url)
        with self.datasets.claim(key):
            record = self.datasets.latest(key)
            found = self._live_dataset(record) if record is not None else None
            if found is not None:
                assert record is not None
                log.info(
                    "AI Hub: reusing dataset %s (%d %ssamples of %s, uploaded %s)",
                    found.dataset_id,
                    record.samples,
                    what,
                    component,
                    record.uploaded,
                )
                return found
            dataset = self._upload_dataset(component, name, input_name, batch, what)
            expires = getattr(dataset, "expiration_time", None)
            self.datasets.record(
                DatasetRecord(
                    key=key,
                    dataset_id=dataset.dataset_id,
                    name=name,
                    input_name=input_name,
                    samples=len(batch),
                    sha256=digest,
                    api_url=api_url,
                    expires=expires.isoformat() if expires is not None else "",
                )
            )
            return dataset

    def _live_dataset(self, record: DatasetRecord) -> Any | None:
        """The recorded dataset when AI Hub still has it for at least a day (a job started on
        it must not outlive it), else None: it is uploaded again."""
        try:
            dataset = guard(
                lambda: self.client.get_dataset(record.dataset_id),
                f"fetching dataset {record.dataset_id}",
                self._redact,
                passthrough=(hub_client.UserError,),
            )
        except hub_client.UserError:
            dataset = None
        expires = getattr(dataset, "expiration_time", None)
        if (
            dataset is None
            or dataset.is_expired()
            or (expires is not None and expires - _utcnow(expires) < DATASET_MARGIN)
        ):
            log.info(
                "AI Hub: dataset %s (%s) has expired or is about to; uploading its arrays again",
                record.dataset_id,
                record.name,
            )
            return None
        return dataset

    def _upload_dataset(
        self, component: str, name: str, input_name: str, batch: np.ndarray, what: str = ""
    ) -> Any:
        # The h5 file is written here and uploaded by path: the client then keeps no copy of
        # the arrays in its Dataset (and so in the job), and the file goes whatever happens
        # (the client's own temporary file stays behind when an upload fails).
        with tempfile.TemporaryDirectory(prefix="lpcvlab-aihub-") as tmp:
            path = Path(tmp) / "inputs.h5"
            with h5py.File(path, "w") as h5:
                entries = {input_name: [batch[i : i + 1] for i in range(len(batch))]}
                dataset_entries_to_h5(entries, h5)
            del entries
            dataset = self._call(
                lambda: self.client.upload_dataset(str(path), name=name),
                f"uploading the inputs of {name}",
            )
        log.info(
            "AI Hub: uploaded %d %s %ssamples of %s as dataset %s",
            len(batch),
            "x".join(map(str, (1, *batch.shape[1:]))),
            what,
            component,
            dataset.dataset_id,
        )
        return dataset

    def _download_outputs(self, state: ComponentState, p: Pending, expected: int) -> np.ndarray:
        # Into a folder of lpcvlab's, then kept in ``outputs_dir`` (one h5 file per job): a
        # reused job is read from there, so AI Hub deleting its outputs (after 30 days) costs no
        # new job. Downloaded to memory, the client leaves an empty temporary file behind per
        # download and keeps the outputs in its Dataset.
        kept = self.outputs_dir / f"{p.job.job_id}.h5" if self.outputs_dir is not None else None
        out = _read_outputs(kept) if kept is not None and kept.is_file() else None
        if out is None:
            with tempfile.TemporaryDirectory(prefix="lpcvlab-aihub-") as tmp:
                with contextlib.redirect_stdout(io.StringIO()):  # "Downloaded dataset to <tmp>"
                    path = self._call(
                        lambda: p.job.download_output_data(tmp),
                        f"downloading outputs of {p.job.job_id}",
                    )
                out = _read_outputs(Path(path)) if path else None
                if out and kept is not None:
                    atomic_write(kept, lambda dest: shutil.copyfile(path, dest))
        else:
            log.info("AI Hub: outputs of %s read from %s", p.job.job_id, kept)
        if not out:
            raise RuntimeStageError(
                f"{state.component}: inference job {p.job.job_id} produced no output data "
                f"({p.job.url})"
            )
        wanted = state.exported.output_name
        key = wanted if wanted in out else next(iter(out))
        if key != wanted:
            log.debug("AI Hub: %s has no output %r; reading %r", p.job.job_id, wanted, key)
        # quantized outputs dequantized with the compiled output's scale and zero point
        spec = self._handle(state).output(key)
        arrays = [from_device(a, spec) for a in out[key]]
        if len(arrays) != expected:
            raise RuntimeStageError(
                f"{state.component}: inference job {p.job.job_id} returned {len(arrays)} outputs "
                f"for {expected} inputs ({p.job.url})"
            )
        return np.concatenate(arrays, axis=0) if arrays else np.empty((0,))

    def finish_inference(self, state: ComponentState) -> InferenceResult:
        """The chunks' outputs in input order, with device-vs-host parity over the first ones."""
        assert state.inputs is not None
        if state.inference is not None:
            return state.inference
        missing = [i for i, c in enumerate(state.chunk_outputs) if c is None]
        if missing:
            raise RuntimeStageError(f"{state.component}: chunks {missing} have no outputs")
        chunks = [c for c in state.chunk_outputs if c is not None]
        outputs = np.concatenate(chunks, axis=0) if chunks else np.empty((0,))
        metrics = device_parity(
            state.exported, state.inputs, outputs, self.settings.parity_samples, self.device
        )
        ids = state.trail.ids.get("inference", [])
        urls = state.trail.urls.get("inference", [])
        state.inference = InferenceResult(
            component=state.component,
            outputs=outputs,
            seconds=time.perf_counter() - state.infer_started,
            job_id=",".join(ids) or None,
            job_url=urls[0] if urls else None,
            metrics=metrics,
        )
        return state.inference
