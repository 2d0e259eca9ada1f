"""Lean checkpoints written in the background (funnel/training/checkpointing.py): best.ckpt is
the best epoch's weights alone, last.ckpt everything --resume needs, and a write never leaves
a half-written file nor stalls on a copy the trainer is still changing."""

from __future__ import annotations

import errno
import os
import threading
import time
import weakref
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from funnel.errors import UserError
from funnel.runs import BEST, LAST
from funnel.spec import config_from_dict
from funnel.training import checkpointing
from funnel.training import fit as fit_module
from funnel.training.checkpointing import LEAN_KEYS, BackgroundCheckpointIO, CheckpointWriteError

# a metric that falls over these three epochs (0.90, 0.86, 0.86), ranked highest first: the
# "best" epoch is the first, not the last (an AUC ranked lowest first is refused by validation)
MONITOR = "val/calib/click"


class _Recorder(pl.Callback):
    """Each epoch's monitored score and weights, at the validation end where they are saved."""

    def __init__(self) -> None:
        self.epochs: dict[int, tuple[float, dict[str, torch.Tensor]]] = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            score = float(trainer.callback_metrics[MONITOR])
            weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.epochs[trainer.current_epoch] = (score, weights)


def _fit(make_config, run_dir: Path, **trainer) -> _Recorder:
    raw = make_config(run_dir)
    raw["data"]["cache"] = False
    raw["trainer"].update(trainer)
    recorder = _Recorder()
    with fit_module.extra_callbacks(recorder):
        fit_module.fit_config(config_from_dict(raw))
    return recorder


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _weight_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


