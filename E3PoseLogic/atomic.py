"""Atomic output files: a crash, Ctrl-C or SIGTERM never leaves a truncated result where a valid one was expected.

Every writer goes through ``atomic_path`` (one file) or ``atomic_paths`` (a set of files that belong together):
write to a hidden temporary file in the same folder (same file system, so ``os.replace`` is atomic), then rename
over the final name. The temporary name ends with the final name (or, for a name that is not valid UTF-8, with its
suffixes only), so libraries that pick the format from the suffix (``.nii.gz``, ``.tfm``, ``.h5``) behave as for
the real file, and starts with a dot, so folder scans (``volume_io.iter_inputs``) skip it. Contents are flushed
to disk (fsync) before the rename.

Temporaries are removed on any exception, ``KeyboardInterrupt`` included; ``interrupt_handlers`` makes SIGTERM
(and SIGINT) raise ``Interrupted`` (a ``KeyboardInterrupt``), so the same clean-up runs when a batch is killed.

``native_path`` hands C++ libraries (SimpleITK/ITK) a path they can take: they abort the whole process on a file
name that is not valid UTF-8.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Iterable, Iterator, List

import numpy as np

TEMP_MARK = ".tmp."  # hidden temporaries are named ".<random>.tmp.<final name>"
SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


# ---------------------------------------------------------------------------------------------------------- names
def utf8_ok(text) -> bool:
    """True when ``text`` (str or path) can be encoded as UTF-8, i.e. holds no undecodable bytes from the disk."""
    try:
        os.fspath(text).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def ascii_suffixes(name: str) -> str:
    """The trailing suffixes of ``name`` that are plain ASCII (``latin1_\\udce9.nii.gz`` -> ``.nii.gz``)."""
    out = ""
    for suffix in reversed(Path(name).suffixes):
        if not suffix.isascii() or not suffix[1:].replace("_", "").replace("-", "").isalnum():
            break
        out = suffix + out
    return out


def _temporary(final: Path, keep_name: bool):
    """(temporary path, folder to remove afterwards or None) next to ``final``."""
    tag = uuid.uuid4().hex[:12]
    if keep_name:  # some writers derive content from the file name (a .mrb holds a folder named after it)
        folder = final.parent / f".{tag}{TEMP_MARK}d"
        folder.mkdir()
        return folder / final.name, folder
    name = final.name if utf8_ok(final.name) else "e3pose" + ascii_suffixes(final.name)
    return final.with_name(f".{tag}{TEMP_MARK}{name}"), None


# ---------------------------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_path(final_path, keep_name: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``final_path``; on success it replaces ``final_path``, on any error
    (KeyboardInterrupt included) it is removed and ``final_path`` is left as it was.

    ``keep_name``: the temporary file has the final file name, inside a hidden temporary folder.
    """
    with atomic_paths([final_path], keep_name=keep_name) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(final_paths: Iterable, keep_name: bool = False) -> Iterator[List[Path]]:
    """Several files that belong together: yield one temporary path per final path (same order).

    Only once every temporary has been written (the ``with`` body finished) do they replace the final files, in the
    given order (put the file whose presence says "complete" last) and with SIGINT/SIGTERM held back until all are
    renamed. On any error before that, every temporary is removed and all final files are left as they were: an
    earlier set is never mixed with, or lost to, an unfinished new one.
    """
    finals = [Path(p) for p in final_paths]
    for f in finals:
        f.parent.mkdir(parents=True, exist_ok=True)
    made = []  # (tmp, folder)
    try:
        for f in finals:
            made.append(_temporary(f, keep_name))
        yield [t for t, _ in made]
        for f, (t, _) in zip(finals, made):
            if not t.exists():
                raise FileNotFoundError(f"{f}: nothing was written to the temporary file {t.name}")
            _fsync(t)
        with deferred_interrupts():
            for f, (t, _) in zip(finals, made):
                os.replace(t, f)
            for f in {f.parent for f in finals}:
                _fsync_dir(f)
    except BaseException:
        for t, _ in made:
            with contextlib.suppress(OSError):
                t.unlink()
        raise
    finally:
        for _, folder in made:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)


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


