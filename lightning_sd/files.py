"""Atomic file writes: a reader sees the old file or the complete new one, never half of it. The new content
is written under a temporary name in the same folder (`temp_path`: `.<name>.tmp-<pid>`) and renamed over the
target (`os.replace`, atomic on POSIX); a failed write removes the temporary file and leaves the target alone.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

TMP_TAG = ".tmp-"


def temp_path(path: str | os.PathLike) -> Path:
    """Where `path` is staged while it is written: `.<name>.tmp-<pid>` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}")


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """`open(path, mode)` for writing (UTF-8 in text mode) whose file appears at `path` only once the block
    has finished without an error; the folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file so that readers see the old or the new content, never half of it."""
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


__all__ = ["TMP_TAG", "temp_path", "atomic_open", "atomic_write_text"]