@pytest.fixture(scope="module")
def three_epochs(make_config, tmp_path_factory):
    """Three epochs ranked by the highest calibration ratio: the "best" is the first, not the last."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    recorder = _fit(make_config, run, max_epochs=3, monitor=MONITOR, mode="max")
    return run, recorder


@pytest.fixture(scope="module")
def one_epoch(make_config, tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt1") / "run"
    return run, _fit(make_config, run)


def test_best_ckpt_holds_the_weights_only_and_last_ckpt_everything_resume_needs(three_epochs):
    run, _ = three_epochs
    best, last = _load(run / BEST), _load(run / LAST)
    assert set(best) == set(LEAN_KEYS)
    assert "optimizer_states" not in best and "loops" not in best and "callbacks" not in best
    assert {"optimizer_states", "loops", "callbacks", "lr_schedulers"} <= set(last)
    assert last["epoch"] == 2 and best["epoch"] == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_best_ckpt_is_the_weights_of_the_best_epoch_as_they_were_then(three_epochs):
    run, recorder = three_epochs
    scores = {epoch: score for epoch, (score, _) in recorder.epochs.items()}
    best_epoch = max(scores, key=scores.get)  # mode max
    assert best_epoch == 0 and len(scores) == 3  # the seeded run's AUC rises: the first epoch is "best"
    saved = _load(run / BEST)
    assert saved["epoch"] == best_epoch
    expected = recorder.epochs[best_epoch][1]
    assert saved["state_dict"].keys() == expected.keys()
    assert all(torch.equal(saved["state_dict"][k], expected[k]) for k in expected)
    last = _load(run / LAST)["state_dict"]  # and last.ckpt the final epoch's, not the best's
    final = recorder.epochs[2][1]
    assert all(torch.equal(last[k], final[k]) for k in final)
    assert not all(torch.equal(last[k], expected[k]) for k in expected)


def test_last_ckpt_records_the_best_so_far_for_a_resume(three_epochs):
    run, recorder = three_epochs
    state = next(v for k, v in _load(run / LAST)["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert Path(state["best_model_path"]).name == "epoch0.ckpt"
    assert float(state["best_model_score"]) == pytest.approx(recorder.epochs[0][0])


class _Crash(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 2 and batch_idx == 3:
            raise RuntimeError("the machine went away")


def test_a_run_resumed_after_a_crash_keeps_the_best_so_far(three_epochs, make_config, tmp_path):
    """Crashed in its third epoch (the best was the first), resumed from last.ckpt of the second
    epoch (written although that epoch did not improve): the same best.ckpt and metrics."""
    whole, _ = three_epochs
    raw = make_config(tmp_path / "run")
    raw["data"]["cache"] = False
    raw["trainer"].update(max_epochs=3, monitor=MONITOR, mode="max")
    with fit_module.extra_callbacks(_Crash()), pytest.raises(RuntimeError, match="went away"):
        fit_module.fit_config(config_from_dict(raw))
    run = tmp_path / "run"
    assert _load(run / LAST)["epoch"] == 1 and (run / "checkpoints" / "epoch0.ckpt").is_file()
    recorder = _Recorder()
    with fit_module.extra_callbacks(recorder):
        fit_module.resume(run)
    assert list(recorder.epochs) == [2]  # only the epoch it was in was trained again
    best, expected = _load(run / BEST), _load(whole / BEST)
    assert best["epoch"] == 0 and all(torch.equal(best["state_dict"][k], v) for k, v in expected["state_dict"].items())
    assert (run / "metrics.json").read_text() == (whole / "metrics.json").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_a_run_whose_last_epoch_is_best_keeps_the_weights_once_beside_last_ckpt(one_epoch):
    """ "One copy": best.ckpt is the weights (plus a few hundred bytes of zip framing) and
    last.ckpt is what --resume needs (weights + Adam's two moments + loop state); nothing else
    is on disk, and best.ckpt is not last.ckpt under a second name."""
    run, _ = one_epoch
    files = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in files] == ["best.ckpt", "last.ckpt"]
    best, last = run / BEST, run / LAST
    assert best.stat().st_ino != last.stat().st_ino
    weights = _weight_bytes(_load(best)["state_dict"])
    assert weights < best.stat().st_size < weights + 64 * 1024
    moments = sum(
        t.numel() * t.element_size()
        for opt in _load(last)["optimizer_states"]
        for state in opt["state"].values()
        for t in state.values()
        if torch.is_tensor(t)
    )
    assert moments == pytest.approx(2 * weights, rel=0.05)  # Adam: exp_avg and exp_avg_sq of every weight
    assert weights + moments < last.stat().st_size < weights + moments + 256 * 1024
    assert _load(best)["global_step"] == _load(last)["global_step"]


# ---- the background writer ---------------------------------------------------------------------


def _checkpoint(step: int, w: torch.Tensor, full: bool = True) -> dict:
    ckpt = {"epoch": 0, "global_step": step, "state_dict": {"w": w}}
    return {**ckpt, "optimizer_states": [{"state": {}, "param_groups": []}]} if full else ckpt


def test_the_snapshot_is_taken_at_save_time_and_its_buffer_reused(tmp_path, monkeypatch):
    monkeypatch.delenv(checkpointing.BUFFERS_ENV, raising=False)  # auto: 400 kB is kept on any machine
    gate, written = threading.Event(), []

    def slow_write(obj, path):
        gate.wait(10)
        checkpointing.save_atomic(obj, path)
        written.append(path)

    io = BackgroundCheckpointIO(write=slow_write)
    w = torch.arange(100_000, dtype=torch.float32)  # 400 kB: pooled, not cloned
    io.save_checkpoint(_checkpoint(1, w), tmp_path / "a.ckpt")
    w.add_(1)  # training goes on while the file is written
    gate.set()
    io.wait()
    assert torch.equal(_load(tmp_path / "a.ckpt")["state_dict"]["w"], torch.arange(100_000, dtype=torch.float32))
    buffers = list(io._snapshots._buffers.values())
    io.save_checkpoint(_checkpoint(2, w), tmp_path / "b.ckpt")
    io.save_checkpoint(_checkpoint(2, w, full=False), tmp_path / "c.ckpt")  # same step: the same copy
    assert list(io._snapshots._buffers.values())[0].data_ptr() == buffers[0].data_ptr()
    io.teardown()
    assert written == [tmp_path / "a.ckpt", tmp_path / "b.ckpt", tmp_path / "c.ckpt"]
    assert torch.equal(_load(tmp_path / "c.ckpt")["state_dict"]["w"], w)
    assert io._snapshots._buffers == {}  # freed when fit ends


def _gone(ref: weakref.ref, timeout: float = 5.0) -> bool:
    """Whether the object behind ``ref`` is freed (the writer thread drops its snapshot just after the write)."""
    deadline = time.monotonic() + timeout
    while ref() is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    return ref() is None


def test_snapshot_buffers_large_for_the_memory_are_released_once_written(tmp_path, monkeypatch):
    """auto: 400 kB of buffers against 1 MB of memory (more than a quarter): released after the
    write, so the memory is free between saves; saves of one step still share one copy."""
    monkeypatch.delenv(checkpointing.BUFFERS_ENV, raising=False)
    gate = threading.Event()

    def slow_write(obj, path):
        gate.wait(10)
        checkpointing.save_atomic(obj, path)

    io = BackgroundCheckpointIO(write=slow_write, memory=1_000_000)
    assert io.buffers == "auto"
    w = torch.arange(100_000, dtype=torch.float32)  # 400 kB
    io.save_checkpoint(_checkpoint(1, w, full=False), tmp_path / "best.ckpt")
    io.save_checkpoint(_checkpoint(1, w), tmp_path / "last.ckpt")  # same step, write pending: same copy
    (buf,) = io._snapshots._live.values()
    assert io._snapshots._buffers == {}  # held by the pending writes only
    ref = weakref.ref(buf)
    del buf
    w.add_(1)
    gate.set()
    io.wait()
    assert _gone(ref)  # released: no copy of the checkpoint between saves
    for name in ("best.ckpt", "last.ckpt"):
        assert torch.equal(_load(tmp_path / name)["state_dict"]["w"], torch.arange(100_000, dtype=torch.float32))
    io.save_checkpoint(_checkpoint(2, w), tmp_path / "last.ckpt")  # the next step: a fresh buffer, new values
    io.teardown()
    assert torch.equal(_load(tmp_path / "last.ckpt")["state_dict"]["w"], w)


@pytest.mark.parametrize(("env", "memory", "kept"), [("keep", 1_000_000, True), ("release", 10**12, False)])
def test_the_environment_keeps_or_releases_snapshot_buffers_whatever_the_size(tmp_path, monkeypatch, env, memory, kept):
    monkeypatch.setenv(checkpointing.BUFFERS_ENV, env)
    io = BackgroundCheckpointIO(memory=memory)
    w = torch.zeros(100_000)  # 400 kB: above a quarter of 1 MB, far below a quarter of 1 TB
    io.save_checkpoint(_checkpoint(1, w), tmp_path / "last.ckpt")
    (buf,) = io._snapshots._live.values()
    ref = weakref.ref(buf)
    del buf
    io.wait()
    if kept:
        assert list(io._snapshots._buffers.values()) == [ref()]
    else:
        assert io._snapshots._buffers == {} and _gone(ref)
    io.teardown()
    assert io._snapshots._buffers == {} and _gone(ref)  # fit's end frees them either way


def test_saves_that_wait_for_a_pending_write_reuse_its_released_buffers(tmp_path, monkeypatch):
    """release: the next step's saves (best weights, then last.ckpt), waiting for the previous
    write, copy into that write's buffers instead of letting them go and allocating others;
    they are freed once the last write is done."""
    monkeypatch.setenv(checkpointing.BUFFERS_ENV, "release")
    gate = threading.Event()

    def slow_write(obj, path):
        gate.wait(10)
        checkpointing.save_atomic(obj, path)

    def full(step, w, m):
        return {**_checkpoint(step, w), "optimizer_states": [{"state": {0: {"exp_avg": m}}, "param_groups": []}]}

    io = BackgroundCheckpointIO(write=slow_write)
    w, m = torch.arange(100_000, dtype=torch.float32), torch.ones(100_000)
    io.save_checkpoint(full(1, w, m), tmp_path / "last.ckpt")
    first = [weakref.ref(b) for b in io._snapshots._live.values()]
    w.add_(1)
    m.add_(1)
    threading.Timer(0.2, gate.set).start()  # the first write ends while the next save waits for it
    io.save_checkpoint(_checkpoint(2, w, full=False), tmp_path / "best.ckpt")  # weights only
    io.save_checkpoint(full(2, w, m), tmp_path / "last.ckpt")  # the moments' buffer too: reused
    assert {id(b) for b in io._snapshots._live.values()} == {id(r()) for r in first}  # never freed
    assert io._snapshots._buffers == {} and io._snapshots.reused == []
    io.wait()
    assert all(_gone(r) for r in first)
    saved = _load(tmp_path / "last.ckpt")
    assert torch.equal(saved["state_dict"]["w"], w)
    assert torch.equal(saved["optimizer_states"][0]["state"][0]["exp_avg"], m)
    assert torch.equal(_load(tmp_path / "best.ckpt")["state_dict"]["w"], w)
    io.teardown()


def test_auto_decides_by_the_largest_snapshot_so_far(tmp_path, monkeypatch):
    """A weights-only save small enough to keep, then a full one too large: released from then on,
    the next step's small save included (its buffers would only be dropped at the full save)."""
    monkeypatch.delenv(checkpointing.BUFFERS_ENV, raising=False)
    io = BackgroundCheckpointIO(memory=1_000_000)
    small, large = torch.zeros(50_000), torch.zeros(100_000)  # 200 kB (a fifth of 1 MB), 400 kB
    io.save_checkpoint(_checkpoint(1, small, full=False), tmp_path / "best.ckpt")
    io.wait()
    assert len(io._snapshots._buffers) == 1  # kept: 200 kB is under a quarter
    io.save_checkpoint({**_checkpoint(1, small), "optimizer_states": [{"state": {0: {"m": large}}}]}, tmp_path / "l")
    io.save_checkpoint(_checkpoint(2, small, full=False), tmp_path / "best.ckpt")
    io.wait()
    assert io._snapshots._buffers == {}
    io.teardown()


def test_auto_keeps_a_40m_row_tables_snapshot_on_64_gb_and_releases_it_on_32_gb():
    state = 39_999_989 * 18 * 4 * 3  # weights and Adam's two moments: 8.64 GB
    assert not checkpointing.keeps_buffers("auto", state, 32 * 2**30)  # 8.64 > 8.59 GB, a quarter
    assert checkpointing.keeps_buffers("auto", state, 64 * 2**30)
    assert checkpointing.keeps_buffers("auto", state, None)  # memory unknown: as before
    assert not checkpointing.keeps_buffers("release", 1, 64 * 2**30) and checkpointing.keeps_buffers("keep", state, 1)


def test_a_bad_checkpoint_buffers_value_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv(checkpointing.BUFFERS_ENV, "sometimes")
    with pytest.raises(UserError, match=r"FUNNEL_CHECKPOINT_BUFFERS='sometimes': expected one of auto, keep, release"):
        BackgroundCheckpointIO()
    monkeypatch.setenv(checkpointing.BUFFERS_ENV, " Release ")
    assert BackgroundCheckpointIO().buffers == "release"


def test_a_dropped_checkpoint_goes_only_after_the_next_full_one_is_written(tmp_path):
    old = tmp_path / "epoch0.ckpt"
    old.write_bytes(b"old best")
    io = BackgroundCheckpointIO()
    w = torch.zeros(10)
    io.save_checkpoint(_checkpoint(5, w, full=False), tmp_path / "epoch1.ckpt")
    io.remove_checkpoint(old)
    io._wait()  # the new best is written, the old one still there: last.ckpt names it
    assert old.exists()
    io.save_checkpoint(_checkpoint(5, w), tmp_path / "last.ckpt")
    io.teardown()
    assert not old.exists() and (tmp_path / "epoch1.ckpt").is_file()


def test_a_failed_write_keeps_the_old_file_leaves_no_partial_and_says_what_to_do(tmp_path, monkeypatch):
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"the previous good checkpoint")
    old_best = run / "checkpoints" / "epoch0.ckpt"
    old_best.write_bytes(b"old best")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # the bytes went out, the flush to disk fails
    io = BackgroundCheckpointIO()
    io.remove_checkpoint(old_best)
    io.save_checkpoint(_checkpoint(7, torch.ones(50_000)), last)
    with pytest.raises(CheckpointWriteError) as caught:
        io.wait()
    message = str(caught.value)
    assert str(last) in message and "No space left on device" in message
    assert "is kept" in message and f"funnel fit --resume {run}" in message
    assert last.read_bytes() == b"the previous good checkpoint"
    assert old_best.read_bytes() == b"old best"  # the failed state never replaced it
    assert sorted(p.name for p in last.parent.iterdir()) == ["epoch0.ckpt", "last.ckpt"]
    monkeypatch.undo()
    io.save_checkpoint(_checkpoint(8, torch.ones(3)), last)  # after a failure nothing more is written
    io.teardown()  # and the failure is raised once
    assert last.read_bytes() == b"the previous good checkpoint"


