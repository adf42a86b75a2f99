"""A fake Qualcomm AI Hub behind the real ``qai_hub`` client: only the socket is faked.

``FakeAIHub.install(monkeypatch)`` replaces ``urllib3.connectionpool.HTTPConnectionPool.
_make_request`` -- the one place below urllib3's retry loop where every request of this process
meets the network: the AI Hub REST API, the pre-signed storage uploads and downloads, and the
reachability probe alike. It answers with a real ``urllib3.response.HTTPResponse`` carrying the
client's own protobuf messages. Everything above it runs for real: ``requests``, urllib3's
retries (the client's ``LogRetry``: 7 tries), the ``qai_hub.Client``, jobs, models, datasets,
protobuf parsing, multipart and h5 uploads, error mapping. Nothing reaches the network: opening a
real connection, an unknown host or an unknown route fails the test.

:meth:`FakeAIHub.fail_requests` simulates the network failing under the client, as urllib3's own
exceptions (``"refused"``: ``NewConnectionError``; ``"dns"``: ``NameResolutionError``;
``"connect_timeout"``: ``ConnectTimeoutError`` after waiting the caller's connect timeout;
``"read_timeout"``: ``ReadTimeoutError``; ``"dropped"``: ``ProtocolError``) or as an HTTP status
(``503``). Tests call :func:`without_backoff_sleeps` so that retries do not sleep.

The fake behaves like the service where the hub relies on it:

- compile jobs read the uploaded ONNX model (a file or a zipped ``.onnx`` directory), apply
  ``--truncate_64bit_io``, ``--force_channel_last_input`` and ``--output_names`` to the target
  model's I/O, and take ``steps`` status polls to finish; ``--quantize_io`` makes a quantized
  model's float I/O integer with the scale and zero point calibrated by its quantize job (the
  target model's ``TensorSpec``), float16 with ``--quantize_full_type float16``;
  ``--qairt_version`` must name a version the fake has (:data:`QAIRT_VERSIONS`; its default
  otherwise) and the compiled model reports it in its metadata; a QNN target model's file is a
  stand-in (``FAKE-QAIRT`` header, then the graph) that ``Model.download`` fetches;
- inference jobs reject a dataset whose shape or dtype differs from the compiled input (as the
  device would), run the model with ONNX Runtime (channel-last inputs transposed back) and add a
  small deterministic error, as a device would;
- profile jobs return a ``ProfileDetail`` (µs, bytes, per-layer compute units);
- quantize jobs check the calibration dataset against the model's input (name, shape, dtype) and
  the dtypes (INT8 weights; INT8 or INT16 activations), then make a QDQ ONNX model of it with
  ONNX Runtime's static quantization on that calibration data (QuantizeLinear / DequantizeLinear
  nodes, so its outputs differ a little from the source's), which ``Model.download`` fetches (a
  ``.onnx`` file; a directory model as a ``.onnx.zip``); an
  ONNX-target compile makes an ONNX model (int32 inputs under ``--truncate_64bit_io``) that a
  quantize job can take, as AIHM's flow needs.

Transfers go the way the client asks for them: qai-hub >= 0.52 asks for S3 credentials
(``supports_s3_credentials=true``) and gets them, then boto3 talks to the fake's S3 (PutObject,
multipart uploads, HeadObject, ranged GetObject) and the upload is confirmed; an older client
(or ``offer_credentials = False``) gets pre-signed URLs. Older clients' profile jobs
(``submit_profile_job``) are answered as profile jobs, 0.56's as inference jobs with profiling.

It refuses what the service refuses: options a job type does not take (:data:`COMPILE_OPTIONS`,
:data:`INFERENCE_OPTIONS`, :data:`QUANTIZE_OPTIONS`, 400), uploads over the size limits
(``dataset_limit_bytes`` 2 GB, ``model_limit_bytes``), and on the QNN targets the graphs the
compiler cannot take (the ops of its own :data:`REFUSED_OPS`, ``Erf`` among them -- a list kept
apart from lpcvlab's lint, so the lint is tested against one it did not write; 64-bit I/O without
``--truncate_64bit_io``; dynamic dimensions); a w8a16 model on ``qnn_dlc`` compiles and then fails
on the device (``MODEL_GRAPH_ERROR``). ``rate_limited[kind]`` answers that many creations of a job
kind with 429, ``lost_answers[kind]`` drops that many creation answers after creating the job,
and the device list is AIHM's (the IQ-9075 runs Qualcomm Linux 1.5, the phones Android).

Time: a job finishes after ``steps`` status polls and, when ``durations[kind]`` is set (kinds
``compile``, ``quantize``, ``profile``, ``inference``), not before that many seconds since its
creation, so a sweep can be timed against jobs of a set length. :meth:`FakeAIHub.
duplicate_jobs` counts jobs that compute what an earlier job computed (same kind, device,
options, model and data content) and :meth:`FakeAIHub.dataset_uploads` the datasets uploaded
and how many distinct contents they held.

Other processes: :class:`FakeServer` serves one fake to the processes a test starts (a
``python run.py`` sweep, two processes racing for the same job) over a Unix socket;
:func:`connect`, run in such a process (``tests/inject/sitecustomize.py`` does it when
``LPCVLAB_TEST_FAKE_AIHUB`` names the socket), sends every HTTP request of that process there.
Network failures are not simulated across processes.
"""

from __future__ import annotations

import hashlib
import http
import http.client
import io
import json
import os
import re
import shlex
import socket
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Listener
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import h5py
import numpy as np
import onnx
import onnxruntime as ort
import qai_hub.public_api_pb2 as pb
import urllib3.connection
import urllib3.exceptions as u3
from google.protobuf.timestamp_pb2 import Timestamp
from onnx import numpy_helper
from qai_hub.public_rest_api import DEFAULT_HUB_API_URL
from qai_hub.util.dataset_entries_converters import dataset_entries_to_h5, h5_to_dataset_entries
from requests_toolbelt.multipart.decoder import MultipartDecoder
from urllib3._collections import HTTPHeaderDict
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.response import HTTPResponse
from urllib3.util.timeout import Timeout

API_HOST = urlsplit(DEFAULT_HUB_API_URL).hostname
STORAGE = "fake-storage.invalid"
# As AI Hub Models' devices_and_chipsets.yaml describes them: (name, OS type, OS version, chipset).
DEVICE_FACTS = (
    ("XR2 Gen 2 (Proxy)", "Android", "13", "qualcomm-qcs8450-proxy"),
    ("Dragonwing IQ-9075 EVK", "Qualcomm Linux", "1.5", "qualcomm-qcs9075"),
    ("Samsung Galaxy S25", "Android", "15", "qualcomm-snapdragon-8-elite-for-galaxy"),
)
DEVICES = tuple(d[0] for d in DEVICE_FACTS)
# The options each job type accepts, as the AI Hub documentation lists them (compile, profile /
# inference, quantize); the service answers 400 to any other. Recalled from the documentation's
# option tables and AIHM's use of them: complete for what lpcvlab and AIHM send, uncertain beyond.
COMPILE_OPTIONS = frozenset(
    {
        "--target_runtime", "--output_names", "--truncate_64bit_tensors", "--truncate_64bit_io",
        "--force_channel_last_input", "--force_channel_last_output", "--compute_unit",
        "--qairt_version", "--quantize_full_type", "--quantize_io", "--quantize_io_type",
        "--qnn_graph_name", "--qnn_context_binary_vtcm", "--qnn_options",
    }
)  # fmt: skip
INFERENCE_OPTIONS = frozenset(
    {
        "--compute_unit", "--qairt_version", "--dequantize_outputs", "--tflite_delegates",
        "--tflite_options", "--qnn_options", "--onnx_options", "--onnx_execution_providers",
        "--max_profiler_iterations", "--max_profiler_time",
    }
)  # fmt: skip
QUANTIZE_OPTIONS = frozenset({"--range_scheme", "--lite_mp"})
TARGET_RUNTIMES = frozenset(
    {"tflite", "qnn_lib_aarch64_android", "qnn_context_binary", "qnn_dlc", "onnx",
     "precompiled_qnn_onnx"}
)  # fmt: skip
QUANTIZE_FULL_TYPES = frozenset({"int8", "int16", "w8a16", "w4a8", "w4a16", "float16"})
# The targets the QAIRT compiler builds for the HTP, where the refusals below apply.
QNN_TARGETS = frozenset({"qnn_dlc", "qnn_context_binary", "precompiled_qnn_onnx"})
# Ops this fake's compiler refuses on the HTP: its own list, kept apart from lpcvlab's lint so
# that the lint is tested against something it did not write. Erf: exact GELU failed to compile
# on QAIRT 2.42-2.45 in a public 2026 Track 1 entry; the others have no HTP kernel in the QAIRT
# "Supported ONNX Ops" table as read (data-dependent shapes, control flow, sampling, strings).
REFUSED_OPS = frozenset(
    {
        "Erf", "NonZero", "NonMaxSuppression", "Unique", "Loop", "If", "Scan",
        "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
        "StringNormalizer", "TfIdfVectorizer", "RoiAlign",
    }
)  # fmt: skip
# QAIRT versions the fake service has (--qairt_version takes the API version; "default" and
# "latest" are tags) and its default of the day. The real service's list changes with time.
QAIRT_VERSIONS = {"2.40": "2.40.0", "2.41": "2.41.0", "2.42": "2.42.0", "2.43": "2.43.0",
                  "2.44": "2.44.0", "2.45": "2.45.0"}  # fmt: skip
