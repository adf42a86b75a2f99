"""Errors a user can act on.

Anything raised as a :class:`LpcvlabError` is printed as its message alone (no traceback) by
``run.py`` and the ``lpcvlab`` CLI: the message must name the file, row or field at fault and say
what to do. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class LpcvlabError(Exception):
    """Base class for errors caused by input or configuration, not by a bug."""


class DataError(LpcvlabError):
    """Bad input data: a file, a row or a field that cannot be used."""


class ConfigError(LpcvlabError):
    """A configuration value that cannot work."""


class ParityError(LpcvlabError):
    """An exported model disagrees with the PyTorch model it came from."""


class RuntimeStageError(LpcvlabError):
    """A compile, profile or inference stage failed on a runtime (local or remote)."""


class StorageError(LpcvlabError):
    """A file that could not be written: disk full, read-only, no permission (names the path)."""


class TrackingStoreError(LpcvlabError):
    """The MLflow tracking store cannot be used (names the URI)."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by Ctrl-C (SIGINT) or SIGTERM; it ends KILLED with what it had.

    A ``KeyboardInterrupt``, so that everything that already handles Ctrl-C (Lightning's
    interrupt checkpoint, ``with`` blocks that clean up temporary folders) handles SIGTERM too.
    The pipeline re-raises it with what was kept (``run_id``, ``kept``) and how to go on
    (``resume``), which ``run.py`` prints instead of a traceback.
    """

    def __init__(
        self,
        signal_name: str = "SIGINT",
        run_id: str | None = None,
        kept: tuple[str, ...] = (),
        resume: str | None = None,
    ) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.run_id = run_id
        self.kept = kept
        self.resume = resume

    @property
    def exit_code(self) -> int:
        return 143 if self.signal_name == "SIGTERM" else 130

    def paragraph(self) -> str:
        """What the user reads: what stopped, what was kept, how to go on."""
        lines = [f"Stopped by {self.signal_name}."]
        if not self.run_id and not self.kept:
            lines.append("No MLflow run had started yet: nothing to keep or resume.")
        if self.run_id:
            lines.append(
                f"MLflow run {self.run_id} is marked KILLED and keeps what it had logged "
                "(params, metrics so far, the job log)."
            )
        lines += list(self.kept)
        if self.resume:
            lines.append(self.resume)
        return " ".join(lines)
