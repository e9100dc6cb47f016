"""File primitives of the planning edge: gzip-aware text reading and atomic text writes."""

from __future__ import annotations

import gzip
import os
import tempfile
from pathlib import Path
from typing import IO


def open_text(path: str | Path) -> IO[str]:
    """Open ``path`` for reading as UTF-8 text, through gzip when it ends in ``.gz``.

    Raises:
        OSError: the file cannot be opened (callers wrap it in their own error type).
    """
    if str(path).lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")  # noqa: SIM115 - the caller closes it


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one.

    The new file keeps the old file's mode (else 0644). On any error the temporary file is
    removed and the old file is left untouched.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, target.stat().st_mode & 0o777 if target.exists() else 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
