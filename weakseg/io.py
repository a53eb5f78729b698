"""Atomic file writes: a reader (or a crash) never sees half a file.

Everything is written to a temporary file in the destination folder and
`os.replace`d into place, which is atomic on POSIX file systems.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; move it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


MIN_FREE_BYTES = 16 << 20  # kept free after a write: a full disk truncates the files of the writer after us


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse a write that would (nearly) fill the file system, where it tells its free space."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return  # no answer (or not POSIX): write and let the OS say
    free = st.f_bavail * st.f_frsize
    if free < need + MIN_FREE_BYTES:
        from weakseg.errors import UserError

        raise UserError(f"no space left for {what}: {free // (1 << 20)} MiB free on the file system of {folder}, "
                        f"{(need + MIN_FREE_BYTES) // (1 << 20)} MiB needed")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path.parent, len(data), str(path))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and move the result into place."""
    with atomic_path(path) as tmp:
        write(tmp)


def csv_text(rows: list[dict]) -> str:
    """CSV of dict rows; the header is the union of their keys in first-seen order."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()