QAIRT_DEFAULT = "2.45"
QAIRT_LATEST = "2.45"
S3_HOST_SUFFIX = ".amazonaws.com"  # where credential-based (boto3) transfers go
S3_BUCKET = "fake-aihub-bucket"
RANGE_SCHEMES = frozenset({"auto", "mse_minimizer", "min_max"})
DATASET_LIMIT_BYTES = 2 * 1024**3  # AI Hub refuses datasets over 2 GB
MODEL_LIMIT_BYTES = 10 * 1024**3  # model uploads (an ONNX directory with its .data)
NETWORK_FAILURES = ("refused", "dns", "connect_timeout", "read_timeout", "dropped")
# A simulated connect timeout waits the caller's connect timeout, but never longer than this.
MAX_HANG_S = 5.0
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")

_TARGET_TYPES = {
    "qnn_dlc": pb.MODEL_TYPE_QNN_DLC,
    "qnn_context_binary": pb.MODEL_TYPE_QNN_CONTEXT_BINARY,
    "tflite": pb.MODEL_TYPE_TFLITE,
    "onnx": pb.MODEL_TYPE_ONNX,
    "precompiled_qnn_onnx": pb.MODEL_TYPE_ONNX,
}
_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
}


def _now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


def _later(days: int = 30) -> Timestamp:
    ts = _now()
    ts.seconds += days * 86400
    return ts


_TYPE_VALUES = {
    "float32": pb.TENSOR_DTYPE_FLOAT32,
    "float16": pb.TENSOR_DTYPE_FLOAT16,
    "int32": pb.TENSOR_DTYPE_INT32,
    "int64": pb.TENSOR_DTYPE_INT64,
    "int8": pb.TENSOR_DTYPE_INT8,
    "uint8": pb.TENSOR_DTYPE_UINT8,
    "int16": pb.TENSOR_DTYPE_INT16,
    "uint16": pb.TENSOR_DTYPE_UINT16,
}


class Tensor(NamedTuple):
    """One compiled input or output: what the service reports as a ``TensorType``."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None


def _tensor_list(specs: list[Tensor] | list[tuple[str, tuple[int, ...], str]]):
    types = []
    for spec in specs:
        t = Tensor(*spec)
        tensor_type = pb.TensorType(shape=list(t.shape), dtype=_TYPE_VALUES[t.dtype])
        if t.scale is not None:
            tensor_type.scale = t.scale
            tensor_type.zero_point = float(t.zero_point or 0)
        types.append(pb.NamedTensorType(name=t.name, tensor_type=tensor_type))
    return pb.NamedTensorTypeList(types=types)


def _options(options: str) -> dict[str, str]:
    tokens = options.split()
    out: dict[str, str] = {}
    for i, tok in enumerate(tokens):
        if tok.startswith("--"):
            nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
            out[tok] = "" if nxt.startswith("--") else nxt
    return out


def _option_problem(kind: str, options: str) -> str:
    """Why the service refuses ``options`` for a job of ``kind``, or ''."""
    allowed = {"compile": COMPILE_OPTIONS, "quantize": QUANTIZE_OPTIONS}.get(
        kind, INFERENCE_OPTIONS
    )
    tokens = shlex.split(options)
    for i, tok in enumerate(tokens):
        if not tok.startswith("--"):
            continue
        if tok not in allowed:
            return f"Unknown option {tok} for a {kind} job"
        value = tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith("--") else ""
        if tok == "--target_runtime" and value not in TARGET_RUNTIMES:
            return f"Invalid value for --target_runtime: {value!r}"
        if tok == "--quantize_full_type" and value not in QUANTIZE_FULL_TYPES:
            return f"Invalid value for --quantize_full_type: {value!r}"
        if tok == "--range_scheme" and value not in RANGE_SCHEMES:
            return f"Invalid value for --range_scheme: {value!r}"
        if tok == "--qairt_version" and value not in (*QAIRT_VERSIONS, "default", "latest"):
            return f"QAIRT version {value!r} is not supported by AI Hub (--qairt_version)"
    return ""


def _body_bytes(body: Any) -> bytes:
    """What a request sends: bytes, text, a file-like object or an iterable of chunks."""
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    if hasattr(body, "read"):  # urllib3 rewinds it itself before a retry
        data = body.read()
        return data.encode() if isinstance(data, str) else data
    return b"".join(c.encode() if isinstance(c, str) else bytes(c) for c in body)


class _Answer(NamedTuple):
    status: int
    content: bytes
    content_type: str = "application/x-protobuf"
    headers: dict[str, str] = {}


@dataclass
class FakeModel:
    model_id: str
    name: str
    model_type: int
    is_directory: bool = False
    data: bytes = b""
    # compiled models only
    onnx_bytes: bytes = b""  # the source graph, runnable (external data folded in)
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    source_input: tuple[str, tuple[int, ...], str] | None = None
    channel_last: bool = False
    producer_id: str = ""
    qairt_version: str = ""  # the full version the compiler used (model metadata)
    # quantize jobs' models: the calibrated encodings of the graph's float inputs and outputs
    # (tensor name -> integer dtype, scale, zero point), what --quantize_io gives the I/O
    encodings: dict[str, tuple[str, float, int]] = field(default_factory=dict)

    def pb(self) -> pb.Model:
        model = pb.Model(
            model_id=self.model_id,
            name=self.name,
            model_type=self.model_type,
            creation_time=_now(),
            is_directory=self.is_directory,
            file_upload_complete=True,
            producer_id=self.producer_id,
        )
        if self.inputs:
            model.input_spec.CopyFrom(_tensor_list(self.inputs))
            model.output_spec.CopyFrom(_tensor_list(self.outputs))
        if self.qairt_version:
            key = pb.MODEL_METADATA_KEY_QAIRT_SDK_VERSION
            model.metadata.entries[key] = self.qairt_version
        return model


@dataclass
class FakeJob:
    job_id: str
    kind: str  # "quantize" | "compile" | "inference"
    request: Any  # the CompileJob / InferenceJob protobuf the client sent
    device: str
    profiling: bool = False
    polls: int = 0
    state: int = pb.JOB_STATE_CREATED
    failure: str = ""
    target_model_id: str = ""
    output_dataset_id: str = ""
    created_seq: int = 0
    done_seq: int | None = None
    calibration_samples: int = 0  # quantize jobs: samples the calibration dataset held
    seeded: bool = False  # the client asked for the target model at creation
    created_at: float = field(default_factory=time.monotonic)


class _Blobs(MutableMapping[str, bytes]):
    """The service's dataset storage: in memory, or files under ``folder`` (the remote side's
    disk), so that a test measuring this process's memory measures the client's alone."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._memory: dict[str, bytes] = {}
        self._names: list[str] = []

    def __getitem__(self, key: str) -> bytes:
        if self.folder is None:
            return self._memory[key]
        if key not in self._names:
            raise KeyError(key)
        return (self.folder / key).read_bytes()

    def __setitem__(self, key: str, value: bytes) -> None:
        if self.folder is None:
            self._memory[key] = value
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / key).write_bytes(value)
        if key not in self._names:
            self._names.append(key)

    def __delitem__(self, key: str) -> None:
        if self.folder is None:
            del self._memory[key]
            return
        self._names.remove(key)
        (self.folder / key).unlink()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._memory) if self.folder is None else list(self._names))

    def __len__(self) -> int:
        return len(self._memory) if self.folder is None else len(self._names)


