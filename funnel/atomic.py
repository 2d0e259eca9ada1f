"""Atomic outputs: every file is written under a temporary name beside it and renamed when complete.

A failure (an exception, Ctrl-C) while writing leaves any earlier file of that name untouched and
no partial file behind; a folder made only to hold the output is removed again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from funnel.errors import UserError


def _missing_ancestor(path: Path) -> Path | None:
    """The outermost folder above ``path`` that does not exist yet (None when the parent exists)."""
    top = None
    for parent in path.parents:
        if parent.exists():
            break
        top = parent
    return top


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; it replaces ``path`` only if the block completes."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{str(path)!r} is a folder; give the path of a file to write.")
    made = _missing_ancestor(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def copy_file(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` onto ``dst`` atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one existing file (through links, ``..`` or another spelling)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()