def _fsync_dir(folder: Path) -> None:
    """Flush the renames themselves (POSIX; a no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    _fsync(folder)


@contextlib.contextmanager
def native_path(path, write: bool = True) -> Iterator[str]:
    """A path string for C++ libraries (SimpleITK/ITK) that abort the process on a name that is not valid UTF-8.

    Yields ``str(path)`` when it is valid UTF-8. Otherwise the library works on an ASCII-named file in the system
    temporary folder, copied to ``path`` afterwards (``write``) or from ``path`` beforehand (reading).
    """
    path = Path(path)
    if utf8_ok(path):
        yield str(path)
        return
    folder = tempfile.mkdtemp(prefix="e3pose-")
    try:
        tmp = os.path.join(folder, "file" + ascii_suffixes(path.name))
        if not write:
            shutil.copyfile(path, tmp)
        yield tmp
        if write:
            shutil.copyfile(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_text(path, text: str, encoding: str = "utf-8") -> None:
    with open(path, "w", encoding=encoding) as f:
        f.write(text)


def write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text: str, encoding: str = "utf-8", atomic: bool = True) -> Path:
    """Write ``text``; ``atomic=False`` writes in place (for a temporary that ``atomic_paths`` renames)."""
    if not atomic:
        _write_text(path, text, encoding)
        return Path(path)
    with atomic_path(path) as tmp:
        _write_text(tmp, text, encoding)
    return Path(path)


def save_npy(path, array, atomic: bool = True) -> Path:
    """``np.save`` through a file handle: np.save would append ``.npy`` to a name without it."""
    with atomic_path(path) if atomic else contextlib.nullcontext(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)
    return Path(path)


def save_json(path, obj, indent: int = 2, atomic: bool = True) -> Path:
    """JSON with numpy arrays/scalars and paths converted (results carry all three)."""
    text = json.dumps(obj, indent=indent, default=json_default, allow_nan=True) + "\n"
    return write_text(path, text, atomic=atomic)


def json_default(o):
    """``json.dumps(default=...)`` for numpy arrays and scalars and paths."""
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


# ---------------------------------------------------------------------------------------------------------- signals
class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread so ``finally`` blocks (and temporary clean-up) run."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _swap_handlers(handler, replaces) -> dict:
    """Install ``handler`` for each of SIGNALS whose current handler ``replaces(current)`` accepts; -> the previous
    handlers, to give back with ``signal.signal``. A signal the interpreter will not let us set is left alone."""
    old = {}
    for s in SIGNALS:
        if not replaces(signal.getsignal(s)):
            continue
        try:
            old[s] = signal.signal(s, handler)
        except (ValueError, OSError):  # an embedding interpreter that does not allow it
            continue
    return old


@contextlib.contextmanager
def interrupt_handlers():
    """While inside: SIGINT and SIGTERM raise ``Interrupted`` (where their handler is Python's default; an ignored
    signal stays ignored). The previous handlers come back afterwards."""
    old = {}
    if _in_main_thread():
        old = _swap_handlers(_raise_interrupted, lambda h: h in (signal.SIG_DFL, signal.default_int_handler))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred_interrupts():
    """Hold SIGINT/SIGTERM back while inside (a few renames that must not be split); deliver them on exit."""
    if not _in_main_thread():
        yield
        return
    pending = []

    def hold(signum, frame):
        pending.append(signum)

    # not a handler installed outside Python (it could not be restored), nor an ignored signal
    old = _swap_handlers(hold, lambda h: h is not None and h != signal.SIG_IGN)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if pending:
            s = pending[0]
            h = old.get(s)
            if callable(h):
                h(s, None)
            elif h == signal.SIG_DFL:
                signal.raise_signal(s)