def test_a_failed_write_stops_fit_with_the_message(make_config, tmp_path, monkeypatch):
    def refuse(obj, path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(checkpointing, "save_atomic", refuse)
    with pytest.raises(CheckpointWriteError, match="Permission denied"):
        _fit(make_config, tmp_path / "run", max_epochs=2)
    assert not (tmp_path / "run" / BEST).exists()


def test_keep_one_best_strips_a_full_checkpoint_to_the_weights(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    full = {"epoch": 1, "global_step": 20, "state_dict": {"w": torch.ones(3)}, "optimizer_states": [{}], "loops": {}}
    torch.save(full, tmp_path / "checkpoints" / "epoch1.ckpt")
    torch.save(full, tmp_path / LAST)
    (tmp_path / "checkpoints" / ".last.ckpt.partial").write_bytes(b"half")  # a crash's leftover
    fit_module._keep_one_best(tmp_path / "checkpoints" / "epoch1.ckpt", tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    best = _load(tmp_path / BEST)
    assert set(best) == {"epoch", "global_step", "state_dict"} and torch.equal(best["state_dict"]["w"], torch.ones(3))
    assert "optimizer_states" in _load(tmp_path / LAST)


def test_a_bad_checkpoint_buffers_value_stops_check_and_fit_before_the_data(
    monkeypatch, tmp_path, make_config, write_config
):
    from tests.test_cli import run_cli

    monkeypatch.setenv(checkpointing.BUFFERS_ENV, "sometimes")
    cfg = make_config(tmp_path / "run")
    cfg["data"]["train"] = str(tmp_path / "absent.csv")  # never read: the environment is refused first
    path = str(write_config(cfg))
    for command in (["check", path], ["fit", path]):
        code, _, err = run_cli(command)
        assert code == 2 and "FUNNEL_CHECKPOINT_BUFFERS='sometimes'" in err and "absent.csv" not in err, command
    assert not (tmp_path / "run").exists()


def test_the_checkpoint_io_pickles_for_ddp_spawn_with_its_buffers_left_behind(tmp_path):
    import pickle

    io = BackgroundCheckpointIO()
    w = torch.zeros(50_000)  # large enough for a pooled snapshot buffer
    io.save_checkpoint(_checkpoint(1, w, full=False), tmp_path / "epoch1.ckpt")
    io._wait()
    copy = pickle.loads(pickle.dumps(io))  # what ddp_spawn does to the Trainer's plugins
    assert copy.buffers == io.buffers and copy._pending == [] and copy._executor is None
    assert copy._snapshots._buffers == {} and len(copy._snapshots._live) == 0
    copy.save_checkpoint(_checkpoint(2, w, full=False), tmp_path / "epoch2.ckpt")
    copy._wait()
    assert (tmp_path / "epoch2.ckpt").is_file()
