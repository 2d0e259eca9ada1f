"""Kill a run with SIGKILL in its second epoch, resume it, and get the uninterrupted run's metrics.

The runs are real `funnel` processes. The kill comes from the test plug-in tower in
tests/plugins/killable_tower.py, at a known training step. Towers use dropout, so the resumed
run only matches when the RNG state is restored with the checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.test_cli import run_cli

PLUGINS = Path(__file__).parent / "plugins"
STEPS_PER_EPOCH = 10  # 2,400 train rows / batch 256


def _funnel(
    args: list[str], cwd: Path, kill_at: int | None = None, kill_after: Path | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
    env.pop("FUNNEL_TEST_KILL_AT", None)
    if kill_at is not None:
        env["FUNNEL_TEST_KILL_AT"] = str(kill_at)
    if kill_after is not None:
        env["FUNNEL_TEST_KILL_AFTER"] = str(kill_after)
    return subprocess.run(
        [sys.executable, "-m", "funnel", "-q", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module", params=[0.0, 0.9], ids=["plain", "ema"])
def runs(make_config, tmp_path_factory, request):
    """ema: the weight average (optim.ema_decay) is resumed too: last.ckpt holds the average in
    the model (saved after a validation) and the training weights in the callback's state."""
    base = tmp_path_factory.mktemp("resume")
    cfg = make_config(base / "unused")
    cfg["optim"] = {**cfg.get("optim", {}), "ema_decay": request.param}
    del cfg["run_dir"]
    cfg["plugins"] = ["killable_tower"]
    cfg["funnel"]["tower"] = {"type": "killable_mlp", "hidden": [8], "dropout": 0.2}
    cfg["trainer"]["max_epochs"] = 3
    cfg["data"]["cache"] = False
    (base / "config.yaml").write_text(yaml.safe_dump(cfg))
    whole = _funnel(["fit", "config.yaml", f"run_dir={base / 'whole'}"], base)
    assert whole.returncode == 0, whole.stderr
    last = base / "cut" / "checkpoints" / "last.ckpt"  # the crash comes once epoch 0's (background) write is done
    killed = _funnel(
        ["fit", "config.yaml", f"run_dir={base / 'cut'}"], base, kill_at=STEPS_PER_EPOCH + 5, kill_after=last
    )
    return base, whole, killed


def test_the_killed_run_died_in_its_second_epoch_and_kept_last_ckpt(runs):
    base, _, killed = runs
    assert killed.returncode == -signal.SIGKILL
    cut = base / "cut"
    assert (cut / "checkpoints" / "last.ckpt").is_file()
    assert not (cut / "checkpoints" / "best.ckpt").exists()
    manifest = json.loads((cut / "run.json").read_text())
    assert manifest["status"] == "running" and manifest["epochs_done"] == 1


def test_evaluate_and_fit_on_the_interrupted_run_say_how_to_resume(runs, synth_dir, make_config, write_config):
    base, _, _ = runs
    cut = base / "cut"
    code, _, err = run_cli(["evaluate", str(cut), "--data", str(synth_dir / "test.csv")])
    assert code == 2 and "interrupted after 1 epoch(s)" in err and f"funnel fit --resume {cut}" in err
    before = sorted(p.name for p in cut.rglob("*"))
    code, _, err = run_cli(["fit", str(write_config(make_config(cut)))])  # a new run into the same folder
    assert code == 2 and "funnel fit --resume" in err and "Traceback" not in err
    assert sorted(p.name for p in cut.rglob("*")) == before


def test_resume_needs_trust_for_the_runs_plugins_then_matches_the_uninterrupted_run(runs):
    base, _, _ = runs
    refused = _funnel(["fit", "--resume", str(base / "cut")], base)
    assert refused.returncode == 2 and "--trust-plugins" in refused.stderr and "killable_tower" in refused.stderr
    resumed = _funnel(["fit", "--resume", str(base / "cut"), "--trust-plugins"], base)
    assert resumed.returncode == 0, resumed.stderr
    whole = json.loads((base / "whole" / "metrics.json").read_text())
    cut = json.loads((base / "cut" / "metrics.json").read_text())
    assert cut == whole  # exact: the same batches, the same dropout masks, the same optimiser state
    assert json.loads((base / "cut" / "run.json").read_text())["status"] == "complete"
    assert not (base / "cut" / ".lock").exists()
    logs = pd.read_csv(base / "cut" / "logs" / "metrics.csv")
    steps = logs["train/loss"].dropna()
    assert len(steps) == 3 * STEPS_PER_EPOCH  # epoch 0 kept, epoch 1 trained again once, epoch 2 new
    reference = pd.read_csv(base / "whole" / "logs" / "metrics.csv")["train/loss"].dropna()
    assert steps.tolist() == reference.tolist()
    again = _funnel(["fit", "--resume", str(base / "cut"), "--trust-plugins"], base)
    assert again.returncode == 2 and "nothing to resume" in again.stderr


def test_resume_refuses_a_config_beside_it(runs):
    base, _, _ = runs
    code, _, err = run_cli(["fit", str(base / "config.yaml"), "--resume", str(base / "cut")])
    assert code == 2 and "takes no config" in err