def without_backoff_sleeps(monkeypatch: Any) -> None:
    """The client's own retries run for real, without their back-off sleeps: the factor its
    per-call retries read (``BACKOFF_FACTOR``), and the waits of the retries it decorated at
    import (dataset and model uploads), which still call ``time.sleep``, with 0, so that a test
    recording the sleeps sees every retry."""
    import backoff._sync
    import qai_hub.util.session

    monkeypatch.setattr(qai_hub.util.session, "BACKOFF_FACTOR", 0)
    monkeypatch.setattr(backoff._sync, "time", SimpleNamespace(sleep=lambda _s: time.sleep(0)))


class FakeAIHub:
    """State and routes of the fake service; see the module docstring."""

    def __init__(
        self, token: str, steps: int = 3, noise: float = 1e-4, storage: Path | None = None
    ) -> None:
        self.token = token
        self.steps = steps  # status polls (GET jobs/<id>) a job takes before it finishes
        self.noise = noise  # relative error added to device outputs
        self.models: dict[str, FakeModel] = {}
        self.datasets: MutableMapping[str, bytes] = _Blobs(storage)
        self.dataset_names: dict[str, str] = {}
        self.jobs: dict[str, FakeJob] = {}
        self.shared: dict[str, list[str]] = {}
        self.expired: set[str] = set()  # dataset IDs past their 30 days
        self.requests: list[tuple[str, str]] = []  # (method, url) of every attempt, in order
        self.failed: list[tuple[str, str, str | int]] = []  # (method, url, failure) simulated
        self.hold = False  # keep every job running (simulates a slow queue)
        self.compile_failures: dict[str, str] = {}  # model name fragment -> failure reason
        self.inference_failures: dict[str, str] = {}  # job name fragment -> failure reason
        self.failing_jobs: dict[str, str] = {}  # job ID -> why it fails when it finishes
        self.profile_detail: Callable[[FakeJob], pb.ProfileDetail] = self._profile_detail
        self._errors: list[list[Any]] = []  # [match, times left, failure]
        self.rate_limited: dict[str, int] = {}  # job kind -> creations still answered 429
        self.lost_answers: dict[str, int] = {}  # job kind -> creations whose answer is dropped
        self.refused: list[str] = []  # why the service answered 400 / failed a compile
        self.model_downloads: list[str] = []  # model IDs whose file was downloaded
        self.dataset_limit_bytes = DATASET_LIMIT_BYTES
        self.model_limit_bytes = MODEL_LIMIT_BYTES
        self._uploads: dict[str, bytes] = {}
        self.s3_objects: dict[str, bytes] = {}  # uploads made with S3 credentials, by key
        self._parts: dict[str, dict[int, bytes]] = {}  # multipart uploads in progress
        self.offer_credentials = True  # answer S3 credentials to a client that asks for them
        # seconds a job of a kind (compile, quantize, profile, inference) takes at least
        self.durations: dict[str, float] = {}
        # seconds the answer to "<METHOD> <first route part>" (e.g. "POST models": creating a
        # model before its upload) takes: a slow service, for races between processes
        self.delays: dict[str, float] = {}
        self.credential_transfers: list[str] = []  # what went through S3 credentials
        self._seq = 0
        self._ids = 0

    # ------------------------------------------------------------------ test controls

    def install(self, monkeypatch: Any) -> None:
        """Route every HTTP request of this process through the fake, below urllib3's retries."""
        fake = self

        def answer(
            pool: Any, conn: Any, method: str, url: str, body: Any, headers: Any, timeout: Any
        ) -> _Answer:
            delay = fake.delay_for(method, url)
            if delay:  # (tests record the sleeps the client makes: none when there is none)
                time.sleep(delay)
            return fake.handle(pool, conn, method, url, body, headers or {}, timeout)

        def no_network(conn: Any, *args: Any, **kwargs: Any) -> None:
            raise AssertionError(f"a test opened a real connection to {conn.host}:{conn.port}")

        for name in _PROXY_VARIABLES:  # a proxy would be connected to before _make_request
            monkeypatch.delenv(name, raising=False)
            monkeypatch.delenv(name.lower(), raising=False)
        monkeypatch.setattr(HTTPConnectionPool, "_make_request", _transport(answer))
        monkeypatch.setattr(urllib3.connection.HTTPConnection, "connect", no_network)

    def fail_requests(
        self, match: Callable[[str, str], bool], times: int = 1, failure: str | int = "refused"
    ) -> None:
        """The next ``times`` requests for which ``match(method, path)`` holds fail with
        ``failure``: one of :data:`NETWORK_FAILURES`, or an HTTP status (503) to answer with."""
        assert failure in NETWORK_FAILURES or isinstance(failure, int), failure
        self._errors.append([match, times, failure])

    def count(self, method: str, pattern: str) -> int:
        """How many requests matched ``method`` and the URL path regex ``pattern``."""
        return sum(
            1 for m, url in self.requests if m == method and re.search(pattern, urlsplit(url).path)
        )

    def delay_for(self, method: str, url: str) -> float:
        """How long the answer to this request is held back (:attr:`delays`)."""
        path = urlsplit(url).path
        route = path[len("/api/v1/") :].strip("/").split("/")[0] if "/api/v1/" in path else ""
        return self.delays.get(f"{method} {route}", 0.0)

    def duplicate_jobs(self) -> int:
        """Jobs that compute what an earlier job computed: same kind, device, options, input
        specs, model (its uploaded bytes, or the job that made it) and data (the arrays)."""
        return len(self.jobs) - len({self._job_identity(j) for j in self.jobs.values()})

    def dataset_uploads(self) -> tuple[int, int]:
        """(datasets the client uploaded, distinct contents among them): the arrays they hold,
        not the bytes of their h5 files."""
        uploaded = [d for d in self.dataset_names if d in self.datasets]
        return len(uploaded), len({self._dataset_identity(d) for d in uploaded})

    def _dataset_identity(self, dataset_id: str) -> str:
        with h5py.File(io.BytesIO(self.datasets[dataset_id]), "r") as h5:
            entries = h5_to_dataset_entries(h5)
        h = hashlib.sha256()
        for name, arrays in entries.items():
            h.update(name.encode())
            for a in arrays:
                h.update(f"{a.dtype}{a.shape}".encode())
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def _model_identity(self, model_id: str) -> str:
        model = self.models[model_id]
        producer = self.jobs.get(model.producer_id)
        if producer is not None:
            return "made by " + self._job_identity(producer)
        return hashlib.sha256(model.data).hexdigest()

    def _job_identity(self, job: FakeJob) -> str:
        request = job.request
        parts = [job.kind, str(job.profiling), job.device, request.options]
        parts.append(self._model_identity(request.model.model_id))
        if job.kind == "compile":
            parts.append(request.tensor_type_list.SerializeToString().hex())
        elif job.kind == "quantize":
            parts.append(self._dataset_identity(request.calibration_dataset.dataset_id))
            parts.append(f"{request.weights_dtype}/{request.activations_dtype}")
        elif getattr(request, "dataset", None) is not None and request.dataset.dataset_id:
            parts.append(self._dataset_identity(request.dataset.dataset_id))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def jobs_of(self, kind: str, profiling: bool | None = None) -> list[FakeJob]:
        return [
            j
            for j in self.jobs.values()
            if j.kind == kind and (profiling is None or j.profiling == profiling)
        ]

    # ------------------------------------------------------------------ transport

    def _new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}{self._ids:05d}"

    def _network_error(
        self, failure: str, pool: HTTPConnectionPool, conn: Any, url: str, timeout: Any
    ) -> Exception:
        host = pool.host
        if failure == "dns":
            return u3.NameResolutionError(
                host, conn, socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            )
        if failure == "refused":
            return u3.NewConnectionError(
                conn, "Failed to establish a new connection: [Errno 111] Connection refused"
            )
        if failure == "connect_timeout":
            seconds = timeout.connect_timeout if isinstance(timeout, Timeout) else timeout
            seconds = seconds if isinstance(seconds, (int, float)) else MAX_HANG_S
            time.sleep(min(float(seconds), MAX_HANG_S))
            return u3.ConnectTimeoutError(
                conn, f"Connection to {host} timed out. (connect timeout={seconds})"
            )
        if failure == "read_timeout":
            return u3.ReadTimeoutError(pool, url, "Read timed out.")
        return u3.ProtocolError(
            "Connection aborted.",
            http.client.RemoteDisconnected("Remote end closed connection without response"),
        )

    def handle(
        self,
        pool: HTTPConnectionPool,
        conn: Any,
        method: str,
        url: str,
        body: Any,
        headers: Any,
        timeout: Any,
    ) -> _Answer:
        full = url if "://" in url else f"{pool.scheme}://{pool.host}{url}"
        self.requests.append((method, full))
        parts = urlsplit(full)
        for error in self._errors:
            match, times, failure = error
            if times > 0 and match(method, parts.path):
                error[1] -= 1
                self.failed.append((method, full, failure))
                if isinstance(failure, int):
                    return _Answer(failure, b"simulated failure", "text/plain")
                raise self._network_error(failure, pool, conn, url, timeout)
        data = _body_bytes(body)
        if parts.hostname == STORAGE:
            return self._storage(headers, method, parts.path, data)
        if (parts.hostname or "").endswith(S3_HOST_SUFFIX):
            return self._s3(parts.hostname or "", headers, method, parts.path, data, parts.query)
        if parts.hostname != API_HOST:
            raise AssertionError(f"unexpected host in {method} {full}")
        path = parts.path
        if method == "GET" and path in ("", "/"):  # the reachability probe: any answer will do
            return _Answer(200, b"<html>Qualcomm AI Hub</html>", "text/html")
        if headers.get("Authorization") != f"token {self.token}":
            return _Answer(401, b'{"detail": "Invalid token."}', "application/json")
        if not path.startswith("/api/v1/"):
            raise AssertionError(f"unexpected request {method} {full}")
        route = path[len("/api/v1/") :].strip("/").split("/")
        params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        handler = getattr(self, f"_{method.lower()}_{route[0]}", None)
        if handler is None:
            raise AssertionError(f"unexpected request {method} {full}")
        result = handler(route[1:], params, data)
        if isinstance(result, _Answer):
            return result
        status, message = result if isinstance(result, tuple) else (200, result)
        return _Answer(status, message.SerializeToString())

    # ------------------------------------------------------------------ S3-style transfers

    def _credentials(self, key: str, filename: str = "") -> pb.S3Credentials:
        """Short-lived single-object credentials, as AI Hub hands them to a client that asks
        (``supports_s3_credentials=true``, qai-hub >= 0.52): boto3 then talks to S3 itself."""
        expires = _now()
        expires.seconds += 3600
        return pb.S3Credentials(
            access_key_id="ASIAFAKEAIHUB0000000",
            secret_access_key="fake-secret-access-key",
            session_token="fake-session-token",
            expiration=expires,
            bucket=S3_BUCKET,
            key=key,
            region="us-west-2",
            use_transfer_acceleration=False,
            filename=filename,
        )

    def _s3(
        self, host: str, headers: Any, method: str, path: str, body: bytes, query: str = ""
    ) -> _Answer:
        """The S3 API calls boto3's transfer manager makes: PutObject, the multipart upload
        (Create / UploadPart / Complete / Abort) of a file over its threshold, HeadObject and
        GetObject with a byte range (virtual-hosted or path-style; aws-chunked bodies decoded)."""
        key = path.lstrip("/")
        if not host.startswith(f"{S3_BUCKET}."):
            bucket, _, key = key.partition("/")
            assert bucket == S3_BUCKET, (host, path)
        q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        if method in ("PUT", "POST") and "aws-chunked" in str(headers.get("Content-Encoding", "")):
            body = _aws_chunked(body)
        xml = "application/xml"
        if method == "POST" and "uploads" in q:  # CreateMultipartUpload
            upload_id = f"mpu-{len(self._parts) + 1}"
            self._parts[upload_id] = {}
            return _Answer(200, _xml("InitiateMultipartUploadResult", key, UploadId=upload_id), xml)
        if method == "PUT" and "uploadId" in q:  # UploadPart
            self._parts[q["uploadId"]][int(q["partNumber"])] = body
            return _Answer(200, b"", "text/plain", {"ETag": f'"part-{q["partNumber"]}"'})
        if method == "POST" and "uploadId" in q:  # CompleteMultipartUpload
            parts = self._parts.pop(q["uploadId"])
            body = b"".join(parts[n] for n in sorted(parts))
            method = "PUT"
            done = _xml("CompleteMultipartUploadResult", key, ETag=f'"etag-{len(body)}"')
        else:
            done = b""
        if method == "DELETE" and "uploadId" in q:  # AbortMultipartUpload
            self._parts.pop(q["uploadId"], None)
            return _Answer(204, b"", "text/plain")
        if method == "PUT":
            if len(body) > self.model_limit_bytes:
                return self._refuse(f"upload of {len(body)} bytes is over the limit", 413)
            self.s3_objects[key] = body
            return _Answer(
                200, done, xml if done else "text/plain", {"ETag": f'"etag-{len(body)}"'}
            )
        data = self._s3_object(key, count=method == "GET")
        if data is None:
            return _Answer(404, b"<Error><Code>NoSuchKey</Code></Error>", xml)
        if method == "HEAD":
            return _Answer(200, b"", "application/octet-stream", {"Content-Length": str(len(data))})
        assert method == "GET", (method, path)
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", str(headers.get("Range", "")))
        if ranged:
            a = int(ranged.group(1))
            b = int(ranged.group(2)) if ranged.group(2) else len(data) - 1
            content_range = {"Content-Range": f"bytes {a}-{b}/{len(data)}"}
            return _Answer(206, data[a : b + 1], "application/octet-stream", content_range)
        return _Answer(200, data, "application/octet-stream", {"ETag": f'"etag-{len(data)}"'})

    def _s3_object(self, key: str, count: bool) -> bytes | None:
        parts = key.split("/")
        if parts[0] == "models" and parts[-1] == "data":
            if count:
                self.model_downloads.append(parts[1])
            return self.models[parts[1]].data
        if parts[0] == "datasets" and parts[-1] == "data":
            return self.datasets[parts[1]]
        return self.s3_objects.get(key)

    def _storage(self, headers: Any, method: str, path: str, body: bytes) -> _Answer:
        if method == "PUT":  # a part of a multipart model upload
            if len(body) > self.model_limit_bytes:
                return self._refuse(f"model upload of {len(body)} bytes is over the limit", 413)
            self._uploads[path] = body
            return _Answer(200, b"", "text/plain", {"ETag": f'"etag-{len(body)}"'})
        if method == "POST":  # a form upload of a dataset
            decoder = MultipartDecoder(body, headers["content-type"])
            for part in decoder.parts:
                disposition = part.headers.get(b"Content-Disposition", b"").decode()
                if 'name="file"' in disposition:
                    if len(part.content) > self.dataset_limit_bytes:
                        return self._refuse(
                            f"dataset of {len(part.content)} bytes is over the 2 GB limit", 400
                        )
                    self.datasets[path.rsplit("/", 1)[-1]] = part.content
            return _Answer(204, b"", "text/plain")
        if method == "GET" and path.startswith("/models/"):
            self.model_downloads.append(path.strip("/").split("/")[1])
            return _Answer(200, self.models[path.strip("/").split("/")[1]].data, "application/zip")
        if method == "GET":
            dataset_id = path.strip("/").split("/")[1]
            return _Answer(200, self.datasets[dataset_id], "application/x-hdf5")
        raise AssertionError(f"unexpected storage request {method} {path}")

    def _refuse(self, reason: str, status: int) -> _Answer:
        self.refused.append(reason)
        body = json.dumps({"detail": reason}).encode()
        return _Answer(status, body, "application/json")

    # ------------------------------------------------------------------ devices

    def _get_devices(self, route: list[str], params: dict[str, str], body: bytes) -> Any:
        name = params.get("name", "")
        devices = pb.DeviceList()
        for device, os_type, os_version, chipset in DEVICE_FACTS:
            if not name or name == device:
                devices.devices.append(
                    pb.Device(
                        name=device,
                        os=os_version,
                        attributes=[
                            f"chipset:{chipset}",
                            "framework:qnn",
                            "framework:onnx",
                            "framework:tflite",
                            "os:android" if os_type == "Android" else "os:linux",
                        ],
                    )
                )
        devices.total_query_count = len(devices.devices)
        return devices

    # ------------------------------------------------------------------ models

    def _wants_credentials(self, params: dict[str, str]) -> bool:
        return self.offer_credentials and params.get("supports_s3_credentials") == "true"

    def _post_models(self, route: list[str], params: dict[str, str], body: bytes) -> Any:
        if not route:
            request = pb.Model()
            request.ParseFromString(body)
            model_id = self._new_id("m")
            self.models[model_id] = FakeModel(
                model_id, request.name, request.model_type, request.is_directory
            )
            return pb.CreateUpdateResponse(id=model_id, creation_time=_now())
        model_id, action = route[0], route[1]
        if action == "upload_complete":  # the credentials path: the object is in S3
            self.models[model_id].data = self.s3_objects.pop(f"models/{model_id}/upload")
            return pb.CreateUpdateResponse(id=model_id)
        assert action == "multipart_upload"
        complete = pb.FileMultipartUploadComplete()
        complete.ParseFromString(body)
        assert complete.upload_id == f"upload-{model_id}" and len(complete.etags) == 1
        self.models[model_id].data = self._uploads.pop(f"/models/{model_id}/part0")
        return pb.CreateUpdateResponse(id=model_id)

    def _get_models(self, route: list[str], params: dict[str, str], body: bytes) -> Any:
        model_id = route[0]
        if len(route) == 1:
            return self.models[model_id].pb()
        if route[1] == "download":  # Model.download: a URL to GET the model's file from
            model = self.models[model_id]
            assert model.data, f"model {model_id} has no file yet"
            suffix = _SUFFIXES.get(model.model_type, ".onnx")
            suffix = ".onnx.zip" if model.is_directory else suffix
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.name) + suffix
            if self._wants_credentials(params):
                self.credential_transfers.append(f"download model {model_id}")
                credentials = self._credentials(f"models/{model_id}/data", name)
                return pb.FileDownloadResponse(credentials=credentials)
            url = f"https://{STORAGE}/models/{model_id}/data"
            return pb.FileDownloadResponse(url=pb.FileDownloadURL(url=url, filename=name))
        assert route[1] == "multipart_upload"
        if self._wants_credentials(params):
            self.credential_transfers.append(f"upload model {model_id}")
            credentials = self._credentials(f"models/{model_id}/upload")
            return pb.FileUploadResponse(credentials=credentials)
        size = int(params["file_size"])
        return pb.FileUploadResponse(
            multipart_url=pb.FileMultipartUploadURL(
                urls=[f"https://{STORAGE}/models/{model_id}/part0"],
                upload_id=f"upload-{model_id}",
                max_part_size=max(size, 1),
            )
        )

    # ------------------------------------------------------------------ datasets

    def _post_datasets(self, route: list[str], params: dict[str, str], body: bytes) -> Any:
        if route and route[-1] == "upload_complete":
            return self._post_datasets_complete(route[0])
        request = pb.Dataset()
        request.ParseFromString(body)
        dataset_id = self._new_id("d")
        self.dataset_names[dataset_id] = request.name
        return pb.CreateUpdateResponse(
            id=dataset_id, creation_time=_now(), expiration_time=_later()
        )

    def _post_datasets_complete(self, dataset_id: str) -> Any:
        data = self.s3_objects.pop(f"datasets/{dataset_id}.h5")
        if len(data) > self.dataset_limit_bytes:
            return self._refuse(f"dataset of {len(data)} bytes is over the 2 GB limit", 400)
        self.datasets[dataset_id] = data
        return pb.CreateUpdateResponse(id=dataset_id)

    def _patch_datasets(self, route: list[str], params: dict[str, str], body: bytes) -> Any:
        assert route[0] in self.datasets, "dataset confirmed before its upload"
        return pb.CreateUpdateResponse(id=route[0])

    def _get_datasets(self, route: list[str], params: dict[str, str], body: bytes) -> Any:
        dataset_id = route[0]
        if len(route) == 1:
            return pb.Dataset(
                dataset_id=dataset_id,
                name=self.dataset_names.get(dataset_id, "outputs"),
                creation_time=_now(),
                expiration_time=_later(-1 if dataset_id in self.expired else 30),
            )
        if route[1] == "upload_url":
            if self._wants_credentials(params):
                self.credential_transfers.append(f"upload dataset {dataset_id}")
                credentials = self._credentials(f"datasets/{dataset_id}.h5")
                return pb.FileUploadResponse(credentials=credentials)
            return pb.FileUploadResponse(
                url=pb.FileUploadURL(
                    url=f"https://{STORAGE}/datasets/{dataset_id}",
                    file_field_name="file",
                    fields={"key": f"datasets/{dataset_id}.h5"},
                )
            )
        assert route[1] == "download_data"
        if self._wants_credentials(params):
            self.credential_transfers.append(f"download dataset {dataset_id}")
            credentials = self._credentials(f"datasets/{dataset_id}/data", f"{dataset_id}.h5")
            return pb.FileDownloadResponse(credentials=credentials)
        return pb.FileDownloadResponse(
            url=pb.FileDownloadURL(
                url=f"https://{STORAGE}/datasets/{dataset_id}/data", filename=f"{dataset_id}.h5"
            )
        )

    # ------------------------------------------------------------------ jobs

    def _post_jobs(self, route: list[str], params: dict[str, str], body: bytes) -> Any:
        request = pb.Job()
        request.ParseFromString(body)
        self._seq += 1
        which = request.WhichOneof("job")
        kind = {"compile_job": "compile", "quantize_job": "quantize"}.get(which, "inference")
        if self.rate_limited.get(kind, 0) > 0:
            self.rate_limited[kind] -= 1
            return _Answer(429, b'{"detail": "Too many requests"}', "application/json")
        problem = _option_problem(kind, getattr(request, which).options)
        if problem:
            return self._refuse(problem, 400)
        job_id = self._new_id("j")
        if which == "compile_job":
            job = FakeJob(
                job_id, "compile", request.compile_job, request.compile_job.devices.devices[0].name
            )
            # Like the service: with ?seed_target_model=true (qai-hub >= 0.53) the target model
            # is shown from the start, else once the job is done; the compiler fills it in.
            target = _options(request.compile_job.options).get("--target_runtime", "tflite")
            source = self.models[request.compile_job.model.model_id]
            job.target_model_id = self._new_id("m")
            self.models[job.target_model_id] = FakeModel(
                job.target_model_id,
                f"{source.name}.{target}",
                _TARGET_TYPES[target],
                producer_id=job_id,
            )
        elif which == "quantize_job":
            quantize = request.quantize_job
            source = self.models[quantize.model.model_id]
            job = FakeJob(job_id, "quantize", quantize, "")
            job.target_model_id = self._new_id("m")
            self.models[job.target_model_id] = FakeModel(
                job.target_model_id,
                f"{source.name}.quantized",
                pb.MODEL_TYPE_ONNX,
                producer_id=job_id,
            )
        elif which == "inference_job":
            inference = request.inference_job
            job = FakeJob(
                job_id,
                "inference",
                inference,
                inference.device.name,
                profiling=inference.is_profiling_on,
            )
        elif which == "profile_job":  # qai-hub < 0.56: submit_profile_job
            profile = request.profile_job
            job = FakeJob(job_id, "inference", profile, profile.device.name, profiling=True)
        else:
            raise AssertionError(f"unexpected job type {which}")
        job.created_seq = self._seq
        job.seeded = params.get("seed_target_model") == "true"
        self.jobs[job_id] = job
        if self.lost_answers.get(kind, 0) > 0:  # created, but the answer never arrives
            self.lost_answers[kind] -= 1
            raise u3.ProtocolError(
                "Connection aborted.",
                http.client.RemoteDisconnected("Remote end closed connection without response"),
            )
        return pb.CreateUpdateResponse(id=job_id, creation_time=_now())

    def _get_job_summaries(self, route: list[str], params: dict[str, str], body: bytes) -> Any:
        """The account's jobs, newest first (``Client.get_job_summaries``)."""
        kind = params.get("type")
        summaries = pb.JobSummaryList()
        for job in sorted(self.jobs.values(), key=lambda j: -j.created_seq):
            job_kind = "profile" if job.profiling else job.kind
            if kind and kind != job_kind:
                continue
            fields = dict(
                job_id=job.job_id,
                name=job.request.name,
                job_state=job.state,
                creation_time=_now(),
            )
            if job.kind == "quantize":
                summary = pb.JobSummary(quantize_job_summary=pb.QuantizeJobSummary(**fields))
            elif job.kind == "compile":
                summary = pb.JobSummary(compile_job_summary=pb.CompileJobSummary(**fields))
            else:
                summary = pb.JobSummary(inference_job_summary=pb.InferenceJobSummary(**fields))
            summaries.job_summaries.append(summary)
        limit = int(params.get("limit", 50))
        del summaries.job_summaries[limit:]
        summaries.total_query_count = len(summaries.job_summaries)
        return summaries

    def _patch_jobs(self, route: list[str], params: dict[str, str], body: bytes) -> Any:
        job_id, action = route[0], route[1]
        assert action == "shared_access"
        change = pb.SharedAccessChange()
        change.ParseFromString(body)
        self.shared.setdefault(job_id, []).extend(change.add_email)
        return pb.CreateUpdateResponse(id=job_id)

    def _get_jobs(self, route: list[str], params: dict[str, str], body: bytes) -> Any:
        job_id = route[0]
        if job_id not in self.jobs:
            return (404, pb.CreateUpdateResponse())
        job = self.jobs[job_id]
        if len(route) == 1:
            self._advance(job)
            return self._job_pb(job)
        assert route[1] == "result"
        if isinstance(job.request, pb.ProfileJob):  # a profile job of an older client
            profile = pb.ProfileJobResult(profile_job_id=job_id)
            if job.state == pb.JOB_STATE_DONE:
                profile.profile.CopyFrom(self.profile_detail(job))
            return pb.JobResult(profile_job_result=profile)
        detail = self.profile_detail(job) if job.profiling else None
        result = pb.InferenceJobResult(
            inference_job_id=job_id, output_dataset_id=job.output_dataset_id
        )
        if detail is not None:
            result.detail.CopyFrom(detail)
        return pb.JobResult(inference_job_result=result)

    def _advance(self, job: FakeJob) -> None:
        if job.state in (pb.JOB_STATE_DONE, pb.JOB_STATE_FAILED):
            return
        job.polls += 1
        running = (
            pb.JOB_STATE_QUANTIZING_MODEL
            if job.kind == "quantize"
            else pb.JOB_STATE_OPTIMIZING_MODEL
            if job.kind == "compile"
            else pb.JOB_STATE_MEASURING_PERFORMANCE
            if job.profiling
            else pb.JOB_STATE_RUNNING_INFERENCE
        )
        duration = self.durations.get("profile" if job.profiling else job.kind, 0.0)
        early = time.monotonic() - job.created_at < duration
        if self.hold or job.polls < self.steps or early:
            job.state = pb.JOB_STATE_CREATED if job.polls <= 1 else running
            return
        self._seq += 1
        job.done_seq = self._seq
        try:
            if job.job_id in self.failing_jobs:
                raise _JobFailure(self.failing_jobs[job.job_id])
            if job.kind == "compile":
                self._finish_compile(job)
            elif job.kind == "quantize":
                self._finish_quantize(job)
            else:
                self._finish_inference(job)
            job.state = pb.JOB_STATE_DONE
        except _JobFailure as failure:
            job.state = pb.JOB_STATE_FAILED
            job.failure = str(failure)

    def _job_fields(self, message: Any, job: FakeJob, id_field: str) -> Any:
        """The fields every job message carries: the request, ID, model, state, failure, time."""
        message.CopyFrom(job.request)
        setattr(message, id_field, job.job_id)
        message.model.CopyFrom(self.models[message.model.model_id].pb())
        message.job_state = job.state
        message.failure_reason = job.failure
        message.creation_time.CopyFrom(_now())
        return message

    def _job_pb(self, job: FakeJob) -> pb.Job:
        if job.kind == "quantize":
            quantize = self._job_fields(pb.QuantizeJob(), job, "quantize_job_id")
            quantize.calibration_dataset.creation_time.CopyFrom(_now())
            quantize.calibration_dataset.expiration_time.CopyFrom(_later())
            if job.seeded or job.state == pb.JOB_STATE_DONE:
                quantize.target_model.CopyFrom(self.models[job.target_model_id].pb())
            return pb.Job(quantize_job=quantize)
        if job.kind == "compile":
            compile_job = pb.CompileJob()
            compile_job.CopyFrom(job.request)
            source = self.models[compile_job.model.model_id]
            compile_job.model.CopyFrom(source.pb())
            compile_job.compile_job_id = job.job_id
            compile_job.job_state = job.state
            compile_job.failure_reason = job.failure
            compile_job.creation_time.CopyFrom(_now())
            compile_job.device.CopyFrom(pb.Device(name=job.device, os="14"))
            target = self.models[job.target_model_id]
            if job.seeded or job.state == pb.JOB_STATE_DONE:
                compile_job.target_model.CopyFrom(target.pb())
            if target.inputs:
                compile_job.target_tensor_type_list.CopyFrom(_tensor_list(target.inputs))
            return pb.Job(compile_job=compile_job)
        if isinstance(job.request, pb.ProfileJob):
            return pb.Job(profile_job=self._job_fields(pb.ProfileJob(), job, "profile_job_id"))
        inference = self._job_fields(pb.InferenceJob(), job, "inference_job_id")
        if inference.dataset.dataset_id:
            inference.dataset.creation_time.CopyFrom(_now())
            inference.dataset.expiration_time.CopyFrom(_later())
        return pb.Job(inference_job=inference)

    # ------------------------------------------------------------------ "device" work

    def _finish_compile(self, job: FakeJob) -> None:
        request: pb.CompileJob = job.request
        source = self.models[request.model.model_id]
        for fragment, reason in self.compile_failures.items():
            if fragment in source.name:
                raise _JobFailure(reason)
        graph = _load_onnx(source)
        options = _options(request.options)
        runtime = options.get("--target_runtime", "tflite")
        truncate = "--truncate_64bit_io" in options
        forced = set(filter(None, options.get("--force_channel_last_input", "").split(",")))
        out_names = [n for n in options.get("--output_names", "").split(",") if n]
        # --quantize_io: a quantized (QDQ) model's float I/O becomes the integer type of its
        # input / output encodings, with their scale and zero point; with --quantize_full_type
        # float16 the I/O is float16. Without it, I/O stays float32.
        quantize_io = "--quantize_io" in options
        float16 = options.get("--quantize_full_type") == "float16"
        version = options.get("--qairt_version", "default")
        version = {"default": QAIRT_DEFAULT, "latest": QAIRT_LATEST}.get(version, version)

        specs = {t.name: t for t in request.tensor_type_list.types}
        self._compiler_refusals(graph, runtime, truncate, specs)
        inputs, source_input, channel_last = [], None, False
        for value in graph.graph.input:
            dims = tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
            dtype = _DTYPES[value.type.tensor_type.elem_type]
            if value.name in specs:
                dims = tuple(specs[value.name].tensor_type.shape)
            source_input = (value.name, dims, dtype)
            if truncate and dtype == "int64":
                dtype = "int32"
            if value.name in forced and len(dims) >= 3:
                dims = (dims[0], *dims[2:], dims[1])
                channel_last = True
            inputs.append(self._io_tensor(source, graph, value.name, dims, dtype, "input", request))
        outputs = []
        for i, value in enumerate(graph.graph.output):
            dims = tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
            name = out_names[i] if i < len(out_names) else f"output_{i}"
            dtype = _DTYPES[value.type.tensor_type.elem_type]
            tensor = self._io_tensor(source, graph, value.name, dims, dtype, "output", request)
            outputs.append(tensor._replace(name=name))
        if not quantize_io:
            inputs = [t._replace(scale=None, zero_point=None) for t in inputs]
            outputs = [t._replace(scale=None, zero_point=None) for t in outputs]
        target = self.models[job.target_model_id]
        target.onnx_bytes = graph.SerializeToString()
        target.inputs = inputs
        target.outputs = outputs
        target.source_input = source_input
        target.channel_last = channel_last
        if runtime in QNN_TARGETS:
            target.qairt_version = QAIRT_VERSIONS[version]
        if runtime == "onnx":  # the target is itself an ONNX model
            target.data = _onnx_target(graph, truncate, out_names).SerializeToString()
        else:  # a stand-in for the .dlc / .bin: what was built, from what, how
            header = {"runtime": runtime, "options": request.options, "qairt": version}
            header |= {"float16": float16, "inputs": inputs, "outputs": outputs}
            target.data = b"FAKE-QAIRT " + json.dumps(header).encode() + b"\n" + target.onnx_bytes

    @staticmethod
    def _io_tensor(
        source: FakeModel,
        graph: onnx.ModelProto,
        name: str,
        dims: tuple[int, ...],
        dtype: str,
        kind: str,
        request: pb.CompileJob,
    ) -> Tensor:
        """One compiled input or output (scale / zero point kept only under --quantize_io)."""
        options = _options(request.options)
        if dtype != "float32" or "--quantize_io" not in options:
            return Tensor(name, dims, dtype)
        if options.get("--quantize_full_type") == "float16":
            return Tensor(name, dims, "float16")
        found = source.encodings.get(name) or _qdq_params(graph, name, kind)
        if found is None:  # a float model: --quantize_io has nothing to quantize
            return Tensor(name, dims, dtype)
        qdtype, scale, zero = found
        return Tensor(name, dims, qdtype, scale, zero)

    def _compiler_refusals(
        self, graph: onnx.ModelProto, runtime: str, truncate: bool, specs: dict[str, Any]
    ) -> None:
        """What the QAIRT compiler refuses on the HTP (the QNN targets): the ops of this fake's
        own REFUSED_OPS (Erf among them), 64-bit I/O without --truncate_64bit_io, unfixed
        dims."""

        def fail(reason: str) -> None:
            self.refused.append(reason)
            raise _JobFailure(reason)

        if runtime not in QNN_TARGETS:
            return
        for node in graph.graph.node:
            if node.op_type in REFUSED_OPS or node.domain not in ("", "ai.onnx"):
                fail(f"Failed to compile: op {node.op_type} ({node.name}) is not supported on HTP")
        for value in [*graph.graph.input, *graph.graph.output]:
            elem = value.type.tensor_type.elem_type
            if elem == onnx.TensorProto.INT64 and not truncate:
                fail(f"64-bit tensor {value.name} needs --truncate_64bit_io")
            fixed = value.name in specs
            if not fixed and any(d.dim_value <= 0 for d in value.type.tensor_type.shape.dim):
                fail(f"tensor {value.name} has a dynamic dimension; give input_specs")

    def _finish_quantize(self, job: FakeJob) -> None:
        request: pb.QuantizeJob = job.request
        if request.weights_dtype != pb.QUANTIZE_DTYPE_INT8 or request.activations_dtype not in (
            pb.QUANTIZE_DTYPE_INT8,
            pb.QUANTIZE_DTYPE_INT16,
        ):
            raise _JobFailure("weights must be INT8 and activations INT8 or INT16")
        graph = _load_onnx(self.models[request.model.model_id])
        data = self.datasets[request.calibration_dataset.dataset_id]
        with h5py.File(io.BytesIO(data), "r") as h5:
            entries = h5_to_dataset_entries(h5)
        for value in graph.graph.input:
            dims = tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
            dtype = _DTYPES[value.type.tensor_type.elem_type]
            samples = entries.get(value.name)
            if samples is None:
                raise _JobFailure(f"calibration data has no input {value.name!r}")
            for x in samples:
                if tuple(x.shape) != dims or str(x.dtype) != dtype:
                    raise _JobFailure(
                        f"calibration input {value.name} is {tuple(x.shape)} {x.dtype}, the "
                        f"model takes {dims} {dtype}"
                    )
            job.calibration_samples = len(samples)
        int16 = request.activations_dtype == pb.QUANTIZE_DTYPE_INT16
        target = self.models[job.target_model_id]
        target.data = _quantized_qdq(graph, entries, int16)
        target.encodings = _io_encodings(graph, entries, "uint16" if int16 else "uint8")

    def _finish_inference(self, job: FakeJob) -> None:
        request: pb.InferenceJob = job.request
        for fragment, reason in self.inference_failures.items():
            if fragment in request.name:
                raise _JobFailure(reason)
        if self._w8a16_on_qnn_dlc(request.model.model_id):
            # As a public Track 1 entry saw: compiled, then failed on the device at run time.
            self.refused.append("MODEL_GRAPH_ERROR")
            raise _JobFailure("MODEL_GRAPH_ERROR: the graph failed to execute on the device")
        if job.profiling:
            return
        model = self.models[request.model.model_id]
        with h5py.File(io.BytesIO(self.datasets[request.dataset.dataset_id]), "r") as h5:
            entries = h5_to_dataset_entries(h5)
        (spec,) = model.inputs
        out_spec = model.outputs[0]
        assert model.source_input is not None
        source_name, _, source_dtype = model.source_input
        samples = entries.get(spec.name)
        if samples is None:
            raise _JobFailure(f"dataset has no input {spec.name!r} (has {sorted(entries)})")
        session = ort.InferenceSession(model.onnx_bytes, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(len(samples))
        outputs = []
        for x in samples:
            if tuple(x.shape) != spec.shape or str(x.dtype) != spec.dtype:
                raise _JobFailure(
                    f"input {spec.name} is {tuple(x.shape)} {x.dtype}, the model takes "
                    f"{spec.shape} {spec.dtype}"
                )
            if spec.scale is not None:  # quantized I/O: the device reads the integer encoding
                x = (x.astype(np.float32) - np.float32(spec.zero_point)) * np.float32(spec.scale)
            if model.channel_last:
                x = np.moveaxis(x, -1, 1)
            y = session.run(None, {source_name: x.astype(source_dtype)})[0]
            scale = self.noise * (float(np.abs(y).max()) or 1.0)
            y = (y + rng.normal(0, scale, y.shape)).astype(y.dtype)
            if out_spec.scale is not None:
                info = np.iinfo(out_spec.dtype)
                q = np.rint(y / out_spec.scale) + out_spec.zero_point
                y = np.clip(q, info.min, info.max).astype(out_spec.dtype)
            elif out_spec.dtype == "float16":
                y = y.astype(np.float16)
            outputs.append(y)
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as h5:
            dataset_entries_to_h5({out_spec.name: outputs}, h5)
        dataset_id = self._new_id("d")
        self.datasets[dataset_id] = buffer.getvalue()
        job.output_dataset_id = dataset_id

    def _w8a16_on_qnn_dlc(self, model_id: str) -> bool:
        """A qnn_dlc model compiled from a quantize job with INT16 activations."""
        compiled = self.models[model_id]
        compile_job = self.jobs.get(compiled.producer_id)
        if compile_job is None or compile_job.kind != "compile":
            return False
        if _options(compile_job.request.options).get("--target_runtime") != "qnn_dlc":
            return False
        source = self.models[compile_job.request.model.model_id]
        quantize = self.jobs.get(source.producer_id)
        return (
            quantize is not None
            and quantize.kind == "quantize"
            and quantize.request.activations_dtype == pb.QUANTIZE_DTYPE_INT16
        )

    @staticmethod
    def _profile_detail(job: FakeJob) -> pb.ProfileDetail:
        detail = pb.ProfileDetail(
            major_version=1,
            minor_version=2,
            execution_time=5400,
            after_execution_peak_memory=185 * 1024 * 1024,
            all_execution_times=[5400, 5500, 5300],
        )
        detail.execution_memory.peak.lower = 0
        detail.execution_memory.peak.upper = 185 * 1024 * 1024
        detail.execution_memory.increase.upper = 1024
        for i in range(3):
            detail.layer_details.append(
                pb.LayerDetail(
                    name=f"layer_{i}",
                    layer_type_name="Conv",
                    compute_unit=pb.COMPUTE_UNIT_NPU,
                    execution_time=100,
                )
            )
        detail.layer_details.append(
            pb.LayerDetail(name="head", layer_type_name="Softmax", compute_unit=pb.COMPUTE_UNIT_CPU)
        )
        return detail


class _JobFailure(Exception):
    pass


def _transport(answer: Callable[..., _Answer]) -> Callable[..., HTTPResponse]:
    """``HTTPConnectionPool._make_request`` answering each request with ``answer(pool, conn,
    method, url, body, headers, timeout)``, as a urllib3 response off the socket would."""

    def make_request(
        pool: HTTPConnectionPool,
        conn: Any,
        method: str,
        url: str,
        body: Any = None,
        headers: Any = None,
        retries: Any = None,
        timeout: Any = None,
        chunked: bool = False,
        response_conn: Any = None,
        preload_content: bool = True,
        decode_content: bool = True,
        enforce_content_length: bool = True,
    ) -> HTTPResponse:
        got = answer(pool, conn, method, url, body, headers, timeout)
        return HTTPResponse(
            body=io.BytesIO(got.content),
            headers=HTTPHeaderDict(
                {
                    "Content-Type": got.content_type,
                    "Content-Length": str(len(got.content)),
                    **got.headers,
                }
            ),
            status=got.status,
            version=11,
            version_string="HTTP/1.1",
            reason=http.HTTPStatus(got.status).phrase,
            preload_content=preload_content,
            decode_content=decode_content,
            pool=pool,
            connection=response_conn,
            retries=retries,
            enforce_content_length=enforce_content_length,
            request_method=method,
            request_url=url,
        )

    return make_request


# --------------------------------------------------------------------------- other processes

_AUTHKEY = b"lpcvlab-fake-aihub"
ENV = "LPCVLAB_TEST_FAKE_AIHUB"  # the socket a process started by a test connects to


class FakeServer:
    """One fake service for the processes a test starts: requests arrive over a Unix socket
    (``address``), are answered one at a time by ``fake``, and go back. ``close()`` stops it."""

    def __init__(self, fake: FakeAIHub, folder: Path) -> None:
        self.fake = fake
        self.address = str(Path(folder) / "fake-aihub.sock")
        self._listener = Listener(self.address, family="AF_UNIX", authkey=_AUTHKEY)
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Any) -> None:
        with conn:
            while True:
                try:
                    scheme, host, port, method, url, body, headers = conn.recv()
                except (EOFError, OSError):
                    return
                pool = SimpleNamespace(scheme=scheme, host=host, port=port)
                delay = self.fake.delay_for(method, url)
                if delay:
                    time.sleep(delay)  # outside the lock: other processes meanwhile go on
                try:
                    with self._lock:
                        answer = self.fake.handle(
                            pool, None, method, url, body, HTTPHeaderDict(headers), None
                        )
                    reply: tuple[Any, ...] = ("ok", tuple(answer))
                except AssertionError as exc:
                    reply = ("assert", str(exc))
                except Exception as exc:  # noqa: BLE001 - a dropped answer, told as such
                    reply = ("dropped", f"{type(exc).__name__}: {exc}")
                try:
                    conn.send(reply)
                except OSError:
                    return

    def close(self) -> None:
        self._listener.close()
        Path(self.address).unlink(missing_ok=True)


