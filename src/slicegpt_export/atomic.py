"""Atomic output: build a folder or file under a temporary name, rename it into place when complete.

The temporary names come from `tempfile`, which creates folders 0700 and files 0600, and some
writers do the same (safetensors writes 0600); before anything is renamed into place it gets the
mode the process umask gives a plain `mkdir` or `open`, so outputs are as readable as any other
tool's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from slicegpt_export.errors import SliceGPTError


def current_umask() -> int:
    """The process umask (read by setting it and putting it straight back: there is no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give `path` (and everything under a folder) the mode a new folder or file gets under the umask.

    Executable files stay executable; symbolic links are left alone.
    """
    mask = current_umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if p.is_symlink():
            continue
        full = 0o777 if p.is_dir() or p.stat().st_mode & 0o111 else 0o666
        p.chmod(full & ~mask)


def unwritable(target: Path, exc: OSError) -> SliceGPTError:
    """The one-line error for an output that cannot be created (read-only, /proc, /sys, no permission)."""
    return SliceGPTError(f"cannot write {target}: {exc.strerror or exc} ({exc.filename or target.parent})")


def make_output_folder(target: Path) -> None:
    """`mkdir -p target`, with an OSError reported as a SliceGPTError."""
    try:
        Path(target).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise unwritable(Path(target), exc) from exc


@contextlib.contextmanager
def atomic_directory(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target`, on error it is removed.

    A crash or Ctrl-C therefore never leaves a half-written folder under the final name.
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise SliceGPTError(f"output folder {target} already exists and is not empty (pass --overwrite to replace it)")
    make_output_folder(target.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise unwritable(target, exc) from exc
    try:
        yield tmp
        apply_umask(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; it is renamed onto `target` only when the block succeeds."""
    target = Path(target)
    make_output_folder(target.parent)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise unwritable(target, exc) from exc
    tmp = Path(name)
    try:
        yield tmp
        apply_umask(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
