"""Qualcomm AI Hub through the ``qai-hub`` client (``hub=aihub``): compile, profile and run on
real devices.

The package, by job:

- :mod:`~lpcvlab.hubs.aihub.settings` -- what the ``hub`` settings turn into: job options,
  channel-last layouts, samples per uploaded dataset;
- :mod:`~lpcvlab.hubs.aihub.client` -- credentials, token redaction, one-line errors, the
  reachability/token/device preflight, device listing (network retries are the client's own);
- :mod:`~lpcvlab.hubs.aihub.jobs` -- the job ledger (what was paid for) and the job driver
  (submit, reuse, resume, poll, report failures);
- :mod:`~lpcvlab.hubs.aihub.stages` -- compile, profile and inference of one component;
- here, :class:`AIHub`: the :class:`~lpcvlab.hubs.base.Hub` protocol on top of them.

Every job goes into the ledger keyed by the content hash of its inputs, device and options, so
an identical rerun reuses finished jobs and an interrupted run picks up its in-flight jobs
instead of paying again (``hub.reuse=false`` forces new jobs); a key is claimed while its job is
submitted, so two processes needing the same job at once pay for one. Datasets are uploaded once
per content and device outputs kept in the cache. :meth:`AIHub.start_components` returns what is
in flight without waiting (a sweep waits on all its configs' jobs together);
:meth:`AIHub.run_components` waits. The API token is never logged, stored or returned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import qai_hub
from omegaconf import MISSING

from lpcvlab.config.schema import AIHubConfig, DeviceConfig, RuntimeConfig
from lpcvlab.errors import ConfigError, RuntimeStageError
from lpcvlab.hubs.aihub import client as _client
from lpcvlab.hubs.aihub.client import Redactor, make_client
from lpcvlab.hubs.aihub.jobs import DatasetRecords, Drive, JobDriver, JobLedger
from lpcvlab.hubs.aihub.settings import checked_settings
from lpcvlab.hubs.aihub.stages import ComponentState, HubTarget, Stages, check_inputs
from lpcvlab.hubs.base import (
    COMPILE,
    INFERENCE,
    PROFILE,
    CompiledCheck,
    ComponentJob,
    GraphCheck,
    InFlight,
    JobListener,
    wait,
)
from lpcvlab.types import (
    CompileResult,
    ComponentRun,
    ExportResult,
    InferenceResult,
    JobEvent,
    ProfileResult,
)

__all__ = ["DATASETS_NAME", "LEDGER_NAME", "AIHub", "HubTarget"]

LEDGER_NAME = "aihub_ledger.jsonl"
DATASETS_NAME = "aihub_datasets.jsonl"  # beside the ledger: uploaded datasets by content
# Settings that change how lpcvlab waits, records or shares, never what a job computes.
_OPERATIONAL = ("poll_interval_s", "connect_timeout_s", "ledger_path", "reuse", "share_with")


class AIHub:
    """The :class:`~lpcvlab.hubs.base.Hub` protocol on Qualcomm AI Hub.

    Building one reads the credentials (a ConfigError when there is no token) but sends nothing;
    :meth:`preflight` is the first request. ``client`` replaces the one built from the
    credentials (tests, or an account set up in code).
    """

    name = "aihub"
    # The ledger is the one record of paid AI Hub jobs: the stage cache leaves these stages to it.
    records_jobs = True

    def __init__(
        self,
        settings: AIHubConfig,
        device: DeviceConfig,
        runtime: RuntimeConfig,
        *,
        track: str,
        cache_dir: str | Path,
        client: qai_hub.Client | None = None,
    ) -> None:
        self.settings = checked_settings(settings)
        if not device.aihub_name:
            raise ConfigError(
                f"device={device.name} has no AI Hub device (device.aihub_name is empty); pick an "
                "AI Hub device (device=xr2_gen2_proxy, device=dragonwing_iq9075_evk, "
                "device=galaxy_s25) or use hub=local"
            )
        if not runtime.target_runtime or runtime.target_runtime == MISSING:
            raise ConfigError(
                f"runtime={runtime.name} has no runtime.target_runtime; pick runtime=qnn_dlc "
                "(Track 1) or runtime=qnn_context_binary (Track 2)"
            )
        self.device = str(device.aihub_name)
        self.device_config = device
        self.runtime = runtime
        self.target_runtime = str(runtime.target_runtime)
        self.track = track
        self.channel_last_inputs = frozenset(settings.channel_last_inputs)
        ledger_path = Path(settings.ledger_path or Path(cache_dir) / LEDGER_NAME)
        self.ledger = JobLedger(ledger_path)
        self.datasets = DatasetRecords(ledger_path.with_name(DATASETS_NAME))
        self.client = client if client is not None else make_client()
        self._redact = Redactor(self.client.config.api_token)
        self.job_listener: JobListener | None = None
        self._device_checked = False
        self._driver = JobDriver(
            self.client,
            self.ledger,
            self.device,
            reuse=settings.reuse,
            poll_interval_s=settings.poll_interval_s,
            redact=self._redact,
            emit=self._emit,
            before_submit=self._ensure_device,
        )
        self._stages = Stages(
            self.client,
            self._driver,
            settings,
            device=self.device,
            target_runtime=self.target_runtime,
            runtime_options=runtime.compile_options or "",
            channel_last_inputs=self.channel_last_inputs,
            track=track,
            fp16_options=runtime.fp16_options or "",
            models_dir=Path(cache_dir) / "aihub_models",
            outputs_dir=Path(cache_dir) / "aihub_outputs",
            datasets=self.datasets,
            redact=self._redact,
            emit=self._emit,
        )

    @property
    def graph_check(self) -> GraphCheck | None:
        """Sees each graph made (fp16) or downloaded (quantize job) here, before its compile."""
        return self._stages.graph_check

    @graph_check.setter
    def graph_check(self, check: GraphCheck | None) -> None:
        self._stages.graph_check = check

    @property
    def compiled_check(self) -> CompiledCheck | None:
        """Sees each compiled model's I/O (its TensorSpecs) before its profile and inference."""
        return self._stages.compiled_check

    @compiled_check.setter
    def compiled_check(self, check: CompiledCheck | None) -> None:
        self._stages.compiled_check = check

    # ------------------------------------------------------------------ protocol

    def preflight(self) -> None:
        """AI Hub answers within ``hub.connect_timeout_s`` (one line naming the host and what to
        check otherwise), accepts the token, and knows the device."""
        _client.preflight(
            self.client, self.device, float(self.settings.connect_timeout_s), self._redact
        )
        self._device_checked = True

    def identity(self) -> dict[str, Any]:
        """What determines this hub's results: the settings that reach a job, the device, the
        runtime, the AI Hub deployment and the client's version (never the token)."""
        hub = dataclasses.asdict(self.settings)
        for key in _OPERATIONAL:
            hub.pop(key, None)
        return {
            "hub": hub,
            "device": dataclasses.asdict(self.device_config),
            "runtime": dataclasses.asdict(self.runtime),
            "api_url": self.client.config.api_url,
            "qai_hub": str(qai_hub.__version__),
        }

    def run_components(self, jobs: list[ComponentJob]) -> dict[str, ComponentRun]:
        """:meth:`start_components`, waited on here. A stage not asked for comes back as None."""
        inflight = self.start_components(jobs)
        wait(inflight)
        return inflight.result()

    def start_components(self, jobs: list[ComponentJob]) -> InFlight:
        """Every compile job (a quantized component's quantize job) goes up now, and what is in
        flight comes back without waiting: as each job finishes (:meth:`_InFlight.poll`), the
        jobs that follow it go up at once (compile after quantize; the profile and inference
        jobs its component asked for after compile)."""
        states = [
            ComponentState(j.exported, inputs=j.inputs, wanted=j.stages, precision=j.precision)
            for j in jobs
        ]
        names = [s.component for s in states]
        if len(set(names)) != len(names):
            raise RuntimeStageError(f"component names must be unique, got {names}")
        for s in states:
            if INFERENCE in s.wanted:
                check_inputs(s.exported, s.inputs)
        first = [
            self._stages.start_quantize(s)
            if s.precision.quantized
            else self._stages.start_compile(s)
            for s in states
        ]
        return _InFlight(self, states, Drive(self._driver, first))

    # ------------------------------------------------------------------ one stage at a time

    def compile(self, exported: ExportResult) -> CompileResult:
        state = ComponentState(exported, wanted=frozenset({COMPILE}))
        self._driver.drive([self._stages.start_compile(state)])
        assert state.compiled is not None
        return state.compiled

    def profile(self, compiled: CompileResult) -> ProfileResult:
        state = ComponentState(compiled.exported, compiled=compiled)
        self._driver.drive([self._stages.start_profile(state)])
        assert state.profile is not None
        return state.profile

    def infer(self, compiled: CompileResult, inputs: np.ndarray) -> InferenceResult:
        state = ComponentState(compiled.exported, inputs=inputs, compiled=compiled)
        self._driver.drive(self._stages.start_inference(state))
        return self._stages.finish_inference(state)

    def list_devices(self, attributes: Sequence[str] = ()) -> list[str]:
        """Device names this account sees."""
        return _client.list_devices(self.client, attributes, self._redact)

    # ------------------------------------------------------------------ plumbing

    def _emit(self, component: str, kind: str, job_id: str, url: str | None, status: str) -> None:
        if self.job_listener is not None:
            self.job_listener(JobEvent(component, kind, job_id, url, self._redact(status)))

    def _ensure_device(self) -> None:
        """Before the first paid job: the account can target the device (once per hub)."""
        if not self._device_checked:
            _client.check_device(self.client, self.device, self._redact)
            self._device_checked = True


class _InFlight:
    """The components of one :meth:`AIHub.start_components` call on their way through AI Hub."""

    def __init__(self, hub: AIHub, states: list[ComponentState], drive: Drive) -> None:
        self._hub = hub
        self._states = states
        self._drive = drive
        self.interval_s = float(hub.settings.poll_interval_s)

    def poll(self) -> bool:
        return self._drive.step()

    def stop(self) -> None:
        self._drive.stop()

    def result(self) -> dict[str, ComponentRun]:
        if not self._drive.done:
            raise RuntimeStageError("AI Hub jobs are still running; poll() until it is done")
        runs: dict[str, ComponentRun] = {}
        for s in self._states:
            assert s.compiled is not None
            wanted = s.wanted
            inference = self._hub._stages.finish_inference(s) if INFERENCE in wanted else None
            profile = s.profile if PROFILE in wanted else None
            runs[s.component] = ComponentRun(s.compiled, profile, inference, s.quantized)
        return runs
