"""Atomic writes: a temporary file beside the target, renamed over it, so a kill never leaves half a file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], Any], *, sync: bool = False) -> None:
    """Call ``write`` on a temporary binary file next to ``path``, then rename it to ``path``. ``sync`` flushes
    it to disk first (for files a resumed run depends on)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda fh: fh.write(text.encode()))


def write_json_atomic(path: str | os.PathLike, value: Any, *, indent: int | None = 1) -> None:
    write_text_atomic(path, json.dumps(value, indent=indent))
