"""What ``run.py`` does around a Hydra job: check the config first, run the pipeline, and turn
user errors and interrupts into short messages instead of tracebacks.

A job is the pipeline as a generator (:func:`lpcvlab.pipeline.run_steps`) that stops at its
device wait. Alone, or under Hydra's basic / joblib / SLURM launchers, :func:`run_job` waits
there itself; under the launcher of sweeps on AI Hub (``hydra/launcher=aihub``, the plugin in
``hydra_plugins.lpcvlab_launcher``) it returns a :class:`DeferredJob`, which that launcher
resumes once the job's AI Hub jobs are done.
A sweep stopped by Ctrl-C or SIGTERM ends in :func:`hydra_entry`: one paragraph (the parent run
KILLED with what finished and how to resume), exit 130 / 143."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import shlex
import signal
import string
import sys
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lpcvlab.errors import Interrupted, LpcvlabError
from lpcvlab.util.io import WRITE_ERRNOS, storage_error
from lpcvlab.util.secrets import mask_secrets

log = logging.getLogger("lpcvlab")

# Libraries that narrate every step at INFO; their warnings still show.
_CHATTY = ("onnx_ir", "onnxscript", "torch.onnx", "torch._export", "torch.export", "alembic")


def quiet_third_party() -> None:
    """Third-party INFO narration and noise off (their real warnings still show); progress bars
    become periodic lines when the output is a log file (:mod:`lpcvlab.util.console`)."""
    from lpcvlab.util import console

    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    console.filter_noise()
    console.plain_progress()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Once is enough: a second SIGTERM must not interrupt the cleanup of the first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted("SIGTERM")


def ignore_further_signals() -> None:
    """Once a stop is under way, a second Ctrl-C or SIGTERM must not interrupt its cleanup (the
    runs being marked KILLED, the sweep's summary)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass


def install_signal_handlers() -> None:
    """SIGTERM (``timeout``, ``docker stop``, ``kill``, SLURM preemption) stops a run the way
    Ctrl-C does: it ends KILLED with what it had, temporary files removed."""
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding program owns the signals)
        pass


def hydra_dirs() -> tuple[Path | None, Path | None]:
    """(job output dir, its .hydra dir) when running under Hydra, else (None, None)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    return out, out / hc.output_subdir if hc.output_subdir else None


def sweep_job() -> tuple[bool, dict[str, str]]:
    """(is this job part of a multirun, tags naming it: job number and its overrides)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False, {}
    hc = HydraConfig.get()
    overrides = [str(o) for o in hc.overrides.task]
    return True, {
        "sweep_job": str(hc.job.num),
        "sweep_overrides": " ".join(overrides)[:5000],
        # The command that runs this job alone (the process's own is the sweep's, or a worker's).
        "command": shlex.join(["python", "run.py", *mask_secrets(overrides)])[:5000],
    }


