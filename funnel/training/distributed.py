"""Which process does what when one run spans several processes (DDP).

One run directory, claimed once; the data prepared once; one writer, global rank 0. How the
other ranks learn where the run and its data are depends on who started them, as Lightning
tells launches apart:

- **One process**, and ``ddp_spawn`` / ``ddp_fork``: the process the user started owns the run.
  The workers Lightning starts inside ``trainer.fit`` get the data module with the Trainer and
  only train (Lightning writes the checkpoints from rank 0 alone).
- **Lightning's own launcher** (``strategy: ddp``, ``devices: N``, started by a plain
  ``funnel fit``): the process the user started is rank 0. It claims the run directory and
  prepares the data; then ``trainer.fit`` re-runs the command line for ranks 1..N-1, which
  inherit its environment. The run directory, the prepared data and the parent's process id
  are put there first (:func:`handed_to_children`); a child finds them (:attr:`Launch.handoff`)
  and never claims, prepares or writes.
- **An external launcher** (torchrun, SLURM's srun, or the same command run on every node with
  NODE_RANK set) starts every rank at once. Rank 0 claims and prepares; the others wait until
  ``run.json``, tagged with this launch's id, says where the prepared data is
  (:func:`wait_for_owner`). Independent processes cannot agree on a timestamp, so the default
  run directory is named by the job's id (torchrun's run id, SLURM's job id), else ``run_dir``
  must be given.

A rank that fails records it in ``run.json`` (status "failed", the error, its rank) unless
another rank did first: the launchers kill the other ranks at once, the owner among them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from funnel.claim import LOCK
from funnel.errors import UserError
from funnel.runs import CONFIG, MANIFEST, read_manifest, write_manifest
from funnel.spec.schema import Config

log = logging.getLogger(__name__)

# what a parent launching its ranks with Lightning hands to them through the environment
HANDOFF_RUN_DIR = "FUNNEL_DDP_RUN_DIR"
HANDOFF_PREPARED = "FUNNEL_DDP_PREPARED"
HANDOFF_PARENT = "FUNNEL_DDP_PARENT"
WAIT_ENV = "FUNNEL_DDP_WAIT_S"  # how long ranks wait for rank 0 to prepare the data
DEFAULT_WAIT_S = 3600.0
PREPARED = "prepared"  # the run-local prepared data (synthetic data, data.cache: false)
# what gloo and NCCL say when the other end of a collective went away
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")
# environment variables that are equal on every rank of one launch, and differ between launches
_LAUNCH_KEYS = (
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@dataclass(frozen=True)
class Handoff:
    """The run directory and the prepared data, as a child rank inherits them."""

    run_dir: Path
    prepared: Path


@dataclass(frozen=True)
class Launch:
    """How this process takes part in the run."""

    world_size: int
    rank: int  # global rank
    nodes: int  # trainer.num_nodes
    launches_ranks: bool  # trainer.fit in this process starts other ranks (Lightning's launchers)
    in_process: bool  # those ranks are ddp_spawn/ddp_fork workers: this process is no rank itself
    launch_id: str  # equal on all ranks of this launch ("" for one process)
    job_id: str | None  # the scheduler's id of this job, which names a default run_dir
    handoff: Handoff | None = None  # set in a child of Lightning's launcher

    @property
    def distributed(self) -> bool:
        """Several processes each run this command (so they must agree on the run)."""
        return self.world_size > 1 and not self.in_process

    @property
    def follower(self) -> bool:
        """A rank other than 0: it neither claims, prepares nor writes."""
        return self.distributed and self.rank != 0

    @property
    def independent(self) -> bool:
        """Some ranks start independently of this process (an external launcher, or the parent
        on another node): they find the run by its name and rank 0's run.json."""
        return self.distributed and self.handoff is None and (not self.launches_ranks or self.nodes > 1)


SINGLE = Launch(world_size=1, rank=0, nodes=1, launches_ranks=False, in_process=False, launch_id="", job_id=None)


def detect(cfg: Config) -> Launch:
    """This process's part, from the Trainer that ``cfg.trainer`` makes (Lightning decides the
    strategy, the world size and the cluster environment; nothing is launched here)."""
    import pytorch_lightning as pl
    from lightning_fabric.plugins.environments import LightningEnvironment
    from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher

    from funnel.training.trainer_args import quiet_lightning

    fixed = {"logger": False, "enable_checkpointing": False, "callbacks": None, "enable_model_summary": False}
    with quiet_lightning():
        trainer = pl.Trainer(**{**cfg.trainer.kwargs, **fixed})
    strategy = trainer.strategy
    env = getattr(strategy, "cluster_environment", None)
    if trainer.world_size == 1 or env is None:
        return SINGLE
    if env.creates_processes_externally and not isinstance(env, LightningEnvironment):
        _check_world(env, strategy)
    if isinstance(env, LightningEnvironment):  # its global rank is only set inside trainer.fit
        rank = env.node_rank() * strategy.num_processes + env.local_rank()
    else:
        rank = env.global_rank()
    launcher = strategy.launcher
    return Launch(
        world_size=trainer.world_size,
        rank=rank,
        nodes=strategy.num_nodes,
        launches_ranks=not env.creates_processes_externally,
        in_process=isinstance(launcher, _MultiProcessingLauncher),
        launch_id=" ".join(f"{k}={os.environ[k]}" for k in _LAUNCH_KEYS if k in os.environ),
        job_id=job_id(),
        handoff=_inherited(),
    )


