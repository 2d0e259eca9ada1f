"""Lean checkpoints, written in the background.

A run keeps two files in checkpoints/:

- the best epoch's weights, ``epoch{N}.ckpt`` while training and ``best.ckpt`` at the end:
  only what loading the model needs (:data:`LEAN_KEYS`: the state dict, its epoch and step),
  no optimiser state, no loop or callback state;
- ``last.ckpt``, everything ``funnel fit --resume`` needs (weights, optimiser moments, loops,
  callbacks, RNG), rewritten at every epoch end; warm starts with
  ``warm_start.init_optimizer`` take their moments from it.

Writing the full ``last.ckpt`` of a 40M-row table (8.6 GB with Adam's two moments) takes longer
than many epochs' worth of steps, so :class:`BackgroundCheckpointIO` snapshots the checkpoint's
tensors into CPU buffers (a copy in memory is several times faster than a write to disk) and
writes the snapshot in one background thread while training goes on.

The snapshot buffers are a second copy of every large tensor of the checkpoint. Whether they
are kept from one save to the next (no allocation at the next save) or released once their
write is on disk (the memory is the training's again until the next save) is set by the
environment variable ``FUNNEL_CHECKPOINT_BUFFERS``:

- ``auto`` (the default): kept while the largest snapshot so far (last.ckpt's, with the
  moments) holds at most a quarter of the machine's memory (``MemTotal``, or the cgroup's
  memory limit when lower), released otherwise. A 40M-row table with Adam (8.6 GB) is released
  on a 32 GB machine and kept on a 64 GB one; the choice is logged once when it releases;
- ``keep``: always kept (the fastest saves; memory for two copies of the state for the whole
  run);
- ``release``: always released after the write (each save allocates its buffers afresh).

A released buffer is freed once its write is on disk and no later save is waiting for it: a save
that comes while the previous write is still pending reuses that write's buffers.

Either way a save holds the two copies while its write is pending; any other value is refused
with a message by ``funnel check`` and ``funnel fit`` (preflight.py) before any data is read.
Every write goes to ``.<name>.partial`` beside the file, is flushed to disk and then renamed:
a crash leaves the previous good file. A file that ModelCheckpoint drops (the previous best)
is removed only after the next full checkpoint, which no longer names it, is on disk. A failed
write stops all later ones and is raised, as :class:`CheckpointWriteError`, at the next save
or when fit ends; the run waits for its pending writes before fit returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.callbacks import ModelCheckpoint

from funnel.errors import UserError

log = logging.getLogger(__name__)

# what a weights-only checkpoint holds: every reader of best.ckpt needs only these
LEAN_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "state_dict")
PARTIAL = ".{name}.partial"  # the name a file is written under before its rename
_POOLED_BYTES = 1 << 16  # smaller tensors are cloned afresh at each save
BUFFERS_ENV = "FUNNEL_CHECKPOINT_BUFFERS"
BUFFER_MODES = ("auto", "keep", "release")
KEEP_SHARE = 0.25  # auto: snapshot buffers are kept while they hold at most this share of memory


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (the disk is full, the folder not writable...)."""


def lean(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The weights-only form of a Lightning checkpoint."""
    return {key: checkpoint[key] for key in LEAN_KEYS if key in checkpoint}


def is_lean(path: Path) -> bool:
    """Whether the checkpoint at ``path`` holds nothing beyond :data:`LEAN_KEYS` (read lazily)."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return isinstance(state, dict) and set(state) <= set(LEAN_KEYS)


def write_lean(src: Path, dst: Path) -> None:
    """Write the weights-only form of checkpoint ``src`` to ``dst`` (atomically)."""
    state = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    save_atomic(lean(state), dst)


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``.<name>.partial``, flushed to disk, then renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(PARTIAL.format(name=path.name))
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename itself on disk (not every file system opens folders)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class BestAndLast(ModelCheckpoint):
    """ModelCheckpoint whose top-k files hold the weights only (:data:`LEAN_KEYS`) and whose
    ``last.ckpt`` holds everything. It keeps ModelCheckpoint's state key, so runs interrupted
    before this class existed resume with their best so far."""

    def __init__(self, **kwargs: Any):
        super().__init__(save_last=True, enable_version_counter=False, **kwargs)

    @property
    def state_key(self) -> str:
        return "ModelCheckpoint" + repr(
            {
                "monitor": self.monitor,
                "mode": self.mode,
                "every_n_train_steps": self._every_n_train_steps,
                "every_n_epochs": self._every_n_epochs,
                "train_time_interval": self._train_time_interval,
            }
        )

    def _ModelCheckpoint__warn_if_dir_not_empty(self, dirpath: Any) -> None:
        """No warning: checkpoints/ belongs to the claimed run, and a resumed run's files are its own."""

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        # Lightning 2.6 writes last.ckpt only at a step that saved a top-k file: an epoch that did
        # not improve would then be trained again by --resume. Every epoch end saves it here.
        self._last_global_step_saved = trainer.global_step

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if filepath == self.last_model_path:  # _save_last_checkpoint sets it before saving
            super()._save_checkpoint(trainer, filepath)
            return
        weights = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "pytorch-lightning_version": pl.__version__,
            "state_dict": trainer.strategy.lightning_module_state_dict(),
        }
        trainer.strategy.save_checkpoint(weights, filepath)
        trainer.strategy.barrier("BestAndLast.save_weights")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath


class _Snapshots:
    """CPU copies of a checkpoint's tensors, in buffers that can be reused from one save to the next.

    A buffer belongs to a source tensor (its address, shape, stride and dtype): parameters
    and optimiser moments keep their storage for the whole run, so each save can copy into the
    buffers of the previous one. Saves of one training step (the best weights, then the full
    last.ckpt) share one copy while the first one's write holds it. ``keep``: the buffers stay
    after their writes (``_buffers``); else they live only as long as a pending write's snapshot
    refers to them (``_live`` finds them without holding them)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}  # held between saves (keep)
        self._live: weakref.WeakValueDictionary[tuple, torch.Tensor] = weakref.WeakValueDictionary()
        self.reused: list[torch.Tensor] = []  # release: the previous step's buffers, for this step
        self._copied: set[tuple] = set()  # keys copied in the current generation
        self._generation: Any = None

    def new_generation(self, generation: Any, keep: bool) -> bool:
        """Start the copies of another training step; True when it is another step."""
        if not keep:
            self._buffers = {}  # from now on the pending writes alone hold them
        if generation == self._generation:
            return False
        # released buffers whose writes are still pending: held for this step's saves, which
        # reuse them instead of letting the wait free them and allocating again (faulting in
        # 8.6 GB at 40M rows took ~20 s); the caller drops them after the step's last save
        self.reused = [] if keep else list(self._live.values())
        self._buffers = {k: v for k, v in self._buffers.items() if k in self._copied}  # drop unused
        self._copied = set()
        self._generation = generation
        return True

    def take(self, checkpoint: dict[str, Any], keep: bool) -> dict[str, Any]:
        return apply_to_collection(checkpoint, torch.Tensor, self._copy, keep=keep)

    def _copy(self, t: torch.Tensor, keep: bool) -> torch.Tensor:
        t = t.detach()
        if not _pooled(t):
            return t.clone().cpu()
        key = (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        buf = self._live.get(key)
        if buf is None:
            buf = self._live[key] = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            self._copied.discard(key)  # a released buffer: copy again
        if key not in self._copied:
            buf.copy_(t)
            self._copied.add(key)
        if keep:
            self._buffers[key] = buf
        return buf

    def clear(self) -> None:
        self._buffers, self._copied, self._generation, self.reused = {}, set(), None, []

    # the buffers are this process's cache: a pickled copy (ddp_spawn pickles the Trainer and its
    # plugins; a WeakValueDictionary cannot be pickled) starts empty
    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


def _pooled(t: torch.Tensor) -> bool:
    """Whether a tensor is copied into a reusable buffer (else cloned afresh at each save)."""
    return t.numel() * t.element_size() >= _POOLED_BYTES and not t.is_sparse and t.device.type != "meta"


def snapshot_bytes(checkpoint: dict[str, Any]) -> int:
    """The bytes of a checkpoint's tensors that a snapshot copies into buffers."""
    sizes: list[int] = []
    apply_to_collection(checkpoint, torch.Tensor, lambda t: sizes.append(t.numel() * t.element_size() * _pooled(t)))
    return sum(sizes)


