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
    """

    def __init__(self, signal_name: str = "SIGINT") -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