def _check_world(env, strategy) -> None:
    """torchrun / srun started as many processes as trainer.devices x trainer.num_nodes say."""
    try:
        env.validate_settings(num_devices=strategy.num_processes, num_nodes=strategy.num_nodes)
    except (ValueError, RuntimeError) as exc:
        raise UserError(
            f"trainer.devices / trainer.num_nodes: {strategy.num_processes} x {strategy.num_nodes} do not match the "
            f"processes the launcher started ({exc}). Set trainer.devices to the processes per node "
            "(torchrun --nproc_per_node, srun --ntasks-per-node) and trainer.num_nodes to the nodes."
        ) from None
    if env.world_size() != strategy.num_processes * strategy.num_nodes:
        raise UserError(
            f"trainer.devices x trainer.num_nodes = {strategy.num_processes} x {strategy.num_nodes}, but the "
            f"launcher started {env.world_size()} processes (WORLD_SIZE). Set trainer.devices to the processes "
            "per node (torchrun --nproc_per_node, srun --ntasks-per-node) and trainer.num_nodes to the nodes."
        )


def job_id() -> str | None:
    """The scheduler's id of this job: torchrun's rendezvous id (unless "none"), else SLURM's
    job (and step) id; None when neither says."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return "torchrun-" + _safe(run_id)
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        step = os.environ.get("SLURM_STEP_ID")
        return "slurm-" + _safe(job + (f".{step}" if step else ""))
    return None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _inherited() -> Handoff | None:
    """The handoff of the parent that launched this process, if it is one of Lightning's ranks.
    Variables left by another process (not this one's parent) are not ours: ignored."""
    parent = os.environ.get(HANDOFF_PARENT)
    if parent is None or "LOCAL_RANK" not in os.environ:
        return None
    if parent != str(os.getppid()):
        log.debug("ignoring %s=%s: not this process's parent", HANDOFF_PARENT, parent)
        return None
    return Handoff(Path(os.environ[HANDOFF_RUN_DIR]), Path(os.environ[HANDOFF_PREPARED]))


def shared_run_dir(cfg: Config, config_path: str | Path, launch: Launch) -> str | None:
    """The run directory all ranks agree on: ``cfg.run_dir``, or under an external launcher the
    job's folder runs/<config stem>/<job id>; None: the owner picks a timestamped default."""
    if cfg.run_dir is not None or not launch.independent:
        return cfg.run_dir
    if launch.job_id is None:
        raise UserError(
            f"run_dir: the {launch.world_size} ranks of this launch start independently and cannot agree on a "
            "default runs/<config stem>/<timestamp> folder, and the launcher gives no job id to name one "
            "(torchrun's --rdzv-id, SLURM_JOB_ID). Pass run_dir=PATH on a filesystem every node sees, "
            "for example `funnel fit CONFIG run_dir=/shared/runs/exp1`."
        )
    return str(Path("runs") / Path(config_path).stem / launch.job_id)


def prepared_entry(run_dir: Path, prepared: Path) -> str:
    """How run.json names the prepared data: relative to the run when inside it (nodes may mount
    the shared filesystem at different paths), else the absolute cache entry."""
    try:
        return str(prepared.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(prepared.resolve())


def wait_for_owner(run_dir: Path, launch: Launch, resume: bool = False, poll_s: float = 0.2) -> Path:
    """Wait until rank 0 of this launch has claimed ``run_dir`` and prepared the data; return the
    prepared data's folder. Fails with rank 0's error when it records one, and when it does not
    come within $FUNNEL_DDP_WAIT_S seconds."""
    timeout = _wait_seconds()
    deadline = time.monotonic() + timeout
    seen = False
    while True:
        manifest = read_manifest(run_dir)
        if manifest.get("launch") == launch.launch_id:
            seen = True
            if manifest.get("status") in ("failed", "interrupted"):
                raise UserError(f"rank {manifest.get('failed_rank', 0)} failed: {manifest.get('error')}")
            if manifest.get("prepared"):
                return _located(run_dir, manifest["prepared"])
        elif seen:
            raise UserError(
                f"rank 0 gave up the run {run_dir} before training (its own output says why); nothing was trained."
            )
        elif manifest and not resume and (run_dir / CONFIG).is_file():  # another launch's run: rank 0 refuses it
            raise UserError(
                f"run_dir: {str(run_dir)!r} already exists and is not empty; funnel never overwrites a run. "
                "Choose a new run_dir."
            )
        if time.monotonic() > deadline:
            raise UserError(
                f"rank {launch.rank}: rank 0 did not prepare the run {run_dir} within {timeout:g} s. Is run_dir on a "
                f"filesystem every node sees? Did rank 0 fail (see its output)? Data that takes longer to prepare: "
                f"run `funnel prepare CONFIG` first, or raise {WAIT_ENV}."
            )
        time.sleep(poll_s)


def _wait_seconds() -> float:
    raw = os.environ.get(WAIT_ENV)
    if raw is None:
        return DEFAULT_WAIT_S
    try:
        return float(raw)
    except ValueError:
        raise UserError(f"{WAIT_ENV}: {raw!r} is not a number of seconds; give e.g. {WAIT_ENV}=7200.") from None


def _located(run_dir: Path, entry: str) -> Path:
    path = Path(entry) if Path(entry).is_absolute() else run_dir / entry
    if not path.is_dir():
        raise UserError(
            f"rank 0 prepared the data in {path}, which this process does not see. Give data.cache_dir (or "
            "FUNNEL_CACHE_DIR) a folder every node sees, or set data.cache: false to prepare it inside run_dir."
        )
    return path


@contextlib.contextmanager
def handed_to_children(run_dir: Path, prepared: Path) -> Iterator[None]:
    """Put the run and its prepared data where the ranks this process's ``trainer.fit`` starts
    will find them (they inherit os.environ); taken away again afterwards."""
    values = {
        HANDOFF_RUN_DIR: str(run_dir.resolve()),
        HANDOFF_PREPARED: str(prepared.resolve()),
        HANDOFF_PARENT: str(os.getpid()),
    }
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def record_failure(run_dir: Path, launch: Launch, exc: BaseException) -> None:
    """Write this rank's failure into run.json unless another rank's is there already (the
    first is the cause; the rest follow from it). A rank other than 0 also frees the run: the
    launcher kills the owner at once, before it could."""
    if not (run_dir / MANIFEST).is_file():  # rank 0 removed the run (it failed before training)
        return
    if read_manifest(run_dir).get("status") in ("failed", "interrupted"):
        return
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    write_manifest(run_dir, status=status, error=f"{type(exc).__name__}: {exc}"[:500], failed_rank=launch.rank)
    if launch.rank != 0:
        (run_dir / LOCK).unlink(missing_ok=True)


def peer_failure(run_dir: Path, launch: Launch, exc: BaseException, grace_s: float = 2.0) -> UserError | None:
    """When this rank failed because another one did, that rank's recorded error, to report
    instead of the traceback of a collective that lost its peer; None when this rank's own
    error is the one to show."""
    import torch.distributed as dist

    if not launch.distributed or isinstance(exc, (UserError, KeyboardInterrupt)):
        return None
    lost = isinstance(exc, dist.DistError) or any(text in str(exc) for text in _LOST_PEER)
    # the failed rank writes run.json before it exits and its sockets close: give it a moment
    deadline = time.monotonic() + (grace_s if lost else 0.0)
    while True:
        manifest = read_manifest(run_dir)
        if manifest.get("status") == "failed" and manifest.get("failed_rank") not in (None, launch.rank):
            return UserError(f"rank {manifest['failed_rank']} failed: {manifest.get('error')}")
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if not lost:
        return None
    return UserError(
        f"rank {launch.rank}: lost the connection to another rank, which stopped without recording why "
        f"(killed? out of memory?); its own output may say more. ({str(exc).strip()[:200]})"
    )


def stop_children(trainer) -> None:
    """Kill the ranks Lightning's launcher started from this process: after the owner failed they
    would wait in their next collective until its timeout."""
    from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if not isinstance(launcher, _SubprocessScriptLauncher) or not launcher.procs:
        return
    # Lightning's watcher thread holds this very list and kills this process (SIGKILL) when it
    # finds a child that exited non-zero: empty it first, so that this process may finish
    # recording its failure and exit with its own error
    procs = list(launcher.procs)
    launcher.procs.clear()
    for proc in procs:
        proc.kill()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def quiet_follower(launch: Launch) -> None:
    """Ranks other than 0 log errors only: rank 0 says everything once."""
    if launch.follower:
        logging.getLogger("funnel").setLevel(logging.ERROR)


def is_global_zero() -> bool:
    """This process is global rank 0 (or the only one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"))
