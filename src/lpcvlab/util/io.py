"""Writing files safely: atomic replacement, cross-process locks, disk-full errors naming the path.

Parallel sweep jobs share caches, ledgers and demo folders, so every shared file is written to a
temporary name beside its destination and moved into place (readers never see half a file), and
work that must happen once (generating a demo dataset) runs under a :func:`file_lock`
(``filelock``: works on every platform, unlike ``fcntl``). A full disk or an unwritable folder
becomes a :class:`~lpcvlab.errors.StorageError` naming the path, instead of an ``OSError`` deep in
a traceback.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lpcvlab.errors import StorageError

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
WRITE_ERRNOS = frozenset(_NO_SPACE | _NOT_WRITABLE)  # a write refused by the disk, not a bug


def storage_error(
    path: str | os.PathLike[str], exc: OSError, setting: str | None = None
) -> StorageError:
    """A user-facing error for a failed write of ``path``: full disk, read-only, no permission;
    ``setting`` is the key that moves it elsewhere (default: the cache and the output folder)."""
    where = Path(path)
    if exc.errno in _NO_SPACE:
        return StorageError(
            f"no space left on the device writing {where}: free some space there, or point "
            f"{setting or 'paths.cache_dir (or the output folder)'} at a disk with room"
        )
    if exc.errno in _NOT_WRITABLE:
        return StorageError(
            f"cannot write {where} ({exc.strerror or exc}): the folder is read-only or not "
            f"yours; choose a writable location ({setting or 'paths.cache_dir, hydra.run.dir'})"
        )
    return StorageError(f"could not write {where}: {exc.strerror or exc}")


@contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` into a :class:`StorageError` naming it."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise storage_error(path, exc) from exc


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it into place.

    The temporary name is unique per process and call, so concurrent writers of the same path
    never interleave; the last one to finish wins with a complete file.
    """
    dest = Path(path)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with writing(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return dest


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_save_npy(path: str | os.PathLike[str], array: Any) -> Path:
    """``np.save`` through a file object (a name would get ``.npy`` appended)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return atomic_write(path, write)


def load_cached_npy(
    path: str | os.PathLike[str],
    valid: Callable[[Any], bool] | None = None,
    *,
    mmap: bool = False,
) -> Any:
    """A disk cache's array, or None when it is missing, unreadable (a file cut short) or fails
    ``valid`` (another shape or dtype): the caller recomputes it and writes it again."""
    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError):
        return None
    return arr if valid is None or valid(arr) else None


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append one line under the file's lock, flushed to disk: a journal that parallel processes
    share (each line is written whole, never interleaved with another process's)."""
    dest = Path(path)
    text = line if line.endswith("\n") else line + "\n"
    with writing(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(dest), open(dest, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


@contextmanager
def file_lock(path: str | os.PathLike[str], timeout: float = -1) -> Iterator[None]:
    """Hold ``<path>.lock`` exclusively (between processes and threads) for the block."""
    from filelock import FileLock  # here: every command imports this module, few take a lock

    lock_path = Path(f"{os.fspath(path)}.lock")
    with writing(lock_path):
        lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path), timeout=timeout):
        yield