def memory_limit_bytes() -> int | None:
    """This machine's memory (MemTotal), or its cgroup's limit when lower; None when unknown."""
    limits = []
    with contextlib.suppress(OSError, StopIteration, ValueError), open("/proc/meminfo") as f:
        limits.append(next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:")))
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            limits.append(int(Path(path).read_text().strip()))  # "max" (no limit): ValueError
    return min(limits) if limits else None


def buffer_mode(value: str | None = None) -> str:
    """``value``, else ``FUNNEL_CHECKPOINT_BUFFERS`` (default ``auto``), checked."""
    mode = (value if value is not None else os.environ.get(BUFFERS_ENV, "auto")).strip().lower() or "auto"
    if mode not in BUFFER_MODES:
        raise UserError(
            f"{BUFFERS_ENV}={mode!r}: expected one of {', '.join(BUFFER_MODES)} (auto keeps the checkpoint "
            "snapshot buffers between saves while they hold at most a quarter of the machine's memory)."
        )
    return mode


def keeps_buffers(mode: str, nbytes: int, memory: int | None) -> bool:
    """Whether snapshot buffers of ``nbytes`` are kept between saves under ``mode``."""
    if mode != "auto":
        return mode == "keep"
    return memory is None or nbytes <= KEEP_SHARE * memory


class BackgroundCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that snapshots in the caller's thread and writes in another.

    ``save_checkpoint`` returns once the tensors are copied; a save of a later training step
    first waits for the writes still pending (their buffers are reused). ``teardown`` (the
    end of fit, however it ends) waits for every write and frees the buffers.

    ``buffers``: ``auto``, ``keep`` or ``release`` (the module docstring); None reads
    ``FUNNEL_CHECKPOINT_BUFFERS``. ``memory``: the bytes ``auto`` compares with (None: this
    machine's, :func:`memory_limit_bytes`)."""

    def __init__(
        self,
        write: Callable[[Any, Path], None] | None = None,
        buffers: str | None = None,
        memory: int | None = None,
    ):
        super().__init__()
        self._write = write or save_atomic
        self.buffers = buffer_mode(buffers)
        self._memory = memory if memory is not None else memory_limit_bytes()
        self._said_release = False
        self._largest = 0  # bytes of the largest snapshot so far
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._removals: list[Path] = []
        self._snapshots = _Snapshots()
        self._failure: CheckpointWriteError | None = None
        self._reported = False
        self.blocked_s = 0.0  # time spent waiting for earlier writes (the stall they cause)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        self._raise_failure()
        generation = (checkpoint.get("epoch"), checkpoint.get("global_step"))
        if None in generation:  # not a Lightning checkpoint: nothing says the tensors are unchanged
            generation = object()
        keep = self._keeps(checkpoint)
        if self._snapshots.new_generation(generation, keep):
            self._wait()  # the buffers are about to be overwritten
        snapshot = self._snapshots.take(checkpoint, keep)
        if "optimizer_states" in checkpoint:  # last.ckpt, a step's last save: the pending writes alone hold them
            self._snapshots.reused = []
        self._submit(self._write_one, snapshot, Path(path))
        if "optimizer_states" in checkpoint and self._removals:  # the new state no longer names them
            removals, self._removals = self._removals, []
            self._submit(self._remove, removals)

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles the Trainer: no thread, no pending write
        self.wait()
        return {**self.__dict__, "_executor": None, "_pending": []}  # _Snapshots pickles empty itself

    def _keeps(self, checkpoint: dict[str, Any]) -> bool:
        # by the largest snapshot so far: the weights-only best file would pass where last.ckpt does not
        self._largest = nbytes = max(self._largest, snapshot_bytes(checkpoint))
        keep = keeps_buffers(self.buffers, nbytes, self._memory)
        if not keep and self.buffers == "auto" and not self._said_release:
            self._said_release = True
            log.info(
                "checkpoint: the snapshot buffers (%.1f GB) are more than a quarter of this machine's memory "
                "(%.1f GB): released after each write (%s=keep keeps them for faster saves)",
                nbytes / 1e9,
                (self._memory or 0) / 1e9,
                BUFFERS_ENV,
            )
        return keep

    def remove_checkpoint(self, path: Any) -> None:
        self._removals.append(Path(path))

    def wait(self) -> None:
        """Block until every pending write is on disk; raise the first failure."""
        if self._removals:
            removals, self._removals = self._removals, []
            self._submit(self._remove, removals)
        self._wait()
        self._raise_failure()

    def teardown(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._snapshots.clear()

    # ---- the writer thread ------------------------------------------------------------------

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="funnel-checkpoint")
        self._pending.append(self._executor.submit(fn, *args))

    def _write_one(self, snapshot: dict[str, Any], path: Path) -> None:
        if self._failure is not None:
            return  # an earlier write failed: write nothing after it
        try:
            self._write(snapshot, path)
        except BaseException as exc:  # noqa: BLE001  (reported in the training thread)
            self._failure = CheckpointWriteError(
                f"checkpoint: writing {path} failed ({type(exc).__name__}: {exc}); the file it would have "
                f"replaced, if any, is kept and nothing half-written is left. Free disk space (or fix the "
                f"folder's permissions), then continue with `funnel fit --resume {path.parent.parent}`."
            )

    def _remove(self, paths: list[Path]) -> None:
        if self._failure is not None:
            return  # the files that would have replaced them may be missing: keep them
        for path in paths:
            path.unlink(missing_ok=True)

    def _wait(self) -> None:
        if not self._pending:
            return
        start = time.perf_counter()
        for future in self._pending:
            future.result()
        self._pending = []
        self.blocked_s += time.perf_counter() - start

    def _raise_failure(self) -> None:
        if self._failure is not None and not self._reported:
            self._reported = True
            raise self._failure


def remove_partials(folder: Path) -> None:
    """Delete what a crash mid-write left behind (``.<name>.partial`` files)."""
    for path in folder.glob(PARTIAL.format(name="*")):
        path.unlink(missing_ok=True)