def name_overrides() -> list[str]:
    """The overrides this job's MLflow run name shows: in a sweep the swept ones (the sweep's
    ``multirun.yaml`` and ``hydra.sweeper.params`` name them), else those of the command line."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lpcvlab.tracking.naming import override_key, shown_overrides

    if not HydraConfig.initialized():
        return []
    hc = HydraConfig.get()
    overrides = [str(o) for o in hc.overrides.task]
    if hc.mode != RunMode.MULTIRUN:
        return shown_overrides(overrides)
    from omegaconf import OmegaConf

    from lpcvlab.tracking.sweep import sweep_overrides

    swept = {str(k) for k in (OmegaConf.select(hc, "sweeper.params") or {})}
    sweep_file = Path(str(hc.sweep.dir)) / "multirun.yaml"  # the basic sweeper writes it
    if sweep_file.is_file():
        sweep_cfg = OmegaConf.load(sweep_file)
        swept |= {override_key(o) for o in sweep_overrides(sweep_cfg, swept_only=True)}
    return shown_overrides(overrides, swept or None)


# True while the launcher of sweeps on AI Hub runs a job: the job may then stop at its device
# wait and return a DeferredJob (see deferring_waits).
_deferring: list[bool] = []


@contextmanager
def deferring_waits() -> Iterator[None]:
    """Within this block, a sweep job that reaches its device wait returns a
    :class:`DeferredJob` instead of waiting (the ``aihub`` launcher waits on them together)."""
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()


@dataclass(frozen=True)
class _Ended:
    value: Any  # what the job returns to Hydra (the objective, or None)


class _Job:
    """One job's steps, each advanced with run_job's handling of user errors and interrupts."""

    def __init__(
        self, steps: Generator[Any, None, Any], out_dir: Path | None, multirun: bool
    ) -> None:
        self.steps = steps
        self.out_dir = out_dir
        self.multirun = multirun

    def advance(self, error: BaseException | None = None) -> Any:
        """On to the next device wait (returned: what is in flight) or to the end (an
        ``_Ended``); ``error`` is thrown in at the wait the job stopped at."""
        try:
            if error is None:
                return self.steps.send(None)
            return self.steps.throw(error)
        except StopIteration as done:
            return _Ended(done.value)
        except LpcvlabError as exc:
            if self.multirun:
                from lpcvlab.tracking.sweep import note_job_failure

                log.error("%s", exc)
                note_job_failure(self.out_dir, f"{type(exc).__name__}: {exc}")
                return _Ended(None)
            print(f"\nerror: {exc}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt as exc:
            stop = exc if isinstance(exc, Interrupted) else Interrupted("SIGINT")
            if self.multirun:  # the sweep says it, once, for all its jobs (hydra_entry)
                raise stop from None
            print(f"\n{stop.paragraph()}", file=sys.stderr)
            sys.exit(stop.exit_code)


class DeferredJob:
    """A sweep job stopped at its device wait (:func:`run_job` under
    :func:`deferring_waits`): its MLflow run is open, its AI Hub jobs are in flight."""

    def __init__(self, job: _Job, waiting: Any) -> None:
        self._job = job
        self.waiting = waiting  # the hub's InFlight

    @property
    def interval_s(self) -> float:
        return float(self.waiting.interval_s)

    def poll(self) -> bool:
        """One look at its jobs, without waiting: True once it can be resumed. A failed job
        raises here: pass the error to :meth:`resume`."""
        return bool(self.waiting.poll())

    def resume(self, error: BaseException | None = None) -> Any:
        """The rest of the job (metrics, evaluation, MLflow), or ``error`` thrown in at its wait
        (its run ends FAILED, or KILLED for an interrupt, which is raised again). Returns the
        job's return value, or this DeferredJob when it stops at another wait."""
        got = self._job.advance(error)
        if isinstance(got, _Ended):
            return got.value
        self.waiting = got
        return self


def run_job(cfg: DictConfig) -> Any:
    """Run one job; returns the objective for sweepers (``track.objective``, budget applied).

    The config is loaded and checked first (typed values, group combinations): a mistake stops
    here, before any MLflow run or compute. A user error (:class:`LpcvlabError`) in a single run
    prints its message and exits 1. In a multirun it is logged and written beside the job's
    output for the sweep callback, and the job returns None: raising would make Hydra's basic
    sweeper abort the sweep (and skip its end-of-sweep callbacks), while None lets it go on, and
    the Optuna sweeper records the trial as failed. Ctrl-C and SIGTERM print what was kept and
    how to resume (a sweep's jobs leave that to the sweep: :func:`hydra_entry`). Under
    :func:`deferring_waits` a sweep job that reaches its device wait returns a
    :class:`DeferredJob` instead of waiting.
    """
    install_signal_handlers()
    quiet_third_party()
    out_dir, hydra_dir = hydra_dirs()
    multirun, tags = sweep_job()
    job = _Job(_job_steps(cfg, out_dir, hydra_dir, tags), out_dir, multirun)
    got = job.advance()
    if multirun and _deferring and not isinstance(got, _Ended):
        return DeferredJob(job, got)
    while not isinstance(got, _Ended):  # waiting here, blocking
        from lpcvlab.hubs.base import wait

        try:
            wait(got)
        except BaseException as exc:  # noqa: BLE001 - thrown into the job, which re-raises
            got = job.advance(exc)
        else:
            got = job.advance()
    return got.value


def _job_steps(
    cfg: DictConfig, out_dir: Path | None, hydra_dir: Path | None, tags: dict[str, str]
) -> Generator[Any, None, Any]:
    """The job as steps that stop at its device wait: the pipeline's, or a reproduction."""
    from lpcvlab.config import load_settings

    if cfg.get("reproduce"):
        from lpcvlab.tracking.reproduce import reproduce_from_hydra

        return reproduce_from_hydra(cfg, out_dir, run_config)
    settings = load_settings(cfg)  # fails in well under a second, before the imports below
    from lpcvlab import pipeline

    result = yield from pipeline.run_steps(
        cfg,
        work_dir=out_dir,
        hydra_dir=hydra_dir,
        extra_tags=tags,
        name_overrides=name_overrides(),
        settings=settings,  # loaded once, here
    )
    assert result.objective is not None
    return result.objective.value


