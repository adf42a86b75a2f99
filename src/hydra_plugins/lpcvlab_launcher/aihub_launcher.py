"""The launcher of sweeps on AI Hub (``hydra/launcher=aihub``; the default of ``python run.py -m``
with ``hub=aihub``): the device waiting of all the sweep's configs overlaps, the local work does
not. (A Hydra plugin: Hydra instantiates launchers from the ``hydra_plugins`` namespace only.)

Hydra's basic launcher runs one config after another, each to its end: on AI Hub a sweep then
waits on the service once per config (compile, profile and inference of one config, then of the
next). This launcher runs the same jobs in one process, through Hydra's own ``run_job`` (output
folders, ``.hydra/`` files, the job log and the sweep callbacks are Hydra's):

1. one config at a time, each job does its local work -- data, model, export, quantization,
   uploads, the submission of its AI Hub jobs -- and, at its device wait, returns a
   :class:`~lpcvlab.app.DeferredJob` instead of waiting (``lpcvlab.app.deferring_waits``), its
   MLflow child run open. Exports never run side by side: the machine's cores go to one config
   at a time, as with the basic launcher;
2. once every config of the batch has submitted its jobs, they are all polled together (one
   progress line per AI Hub job; between two configs' local work they get one look too, so a
   compile that finished early has its profile and inference jobs submitted without waiting for
   the last export); as soon as one config's jobs are all done, its run is finished
   (metrics, evaluation, artifacts, MLflow) inside that job's Hydra context (``HydraConfig``, its
   log file, its working folder) and Hydra's ``on_job_end`` callbacks see its result. A failed
   AI Hub job fails its own config only (its run FAILED, the error in the sweep's summary).

Each job's :class:`~hydra.core.utils.JobReturn` carries its objective, so Optuna's sampler is told
every trial's value (the Optuna sweeper launches a batch of ``hydra.sweeper.n_jobs`` trials at a
time; Hydra's basic sweeper gives the whole sweep as one batch). A job with nothing to wait for
(``hub=local``) runs to its end at once, as under the basic launcher.

Ctrl-C or SIGTERM stops the job running then and throws the interrupt into every job still at its
wait: each run ends KILLED (its AI Hub jobs stay in the ledger, so the same command picks them up
instead of paying again) and ``lpcvlab.app.hydra_entry`` ends the sweep.

Memory: each waiting job holds its data, its exports' paths and its MLflow run until its jobs are
done (the model is released after export), so a sweep of N configs holds N evaluation datasets at
its peak.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    env_override,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from lpcvlab.app import DeferredJob, deferring_waits, ignore_further_signals  # light: no MLflow

log = logging.getLogger(__name__)


class _Waiting:
    """A job at its device wait: its place in the batch, its config, its return so far, and the
    log handlers Hydra gave it (its log file). (No dataclass: Hydra loads plugin modules without
    registering them in ``sys.modules``.)"""

    def __init__(self, index: int, config: DictConfig, ret: JobReturn, job: DeferredJob) -> None:
        self.index = index
        self.config = config
        self.ret = ret
        self.job = job
        self.handlers = list(logging.getLogger().handlers)


class _HoldDeferredEnds:
    """Hydra's callbacks, except that ``on_job_end`` of a job that returned a DeferredJob waits
    until the job has really ended (the launcher calls it then)."""

    def __init__(self, callbacks: Any) -> None:
        self._callbacks = callbacks

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if _deferred(job_return) is None:
            self._callbacks.on_job_end(config=config, job_return=job_return, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._callbacks, name)


def _deferred(ret: JobReturn) -> DeferredJob | None:
    if ret.status == JobStatus.COMPLETED and isinstance(ret._return_value, DeferredJob):
        return ret._return_value
    return None


class AIHubLauncher(Launcher):
    """Runs a batch of jobs in this process, their local work one at a time and their device
    waits together; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        assert self.task_function is not None
        self._sweep_logging()
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(
            "Launching %d jobs locally: local work one at a time, AI Hub jobs waited on together",
            len(job_overrides),
        )
        held = HydraContext(
            config_loader=self.hydra_context.config_loader,
            callbacks=_HoldDeferredEnds(self.hydra_context.callbacks),  # type: ignore[arg-type]
        )
        returns: list[JobReturn | None] = [None] * len(job_overrides)
        waiting: list[_Waiting] = []
        try:
            for i, overrides in enumerate(job_overrides):
                idx = initial_job_idx + i
                log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
                config = self.hydra_context.config_loader.load_sweep_config(
                    self.config, list(overrides)
                )
                with open_dict(config):
                    config.hydra.job.id = idx
                    config.hydra.job.num = idx
                with deferring_waits():
                    ret = run_job(
                        hydra_context=held,
                        task_function=self.task_function,
                        config=config,
                        job_dir_key="hydra.sweep.dir",
                        job_subdir_key="hydra.sweep.subdir",
                    )
                job = _deferred(ret)
                if job is None:
                    returns[i] = ret
                else:  # (before the sweep's logging is set up again: its handlers are the job's)
                    waiting.append(_Waiting(i, config, ret, job))
                self._sweep_logging()
                # Between two configs' local work, one look at the jobs in flight: follow-up
                # jobs (profile and inference after a compile) go up, finished configs finish.
                self._poll_round(waiting, returns)
            if waiting:
                log.info(
                    "Waiting on the AI Hub jobs of %d config(s) together: %s",
                    len(waiting),
                    ", ".join(f"#{w.config.hydra.job.num}" for w in waiting),
                )
            self._wait(waiting, returns)
        except BaseException as exc:
            if waiting:
                self._stop(waiting, exc)
            raise
        assert all(r is not None for r in returns)
        return [r for r in returns if r is not None]

    def _wait(self, waiting: list[_Waiting], returns: list[JobReturn | None]) -> None:
        """Poll every waiting job once a round until none is left."""
        while waiting:
            if not self._poll_round(waiting, returns) and waiting:
                time.sleep(min(w.job.interval_s for w in waiting))

    def _poll_round(self, waiting: list[_Waiting], returns: list[JobReturn | None]) -> bool:
        """One look at every waiting job; each whose jobs are done is finished (and leaves
        ``waiting``). True when one finished."""
        finished = False
        for w in list(waiting):
            with self._job_context(w):
                try:
                    ready, error = w.job.poll(), None
                except Exception as exc:  # noqa: BLE001 - a failed AI Hub job: its run fails
                    ready, error = True, exc
                if ready and self._resume(w, error):
                    waiting.remove(w)
                    returns[w.index] = w.ret
                    finished = True
        return finished

    def _resume(self, w: _Waiting, error: BaseException | None) -> bool:
        """Finish ``w``'s run (or fail it with ``error``) and tell Hydra's callbacks; False when
        the job stopped at another wait."""
        assert self.hydra_context is not None
        try:
            value = w.job.resume(error)
        except Exception as exc:  # noqa: BLE001 - as Hydra's run_job records a job's exception
            w.ret.return_value = exc
            w.ret.status = JobStatus.FAILED
        else:
            if value is w.job:
                return False
            w.ret.return_value = value
            w.ret.status = JobStatus.COMPLETED
        self.hydra_context.callbacks.on_job_end(config=w.config, job_return=w.ret)
        return True

    def _stop(self, waiting: list[_Waiting], exc: BaseException) -> None:
        """The sweep is stopping (Ctrl-C, SIGTERM, or an error of its own): every job still at
        its wait gets the same exception thrown in, so its run ends KILLED (FAILED) with what it
        had and its AI Hub jobs are named as still running."""
        if isinstance(exc, KeyboardInterrupt):
            ignore_further_signals()
        for w in waiting:
            with self._job_context(w):
                try:
                    w.job.resume(exc)
                except BaseException as raised:  # noqa: BLE001 - expected: the run re-raises
                    if raised is not exc and not isinstance(raised, KeyboardInterrupt):
                        log.error("job #%s: %s", w.config.hydra.job.num, raised)

    @contextmanager
    def _job_context(self, w: _Waiting) -> Iterator[None]:
        """What Hydra's run_job set up for a job, set up again: its HydraConfig, its log
        handlers (its log file, appended to), its environment and working folder. The handlers
        are swapped, not configured anew: a poll round must not rebuild logging for every job
        (and an interrupt must never land in the middle of that)."""
        config = w.config
        root = logging.getLogger()
        before, sweep_handlers = HydraConfig.instance().cfg, root.handlers
        cwd = os.getcwd()
        HydraConfig.instance().set_config(config)
        root.handlers = w.handlers
        try:
            with env_override(config.hydra.job.env_set):
                if config.hydra.job.chdir:
                    os.chdir(str(config.hydra.runtime.output_dir))
                yield
        finally:
            for handler in w.handlers:
                handler.flush()
            root.handlers = sweep_handlers
            os.chdir(cwd)
            HydraConfig.instance().cfg = before  # type: ignore[assignment]

    def _sweep_logging(self) -> None:
        assert self.config is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