def _text(value: Any) -> str:
    """A header name or value as text (botocore sends some as bytes)."""
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def connect(address: str) -> None:
    """Send every HTTP request of this process to the :class:`FakeServer` at ``address``
    (below urllib3's retries, as :meth:`FakeAIHub.install` does in-process)."""
    channel = Client(address, family="AF_UNIX", authkey=_AUTHKEY)
    lock = threading.Lock()  # boto3 transfers send from several threads

    def answer(
        pool: Any, conn: Any, method: str, url: str, body: Any, headers: Any, timeout: Any
    ) -> _Answer:
        request = (
            pool.scheme,
            pool.host,
            pool.port,
            method,
            url,
            _body_bytes(body),
            [(_text(k), _text(v)) for k, v in (headers or {}).items()],
        )
        with lock:
            channel.send(request)
            how, what = channel.recv()
        if how == "assert":
            raise AssertionError(what)
        if how == "dropped":
            raise u3.ProtocolError("Connection aborted.", http.client.RemoteDisconnected(what))
        return _Answer(*what)

    def no_network(conn: Any, *args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a test opened a real connection to {conn.host}:{conn.port}")

    for name in _PROXY_VARIABLES:
        os.environ.pop(name, None)
        os.environ.pop(name.lower(), None)
    HTTPConnectionPool._make_request = _transport(answer)  # type: ignore[method-assign]
    urllib3.connection.HTTPConnection.connect = no_network  # type: ignore[method-assign]


def _onnx_target(graph: onnx.ModelProto, truncate: bool, out_names: list[str]) -> onnx.ModelProto:
    """What an ONNX-target compile makes of a graph: 64-bit inputs become int32 (cast back
    inside) under --truncate_64bit_io, outputs renamed by --output_names."""
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    g = model.graph
    casts = []
    for value in g.input:
        if truncate and value.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            inner = f"{value.name}__int64"
            for node in g.node:
                node.input[:] = [inner if i == value.name else i for i in node.input]
            casts.append(
                onnx.helper.make_node("Cast", [value.name], [inner], to=onnx.TensorProto.INT64)
            )
            value.type.tensor_type.elem_type = onnx.TensorProto.INT32
    if casts:
        nodes = [*casts, *g.node]
        del g.node[:]
        g.node.extend(nodes)
    for value, name in zip(g.output, out_names, strict=False):
        old = value.name
        for node in g.node:
            node.output[:] = [name if o == old else o for o in node.output]
        value.name = name
    return model


def _quantized_qdq(
    graph: onnx.ModelProto, entries: dict[str, list[np.ndarray]], int16: bool
) -> bytes:
    """What a quantize job makes: a QDQ ONNX model (QuantizeLinear / DequantizeLinear around
    int8 weights and int8 or int16 activations), calibrated with min-max on ``entries`` by
    ONNX Runtime's static quantization; its outputs differ a little from the source's."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            names = list(entries)
            self._rows = iter(
                [{n: entries[n][i] for n in names} for i in range(len(entries[names[0]]))]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._rows, None)

    with tempfile.TemporaryDirectory(prefix="fake-aihub-quantize-") as tmp:
        src, dst = Path(tmp) / "source.onnx", Path(tmp) / "quantized.onnx"
        onnx.save_model(graph, str(src))
        quantize_static(
            str(src),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QInt16 if int16 else QuantType.QUInt8,
            extra_options={"ActivationSymmetric": int16},
        )
        return dst.read_bytes()


_SUFFIXES = {
    pb.MODEL_TYPE_QNN_DLC: ".dlc",
    pb.MODEL_TYPE_QNN_CONTEXT_BINARY: ".bin",
    pb.MODEL_TYPE_TFLITE: ".tflite",
    pb.MODEL_TYPE_ONNX: ".onnx",
}


def _xml(root: str, key: str, **fields: str) -> bytes:
    """An S3 XML answer (``<root><Bucket/><Key/>...fields</root>``)."""
    inner = f"<Bucket>{S3_BUCKET}</Bucket><Key>{key}</Key>"
    inner += "".join(f"<{k}>{v}</{k}>" for k, v in fields.items())
    ns = "http://s3.amazonaws.com/doc/2006-03-01/"
    return f'<?xml version="1.0" encoding="UTF-8"?><{root} xmlns="{ns}">{inner}</{root}>'.encode()


def _aws_chunked(body: bytes) -> bytes:
    """The payload of an ``aws-chunked`` body (``<hex size>[;...]\r\n<data>\r\n`` ... ``0``
    then trailers), as botocore sends an upload with a trailing checksum."""
    out, rest = bytearray(), body
    while rest:
        line, _, rest = rest.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2 :]
    return bytes(out)


def _io_encodings(
    graph: onnx.ModelProto, entries: dict[str, list[np.ndarray]], dtype: str
) -> dict[str, tuple[str, float, int]]:
    """Asymmetric min-max encodings (range widened to hold 0) of the graph's float inputs and
    outputs over the calibration samples, as a quantizer calibrates them."""
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    values: dict[str, list[np.ndarray]] = {n: list(entries[n]) for n in names}
    for i in range(len(entries[names[0]])):
        outs = session.run(None, {n: entries[n][i] for n in names})
        for out, array in zip(session.get_outputs(), outs, strict=True):
            values.setdefault(out.name, []).append(array)
    top = float(np.iinfo(dtype).max)
    encodings = {}
    for name, arrays in values.items():
        if not np.issubdtype(arrays[0].dtype, np.floating):
            continue  # token IDs stay integers
        lo = min(0.0, min(float(a.min()) for a in arrays))
        hi = max(0.0, max(float(a.max()) for a in arrays))
        scale = (hi - lo) / top or 1.0
        encodings[name] = (dtype, scale, int(round(-lo / scale)))
    return encodings


def _qdq_params(graph: onnx.ModelProto, name: str, kind: str) -> tuple[str, float, int] | None:
    """(integer dtype, scale, zero point) of the QuantizeLinear that takes graph input ``name``
    (``kind="input"``) or the DequantizeLinear that gives graph output ``name``: what the
    compiler makes of a QDQ model's I/O under --quantize_io. None when there is none."""
    inits = {i.name: i for i in graph.graph.initializer}
    for node in graph.graph.node:
        hit = (kind == "input" and node.op_type == "QuantizeLinear" and node.input[0] == name) or (
            kind == "output" and node.op_type == "DequantizeLinear" and node.output[0] == name
        )
        if hit and len(node.input) >= 3 and node.input[1] in inits and node.input[2] in inits:
            scale = float(numpy_helper.to_array(inits[node.input[1]]).reshape(-1)[0])
            zero = numpy_helper.to_array(inits[node.input[2]])
            return str(zero.dtype), scale, int(zero.reshape(-1)[0])
    return None


def _load_onnx(model: FakeModel) -> onnx.ModelProto:
    """The uploaded source model, external data folded in (as the compiler would see it)."""
    if not model.is_directory:
        return onnx.load_from_string(model.data)
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(io.BytesIO(model.data)) as archive:
            names = archive.namelist()
            archive.extractall(tmp)
        (graph_name,) = [n for n in names if n.endswith(".onnx") and not n.endswith("/")]
        assert graph_name.split("/")[0].endswith(".onnx"), names
        return onnx.load(str(Path(tmp) / graph_name))


def ledger_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSON-lines ledger, parsed."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
