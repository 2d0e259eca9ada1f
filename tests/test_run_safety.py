"""Nothing lost, no half-made run: claims, atomic outputs, interrupts, internal errors, the monitor."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from funnel.atomic import atomic_path, write_text
from funnel.claim import LOCK, claim_existing, claim_new
from funnel.data.io import TableWriter
from funnel.errors import UserError
from tests.test_cli import run_cli


# ---- atomic outputs ------------------------------------------------------------------------------------
def test_a_failed_write_leaves_the_earlier_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("earlier")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk gone")
    assert target.read_text() == "earlier"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_failed_write_removes_the_folders_it_made(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "a" / "b" / "out.csv") as tmp:
        tmp.write_text("x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_complete_write_replaces_the_file(tmp_path):
    write_text(tmp_path / "x.txt", "old")
    write_text(tmp_path / "x.txt", "new")
    assert (tmp_path / "x.txt").read_text() == "new" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_writer_failing_midway_keeps_the_earlier_output(tmp_path, suffix):
    out = tmp_path / f"p{suffix}"
    out.write_bytes(b"complete earlier predictions")
    with pytest.raises(ValueError), TableWriter(out) as writer:
        writer.write(pd.DataFrame({"p": [0.1, 0.2]}))
        raise ValueError("bad row 250")
    assert out.read_bytes() == b"complete earlier predictions"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


# ---- claiming run directories ---------------------------------------------------------------------------
def test_default_run_dirs_in_the_same_second_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt: "20261201-120000")
    claims = [claim_new(None, "configs/esmm.yaml") for _ in range(3)]
    assert [c.path.name for c in claims] == ["20261201-120000", "20261201-120000-1", "20261201-120000-2"]
    assert all((c.path / LOCK).is_file() for c in claims)


def test_an_explicit_run_dir_is_claimed_once(tmp_path):
    first = claim_new(str(tmp_path / "run"), "c.yaml")
    with pytest.raises(UserError, match="in use by another funnel process"):
        claim_new(str(tmp_path / "run"), "c.yaml")
    (first.path / "config.yaml").write_text("x")
    first.release()
    with pytest.raises(UserError, match="not empty"):
        claim_new(str(tmp_path / "run"), "c.yaml")


def test_discarding_a_claim_removes_what_it_wrote_but_not_a_folder_it_found(tmp_path):
    made = claim_new(str(tmp_path / "new"), "c.yaml")
    (made.path / "config.yaml").write_text("x")
    made.discard()
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    found = claim_new(str(tmp_path / "empty"), "c.yaml")
    (found.path / "checkpoints").mkdir()
    found.discard()
    assert (tmp_path / "empty").is_dir() and list((tmp_path / "empty").iterdir()) == []


def test_the_lock_of_a_killed_process_is_taken_over_but_a_live_one_is_not(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK).write_text(f"{socket.gethostname()} {dead.pid}\n")
    claim = claim_existing(run)
    assert (run / LOCK).read_text().split()[1] == str(os.getpid())
    claim.release()
    (run / LOCK).write_text(f"{socket.gethostname()} {os.getppid()}\n")
    with pytest.raises(UserError, match=str(os.getppid())):
        claim_existing(run)


# ---- real processes -------------------------------------------------------------------------------------
def _popen(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "funnel", "-q", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.fixture
def config_file(make_config, tmp_path) -> Path:
    cfg = make_config(tmp_path / "shared-run")
    cfg["data"]["cache"] = False
    path = tmp_path / "esmm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_fits_into_one_run_dir_at_once_one_wins_and_the_other_is_refused(config_file, tmp_path):
    procs = [_popen(["fit", str(config_file), f"seed={s}"], tmp_path) for s in (1, 2)]
    results = [_finish(p) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, _, err in results if code == 2)
    assert "run_dir" in loser and "Traceback" not in loser
    winner_seed = 1 + [code for code, _, _ in results].index(0)
    saved = yaml.safe_load((tmp_path / "shared-run" / "config.yaml").read_text())
    assert saved["seed"] == winner_seed  # the config beside the checkpoint is the winner's own
    assert json.loads((tmp_path / "shared-run" / "run.json").read_text())["status"] == "complete"


def test_two_fits_with_default_run_dirs_in_the_same_second_get_two_folders(config_file, tmp_path):
    cfg = yaml.safe_load(config_file.read_text())
    del cfg["run_dir"]
    config_file.write_text(yaml.safe_dump(cfg))
    procs = [_popen(["fit", str(config_file)], tmp_path) for _ in range(2)]
    results = [_finish(p) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], results
    runs = sorted((tmp_path / "runs" / "esmm").iterdir())
    assert len(runs) == 2 and all((r / "metrics.json").is_file() for r in runs)


def test_ctrl_c_exits_130_and_leaves_a_resumable_run(config_file, tmp_path):
    run = tmp_path / "shared-run"
    # no early stopping: the run must still be training when the signal comes, however loaded the machine
    proc = _popen(["fit", str(config_file), "trainer.max_epochs=500", "trainer.early_stopping=null"], tmp_path)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.ckpt").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    code, _, err = _finish(proc)
    assert code == 130, err
    assert "Traceback" not in err and f"funnel fit --resume {run}" in err
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert not (run / LOCK).exists()


# ---- in-process ------------------------------------------------------------------------------------------
def test_an_internal_error_says_it_is_a_bug_then_shows_the_traceback(config_file, monkeypatch):
    import funnel.check

    def broken(*_args, **_kwargs):
        raise ZeroDivisionError("funnel's own mistake")

    monkeypatch.setattr(funnel.check, "check", broken)
    code, _, err = run_cli(["check", str(config_file)])
    assert code == 1
    first, rest = err.split("\n", 1)
    assert "internal error" in first and "bug in funnel" in first
    assert "Traceback" in rest and "ZeroDivisionError: funnel's own mistake" in rest


def test_an_undefined_monitor_warns_and_falls_back_to_the_validation_loss(
    make_config, synth_dir, tmp_path, write_config, caplog
):
    valid = pd.read_csv(synth_dir / "valid.csv").assign(conversion=0)  # one class: AUC undefined
    valid.to_csv(tmp_path / "valid.csv", index=False)
    cfg = make_config(tmp_path / "run")
    cfg["data"]["valid"] = str(tmp_path / "valid.csv")
    cfg["trainer"].update(max_epochs=3, early_stopping=1)
    code, _, err = run_cli(["fit", str(write_config(cfg))])
    assert code == 0, err
    assert "val/auc/conversion is undefined on the valid split" in err and "val/loss" in err
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["monitor"] == "val/loss" and manifest["status"] == "complete"
    code, out, err = run_cli(["check", str(write_config(cfg, "again.yaml"))])
    assert code == 0 and "val/auc/conversion is undefined" in out
