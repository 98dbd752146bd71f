"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


class WriteError(OSError):
    """A file that could not be written (no permission, a full disk...); the message names
    the file, its folder and the fix."""


def write_error(path: Path, err: OSError) -> WriteError:
    """``err`` (raised writing ``path``) as a :class:`WriteError` naming the folder and the fix."""
    if isinstance(err, WriteError):
        return err
    folder = path.parent
    error = WriteError(
        f"cannot write {path} ({err.strerror or err}): make {folder} writable by this user (ls -ld {folder}) "
        f"and free space on its disk (df -h {folder}), then run again; what was written there before is unchanged"
    )
    error.strerror, error.filename = err.strerror or str(err), str(path)
    return error


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it, then rename it over
    ``path``. On any error the temp file is removed and ``path`` is untouched; an OS error
    (permissions, a full disk) becomes a :class:`WriteError` naming the folder and the fix."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(path, err) from err
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, json.dumps(obj, indent=2, default=json_default).encode())
