"""Atomic output files: a crash or Ctrl-C never leaves a truncated result where a valid one was expected.

Every writer goes through ``atomic_path``: write to a hidden temporary file in the same folder (same file system,
so ``os.replace`` is atomic), then rename over the final name. The temporary name ends with the final name, so
libraries that pick the format from the suffix (``.nii.gz``, ``.tfm``, ``.h5``) behave as for the real file, and
starts with a dot, so folder scans (``volume_io.iter_inputs``) skip it.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(final_path) -> Iterator[Path]:
    """Yield a temporary path next to ``final_path``; on success it replaces ``final_path``, on any error
    (KeyboardInterrupt included) it is removed and ``final_path`` is left as it was."""
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{uuid.uuid4().hex[:12]}.tmp.{final.name}")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{final}: nothing was written to the temporary file {tmp.name}")
        _fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _fsync(path: Path) -> None:
    """Flush file contents before the rename, so a power cut cannot leave a renamed but empty file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text: str, encoding: str = "utf-8") -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def save_npy(path, array) -> Path:
    """``np.save`` through a file handle: np.save would append ``.npy`` to a name without it."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)
    return Path(path)


def save_json(path, obj, indent: int = 2) -> Path:
    """JSON with numpy arrays/scalars and paths converted (results carry all three)."""
    text = json.dumps(obj, indent=indent, default=_json_default, allow_nan=True) + "\n"
    return write_text(path, text)


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
