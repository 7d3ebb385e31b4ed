"""Named built-in evaluation texts: text of another kind than WikiText-2 that every installation already has.

``python-stdlib`` is a fixed list of CPython standard-library modules (code, comments and
docstrings), read from the running interpreter's installation, so it is identical on every
machine with the same Python build (the project measures on CPython 3.11.7).  A different
Python gives different text: a warning says so, since perplexities are then not comparable.
A name given to ``--text`` means the built-in text; to read a file of that name, write ``./NAME``.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

from slicegpt_export.errors import SliceGPTError

logger = logging.getLogger(__name__)

PYTHON_STDLIB_FILES = (
    "textwrap.py", "functools.py", "heapq.py", "bisect.py", "fractions.py", "statistics.py", "json/decoder.py",
    "json/encoder.py", "string.py", "shlex.py", "graphlib.py", "queue.py", "csv.py", "calendar.py",
)  # fmt: skip
PYTHON_STDLIB_SHA256 = "c507f9278d808c93304b14f498e965ef874c7c4ebd52f40660127b298f121827"  # CPython 3.11.7
MEASURED_PYTHON = "3.11.7"


def python_stdlib_text() -> str:
    """The listed standard-library sources of this interpreter, joined by blank lines."""
    root = Path(sysconfig.get_paths()["stdlib"])
    try:
        text = "\n\n".join((root / name).read_text(encoding="utf-8") for name in PYTHON_STDLIB_FILES)
    except OSError as exc:
        raise SliceGPTError(f"the built-in text python-stdlib needs the standard-library sources: {exc}") from exc
    digest = hashlib.sha256(text.encode()).hexdigest()
    if digest != PYTHON_STDLIB_SHA256:
        logger.warning(
            "python-stdlib: this Python (%s) has other standard-library sources than the measured %s; "
            "perplexities on it are not comparable with the recorded ones",
            sys.version.split()[0],
            MEASURED_PYTHON,
        )
    return text


BUILTIN_TEXTS: dict[str, Callable[[], str]] = {"python-stdlib": python_stdlib_text}


def builtin_text(name: str | Path) -> str | None:
    """The built-in text called `name`, or None when `name` names none (then it is a path)."""
    reader = BUILTIN_TEXTS.get(str(name))
    return reader() if reader is not None else None
