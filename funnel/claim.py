"""Claiming a run directory, so that two processes never write into one run.

A new run's folder is made with an exclusive ``mkdir`` (a default name that is taken gets a
``-1``, ``-2``, ... suffix), or, for an explicit ``run_dir`` that already exists, accepted only
when empty. Either way the claimant then creates ``.lock`` exclusively (``O_EXCL``) and holds it
while it works; a lock left by a killed process is recognised by its dead process id and taken
over. Until training starts the claim can be discarded, which removes everything it wrote.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from funnel.errors import UserError

LOCK = ".lock"


@dataclass
class RunClaim:
    path: Path
    created: bool  # this process made the folder (else it existed, empty)

    def release(self) -> None:
        """Give the folder up, keeping what was written (a finished or resumable run)."""
        (self.path / LOCK).unlink(missing_ok=True)

    def discard(self) -> None:
        """Remove everything this claim wrote: the folder itself when it made it."""
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for entry in self.path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _lock_owner(path: Path) -> tuple[str, int] | None:
    try:
        host, pid = (path / LOCK).read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _take_lock(path: Path) -> bool:
    """Create ``.lock`` exclusively; False when another process holds it."""
    try:
        fd = os.open(path / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{socket.gethostname()} {os.getpid()}\n")
    return True


def _busy(path: Path) -> UserError:
    owner = _lock_owner(path)
    who = f" (process {owner[1]} on {owner[0]})" if owner else ""
    return UserError(
        f"run_dir: {str(path)!r} is in use by another funnel process{who}. Wait for it to finish, "
        "or choose another run_dir."
    )


def claim_new(run_dir: str | None, config_path: str | Path, refused_hint: str = "") -> RunClaim:
    """Claim the folder of a new run: ``run_dir`` when given, else runs/<config stem>/<timestamp>."""
    if run_dir is None:
        base = Path("runs") / Path(config_path).stem / time.strftime("%Y%m%d-%H%M%S")
        base.parent.mkdir(parents=True, exist_ok=True)
        for k in range(1000):
            path = base if k == 0 else base.with_name(f"{base.name}-{k}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            _take_lock(path)
            return RunClaim(path, created=True)
        raise UserError(f"run_dir: every name {base}-N is taken; give run_dir explicitly.")
    path = Path(run_dir)
    try:
        path.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
        if not path.is_dir():
            raise UserError(f"run_dir: {str(path)!r} exists and is a file; choose a new run_dir.") from None
    if not created and any(path.iterdir()):
        if [p.name for p in path.iterdir()] == [LOCK] and _stale(path):  # a run killed while reading its data
            (path / LOCK).unlink(missing_ok=True)
        elif (path / LOCK).exists() and not _stale(path):
            raise _busy(path)
    if not created and any(path.iterdir()):
        raise UserError(
            f"run_dir: {str(path)!r} already exists and is not empty; funnel never overwrites a run. "
            f"Choose a new run_dir, or leave it out for runs/<config stem>/<timestamp>.{refused_hint}"
        )
    if not _take_lock(path):
        raise _busy(path)
    if [p.name for p in path.iterdir()] != [LOCK]:  # another run claimed and finished it meanwhile
        (path / LOCK).unlink(missing_ok=True)
        raise UserError(f"run_dir: {str(path)!r} was just used by another run; choose a new run_dir.")
    return RunClaim(path, created=created)


def _stale(path: Path) -> bool:
    """The lock was left by a process of this machine that no longer runs."""
    owner = _lock_owner(path)
    return owner is not None and owner[0] == socket.gethostname() and not _alive(owner[1])


def claim_existing(run_dir: str | Path) -> RunClaim:
    """Claim an existing run's folder (to resume it); a lock of a dead process is taken over."""
    path = Path(run_dir)
    if _take_lock(path):
        return RunClaim(path, created=False)
    if _stale(path):
        stale = path / f"{LOCK}.stale-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):  # only one process wins the rename
            os.replace(path / LOCK, stale)
            stale.unlink()
            if _take_lock(path):
                return RunClaim(path, created=False)
    raise _busy(path)