def run_config(
    cfg: DictConfig, work_dir: Path, hydra_dir: Path | None, extra_tags: dict[str, str]
) -> str:
    """Run the pipeline on an already resolved config (``lpcvlab reproduce``); returns the new
    MLflow run's ID."""
    from lpcvlab import pipeline

    return pipeline.run(cfg, work_dir, hydra_dir, extra_tags=extra_tags).run_id


# The folder Hydra writes this process's run or sweep into, and the key that moves it.
_output_folder: list[tuple[Path, str]] = []


class OutputFolderCheck(Callback):
    """Make the output folder (``hydra.run.dir``, or ``hydra.sweep.dir`` for ``-m``) before Hydra
    writes its log and ``.hydra/`` there, and before a sweep opens its MLflow parent run: a full
    disk or an unwritable folder stops in one line naming it (Hydra's own report is a bare
    ``OSError: [Errno 28]`` traceback that names no path). Registered first under
    ``hydra.callbacks`` in ``conf/config.yaml``."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _make_output_folder(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _make_output_folder(config.hydra.sweep.dir, "hydra.sweep.dir")


def _make_output_folder(folder: Any, key: str) -> None:
    path = Path(str(folder)).absolute()
    _output_folder[:] = [(path, key)]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # Hydra turns a callback's exception into a warning and goes on; this must stop.
        print(f"error: {storage_error(path, exc, key)}", file=sys.stderr)
        raise SystemExit(1) from None


def output_folder_error(exc: BaseException) -> str | None:
    """One line for a write that failed in the output folder (Hydra's log or ``.hydra/*.yaml``
    after the folder was made: the disk filled, a file there is not writable), naming the file,
    or the folder when the OS gave no file name (a full disk on ``write``); None for anything
    else, which keeps its traceback."""
    found: BaseException | None = exc
    while found is not None and not isinstance(found, OSError):
        found = found.__cause__ or found.__context__  # logging wraps its handler's OSError
    if not isinstance(found, OSError) or found.errno not in WRITE_ERRNOS or not _output_folder:
        return None
    folder, key = _output_folder[0]
    if found.filename is None:
        return str(storage_error(folder, found, key))
    path = Path(os.fsdecode(found.filename)).absolute()
    if path != folder and folder not in path.parents:
        return None
    return str(storage_error(path, found, key))


def _exit_if_the_sweep_failed() -> None:
    """A multirun whose jobs failed (``sweep.fail_on``) exits 1 once its parent run is
    summarised, so that scripts and CI notice."""
    from lpcvlab.tracking.sweep import sweep_failure

    verdict = sweep_failure()
    if verdict is not None:
        print(f"error: {verdict}", file=sys.stderr)
        sys.exit(1)


class _OnDemand(Mapping[str, str]):
    """A mapping whose values are computed when looked up: ``string.Template`` looks up only the
    names its template uses."""

    def __init__(self, makers: dict[str, Callable[[], str]]) -> None:
        self._makers = makers

    def __getitem__(self, key: str) -> str:
        return self._makers[key]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)


def help_text(hydra: Any, help_cfg: Any, cfg: Any, args_parser: Any, resolve: bool) -> str:
    """Hydra's ``get_help``, computing only the sections the template names.

    Hydra lists every config group (a fresh copy of the config repository for each of about 190
    groups and options: 2 s of CPU here) before it looks at the template, and lpcvlab's
    ``hydra.help.template`` prints none of them: with this ``python run.py --help`` costs one
    composition. ``--hydra-help``, whose template lists the groups, prints what it did.
    """
    from omegaconf import OmegaConf

    def groups(of_hydra: bool) -> str:
        return hydra.format_config_groups(
            lambda g: (g.startswith("hydra/") or g == "hydra") == of_hydra
        )

    sections = _OnDemand(
        {
            "FLAGS_HELP": lambda: hydra.format_args_help(args_parser),
            "HYDRA_CONFIG_GROUPS": lambda: groups(True),
            "APP_CONFIG_GROUPS": lambda: groups(False),
            "CONFIG": lambda: OmegaConf.to_yaml(cfg, resolve=resolve),
        }
    )
    return string.Template(help_cfg.template).substitute(sections)


def _help_on_demand() -> None:
    """Have Hydra's help use :func:`help_text` (Hydra 1.3's ``Hydra.get_help``, same arguments)."""
    from hydra._internal.hydra import Hydra

    Hydra.get_help = help_text  # type: ignore[method-assign]


def check_before_hydra_runs(config_dir: Path, config_name: str, argv: list[str]) -> None:
    """Check a single run's config, composed with Hydra's Compose API, before Hydra's run
    machinery composes it (twice: once to read ``hydra.mode``, once to run), makes the output
    folder, starts its log and writes ``.hydra/`` there: a mistake stops in one line at a third
    of the cost, and leaves nothing behind. A config that passes is loaded again where the run
    starts (:func:`run_job`), with its weights.

    Left to Hydra, as before: sweeps (``-m``, or a config that sets ``hydra.mode``; the sweep
    callback checks their base config), the other commands (``--help``, ``--cfg``, ...), another
    config (``-cp``, ``-cn``, ``-cd``), a command line Hydra refuses, and values that read
    Hydra's runtime (``${hydra:...}``, known only once Hydra runs the job).
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser  # the parser @hydra.main uses
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict, read_write

    from lpcvlab.config import composition_error, load_settings

    try:  # quietly: main() parses it again, and says what is wrong with it
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(argv)
    except SystemExit:  # a command line Hydra refuses, or --version
        return
    other = (args.help, args.hydra_help, args.cfg, args.info, args.shell_completion)
    if args.multirun or any(other) or args.config_path or args.config_name or args.config_dir:
        return
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name, overrides=args.overrides, return_hydra_config=True)
    except Exception as exc:
        if composition_error(exc) is not None:
            raise  # an unknown key, a wrong type, no such option: hydra_entry's one line
        return  # anything else: Hydra reports it from main(), as before
    if cfg.hydra.mode == RunMode.MULTIRUN:
        return
    body = copy.deepcopy(cfg)  # the job's config as Hydra's run_job hands it over
    with read_write(body), open_dict(body):
        del body["hydra"]
    if "${hydra:" in OmegaConf.to_yaml(body):
        return
    load_settings(body, report=False)  # a ConfigError: hydra_entry prints its one line


def hydra_entry(
    main: Callable[[], Any], config_dir: Path | None = None, config_name: str = "config"
) -> None:
    """Call a ``@hydra.main`` function, reporting config mistakes in one line.

    Hydra prints composition errors (an unknown key, a value of the wrong type, an option that
    does not exist) over several lines with advice that does not fit typed configs; here they
    become one line naming the key and what to do. ``HYDRA_FULL_ERROR=1`` keeps Hydra's own
    report. With ``config_dir`` (``main``'s config folder), a single run's config is checked
    before Hydra runs it (:func:`check_before_hydra_runs`).
    """
    from lpcvlab.config import composition_error

    _help_on_demand()
    install_signal_handlers()  # a sweep's parent run is open before its first job starts
    user_wants_full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let the exception reach us instead of a printout
    try:
        if config_dir is not None:
            check_before_hydra_runs(config_dir, config_name, sys.argv[1:])
        main()
        _exit_if_the_sweep_failed()
    except KeyboardInterrupt as exc:
        _stopped(exc)
    except Exception as exc:
        message = composition_error(exc)
        if message is None and isinstance(exc, LpcvlabError):
            message = str(exc)  # e.g. a sweep callback that found the store unusable
        if message is None:
            message = output_folder_error(exc)
        if message is None or user_wants_full:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    finally:
        if not user_wants_full:
            os.environ.pop("HYDRA_FULL_ERROR", None)


def _stopped(exc: KeyboardInterrupt) -> None:
    """Ctrl-C or SIGTERM reached the top (a sweep, whatever its launcher; a single run has said
    it already): one paragraph -- the sweep's parent KILLED with what finished, what was stopped,
    what never started and how to resume --, no traceback, exit 130 / 143."""
    ignore_further_signals()
    stop = exc if isinstance(exc, Interrupted) else Interrupted("SIGINT")
    paragraph = None
    try:
        from lpcvlab.tracking.sweep import stop_sweep

        paragraph = stop_sweep(stop)
    except Exception as err:  # noqa: BLE001 - the stop is still said, and the exit code right
        log.error("the stopped sweep could not be summarised: %s", err)
    print(f"\n{paragraph or stop.paragraph()}", file=sys.stderr)
    sys.exit(stop.exit_code)
