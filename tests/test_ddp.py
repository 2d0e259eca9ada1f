"""DDP from the command line: one run directory, the data prepared once, the numbers of one process.

The runs are real `funnel fit` processes with 2 CPU ranks (gloo): under Lightning's own launcher
(it re-runs the command line for rank 1), under ``ddp_spawn`` and under torchrun, on the tiny
synthetic CSVs (2,400 training rows, so batch 256 gives 10 optimiser steps an epoch).

Equivalence. The training loader gives rank r every 2nd row of the epoch's permutation, so rank 0's
and rank 1's batch b of B/2 rows together are the one-process batch b of B rows, and DDP averages
the two ranks' gradients. For a model whose loss is a mean over the batch's rows (esmm; aitm with
its calibrator) the average of the two half-batch means is the full batch's mean: the same Adam
steps, the same weights up to float rounding.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import yaml

from funnel.data.datamodule import FunnelDataModule
from funnel.data.loader import BatchLoader
from funnel.data.table import LABELS
from funnel.errors import UserError
from funnel.models.registry import create_model, model_loss
from funnel.runs import build_graph
from funnel.spec import load_config
from funnel.training import distributed
from funnel.training.distributed import Launch
from funnel.training.module import FunnelLightningModule
from funnel.training.priors import init_head_priors
from tests.test_cli import run_cli

B = 256  # the one-process batch; each DDP rank takes B / 2
DDP = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", f"data.batch_size={B // 2}"]
PLUGIN = '''
import os
import torch
from torch import nn
from funnel.errors import UserError
from funnel.models.towers import register_tower
from funnel.models.towers.mlp import MLPTower


@register_tower("failing_mlp")
class FailingMLP(nn.Module):
    """The MLP tower; on rank $FUNNEL_TEST_FAIL_RANK its 5th training forward pass raises."""

    def __init__(self, shape, **kwargs):
        super().__init__()
        self.mlp = MLPTower(shape, **kwargs)
        self.out_dim = self.mlp.out_dim
        self.calls = 0

    def forward(self, x):
        if self.training and torch.distributed.is_initialized():
            self.calls += 1
            if self.calls == 5 and str(torch.distributed.get_rank()) == os.environ.get("FUNNEL_TEST_FAIL_RANK"):
                raise UserError("the test tower fails on purpose")
        return self.mlp(x)
'''


def _funnel(args: list[str], cwd: Path, torchrun: list[str] | None = None, **env: str):
    launcher = ["-m", "torch.distributed.run", *torchrun] if torchrun is not None else []
    return subprocess.run(
        [sys.executable, *launcher, "-m", "funnel", "-q", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(cwd), **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _weights(run_dir: Path, name: str = "last.ckpt") -> tuple[dict[str, torch.Tensor], int]:
    ckpt = torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["global_step"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


@pytest.fixture(scope="module")
def base(make_config, tmp_path_factory) -> Path:
    """A folder with esmm.yaml, aitm.yaml and base.yaml (no run_dir) and the failing tower plug-in."""
    base = tmp_path_factory.mktemp("ddp")
    for model in ("esmm", "aitm", "base"):
        cfg = make_config(base / "unused")
        del cfg["run_dir"]
        cfg["funnel"]["model"] = model
        (base / f"{model}.yaml").write_text(yaml.safe_dump(cfg))
    (base / "failing_tower.py").write_text(PLUGIN)
    return base


@pytest.fixture(scope="module")
def esmm_runs(base) -> dict[str, Path]:
    """esmm in one process (batch B) and under DDP with the default run_dir (2 x B/2)."""
    code, _, err = run_cli(["-q", "fit", str(base / "esmm.yaml"), f"run_dir={base / 'esmm-one'}"])
    assert code == 0, err
    ddp = _funnel(["fit", "esmm.yaml", *DDP], base)
    assert ddp.returncode == 0, ddp.stderr
    return {"one": base / "esmm-one", "ddp_result": ddp}


# ---- one run directory ----------------------------------------------------------------------------------
def test_ddp_with_the_default_run_dir_makes_one_complete_run_and_rank_0_reports_it(esmm_runs, base):
    runs = list((base / "runs" / "esmm").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert _manifest(run)["status"] == "complete"
    assert not (run / ".lock").exists() and not (run / distributed.PREPARED).exists()
    out = esmm_runs["ddp_result"].stdout
    assert out.count("run directory:") == 1 and f"run directory: runs/esmm/{run.name}" in out
    assert "Warning" not in esmm_runs["ddp_result"].stderr  # sync_dist among them


def test_one_epoch_of_ddp_esmm_takes_the_one_process_steps(esmm_runs, base):
    (run,) = (base / "runs" / "esmm").iterdir()
    one, steps_one = _weights(esmm_runs["one"])
    ddp, steps_ddp = _weights(run)
    assert steps_one == steps_ddp == 10
    assert _max_diff(one, ddp) < 1e-5


def test_ddp_metrics_json_equals_a_one_process_evaluate_of_its_checkpoint(esmm_runs, base, synth_dir):
    (run,) = (base / "runs" / "esmm").iterdir()
    for name, split in (("metrics.json", "test"), ("metrics_valid.json", "valid")):
        written = json.loads((run / name).read_text())
        code, out, err = run_cli(["evaluate", str(run), "--data", str(synth_dir / f"{split}.csv")])
        assert code == 0, err
        evaluated = json.loads(out)
        assert written.pop("split") == split and written.keys() == evaluated.keys()
        for key, value in evaluated.items():
            assert written[key] == pytest.approx(value, abs=1.5e-6), key  # both rounded to 6 decimals


def test_the_validation_logged_under_ddp_is_the_whole_split_scored_in_one_process(esmm_runs, base, synth_dir):
    """Each rank validates half the split; the logged AUC and loss are the whole split's."""
    (run,) = (base / "runs" / "esmm").iterdir()
    logs = pd.read_csv(run / "logs" / "metrics.csv")
    logged = logs.dropna(subset=["val/auc/conversion"]).iloc[-1]
    code, out, err = run_cli(["evaluate", str(run), "--data", str(synth_dir / "valid.csv")])  # best = epoch 0
    assert code == 0, err
    evaluated = json.loads(out)
    for key in ("auc/conversion", "auc/click", "auc_cond/conversion", "logloss/click", "calib/conversion"):
        assert logged[f"val/{key}"] == pytest.approx(evaluated[key], abs=1e-6), key


# ---- equivalence for the other models ------------------------------------------------------------------
def test_one_epoch_of_ddp_aitm_in_an_explicit_run_dir_takes_the_one_process_steps(base):
    code, _, err = run_cli(["-q", "fit", str(base / "aitm.yaml"), f"run_dir={base / 'aitm-one'}"])
    assert code == 0, err
    ddp = _funnel(["fit", "aitm.yaml", *DDP, "run_dir=aitm-ddp"], base)
    assert ddp.returncode == 0, ddp.stderr
    assert _manifest(base / "aitm-ddp")["status"] == "complete"
    one, steps_one = _weights(base / "aitm-one")
    two, steps_ddp = _weights(base / "aitm-ddp")
    assert steps_one == steps_ddp == 10
    assert _max_diff(one, two) < 1e-5


def test_sparse_embeddings_under_ddp_take_the_one_process_steps(base):
    """optim.sparse_embeddings: the tables' sparse gradients are all-reduced apart from the dense
    ones, and LazyAdam steps the rows either rank touched."""
    sparse = "optim.sparse_embeddings=true"
    code, _, err = run_cli(["-q", "fit", str(base / "esmm.yaml"), sparse, f"run_dir={base / 'sparse-one'}"])
    assert code == 0, err
    ddp = _funnel(["fit", "esmm.yaml", *DDP, sparse, "run_dir=sparse-ddp"], base)
    assert ddp.returncode == 0, ddp.stderr
    assert "Warning" not in ddp.stderr  # the tables were sparse before DDP laid out its buckets
    one, steps_one = _weights(base / "sparse-one")
    two, steps_ddp = _weights(base / "sparse-ddp")
    assert steps_one == steps_ddp == 10
    assert _max_diff(one, two) < 1e-5


def test_the_weight_average_under_ddp_is_the_one_process_average(esmm_runs, base):
    """optim.ema_decay: each rank averages the same all-reduced weights; best.ckpt holds the average."""
    ema = "optim.ema_decay=0.9"
    code, _, err = run_cli(["-q", "fit", str(base / "esmm.yaml"), ema, f"run_dir={base / 'ema-one'}"])
    assert code == 0, err
    ddp = _funnel(["fit", "esmm.yaml", *DDP, ema, "run_dir=ema-ddp"], base)
    assert ddp.returncode == 0, ddp.stderr
    one, steps_one = _weights(base / "ema-one")
    two, steps_ddp = _weights(base / "ema-ddp")
    plain, _ = _weights(esmm_runs["one"])  # the same run without the average
    assert steps_one == steps_ddp == 10
    assert _max_diff(one, two) < 1e-5
    assert _max_diff(one, plain) > 1e-3  # the average is not the last step's weights


def _hand_loop(config: Path, world: int) -> dict[str, torch.Tensor]:
    """One epoch by hand, as `funnel fit` builds the model: each step's loss is the mean over the
    ``world`` rank shards of each shard's own loss (what DDP's gradient averaging computes)."""
    cfg, _ = load_config(config, [f"data.batch_size={B // world}"])
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    graph = build_graph(cfg)
    dm = FunnelDataModule(cfg, graph)
    dm.prepare()
    model = create_model(graph, cfg.funnel, dm.featurizer.layout())
    init_head_priors(model, dm.tables["train"].labels)  # as fit does: heads start at the base rates
    optimiser = FunnelLightningModule(model, cfg.optim).configure_optimizers()
    model.train()
    shards = [
        BatchLoader(dm.tables["train"], B // world, shuffle=True, seed=cfg.seed, rank=r, world_size=world)
        for r in range(world)
    ]
    for batches in zip(*shards, strict=True):
        optimiser.zero_grad()
        loss = sum(model_loss(model, model(b), b[LABELS]).total for b in batches) / world
        loss.backward()
        optimiser.step()
    return {f"model.{k}": v.detach() for k, v in model.state_dict().items()}


def test_the_hand_loop_of_one_shard_is_the_one_process_fit(esmm_runs, base):
    """The hand loop below builds and steps the model as `funnel fit` does."""
    one, _ = _weights(esmm_runs["one"])
    assert _max_diff(_hand_loop(base / "esmm.yaml", world=1), one) < 1e-6


def test_ddp_base_averages_the_ranks_masked_means(base):
    """Model base averages its CVR loss over the clicked rows of the batch only. Each rank's mean
    then has its own denominator (the clicks in its half), and DDP's average of the two means is not
    the mean over the whole batch's clicks: DDP and one process take different steps. What DDP takes
    exactly is the step on the average of the two ranks' own losses."""
    ddp = _funnel(["fit", "base.yaml", *DDP, "run_dir=base-ddp"], base)
    assert ddp.returncode == 0, ddp.stderr
    weights, steps = _weights(base / "base-ddp")
    assert steps == 10
    assert _max_diff(_hand_loop(base / "base.yaml", world=2), weights) < 1e-5
    assert _max_diff(_hand_loop(base / "base.yaml", world=1), weights) > 1e-4  # not the one-process steps


# ---- other launches and failures -----------------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, 1])
def test_a_failing_rank_fails_the_launch_and_leaves_the_run_failed_and_unclaimed(base, rank):
    failing = ["plugins=[failing_tower]", "funnel.tower.type=failing_mlp"]
    run = f"failed-{rank}"
    result = _funnel(["fit", "esmm.yaml", *DDP, *failing, f"run_dir={run}"], base, FUNNEL_TEST_FAIL_RANK=str(rank))
    assert result.returncode == 2 if rank == 0 else result.returncode != 0
    assert "error: the test tower fails on purpose" in result.stderr and "Traceback" not in result.stderr
    manifest = _manifest(base / run)
    assert manifest["status"] == "failed" and manifest["failed_rank"] == rank
    assert manifest["error"] == "UserError: the test tower fails on purpose"
    assert not (base / run / ".lock").exists()
    assert not (base / run / "checkpoints" / "best.ckpt").exists()


def test_ddp_spawn_runs_to_completion(base):
    result = _funnel(["fit", "esmm.yaml", *DDP, "trainer.strategy=ddp_spawn", "run_dir=spawned"], base)
    assert result.returncode == 0, result.stderr
    assert _manifest(base / "spawned")["status"] == "complete"
    assert (base / "spawned" / "metrics.json").is_file()


def test_torchrun_trains_into_the_given_run_dir_with_the_data_prepared_once(base):
    torchrun = ["--standalone", "--nproc_per_node", "2"]
    result = _funnel(["fit", "esmm.yaml", *DDP, "data.cache=false", "run_dir=torchrun"], base, torchrun)
    assert result.returncode == 0, result.stderr
    manifest = _manifest(base / "torchrun")
    assert manifest["status"] == "complete" and manifest["prepared"] == distributed.PREPARED
    assert manifest["launch"].startswith("TORCHELASTIC_RUN_ID=")
    assert not (base / "torchrun" / distributed.PREPARED).exists()  # the run-local copy is gone
    assert result.stdout.count("run directory:") == 1


def test_torchrun_without_a_job_id_needs_run_dir(base):
    """A static rendezvous with a given port sets no run id (TORCHELASTIC_RUN_ID=none): no default
    run_dir is possible. (torchrun --standalone draws a run id: its runs go to runs/<stem>/torchrun-<id>.)"""
    torchrun = ["--nnodes", "1", "--nproc_per_node", "2", "--master-port", str(_free_port())]
    result = _funnel(["fit", "esmm.yaml", *DDP], base, torchrun)
    assert result.returncode != 0
    assert result.stderr.count("error: run_dir: the 2 ranks of this launch start independently") == 2
    assert "exitcode  : 2" in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the rules in process ------------------------------------------------------------------------------
def _launch(**kwargs) -> Launch:
    fields = {"world_size": 2, "rank": 1, "nodes": 1, "launches_ranks": False, "in_process": False, "launch_id": "L1"}
    return Launch(**{**fields, "job_id": None, **kwargs})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TORCHELASTIC_RUN_ID": "3f2a-b"}, "torchrun-3f2a-b"),
        ({"TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "812", "SLURM_STEP_ID": "0"}, "slurm-812.0"),
        ({"SLURM_JOB_ID": "812"}, "slurm-812"),
        ({"TORCHELASTIC_RUN_ID": "none"}, None),
        ({"TORCHELASTIC_RUN_ID": "a/b c"}, "torchrun-a_b_c"),
    ],
)
def test_the_job_id_names_the_default_run_dir(monkeypatch, env, expected):
    for key in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.job_id() == expected


def test_independent_ranks_without_run_dir_or_job_id_are_refused(make_config, tmp_path):
    cfg, _ = load_config(_write(tmp_path, make_config(tmp_path / "r"), run_dir=None), [])
    with pytest.raises(UserError, match="run_dir: the 2 ranks .* Pass run_dir=PATH"):
        distributed.shared_run_dir(cfg, "configs/esmm.yaml", _launch())
    assert distributed.shared_run_dir(cfg, "configs/esmm.yaml", _launch(job_id="slurm-9")) == "runs/esmm/slurm-9"
    assert distributed.shared_run_dir(cfg, "c.yaml", _launch(rank=0, launches_ranks=True)) is None  # the owner picks
    with pytest.raises(UserError, match="run_dir: the 4 ranks"):  # the parents on two nodes launch their own ranks
        distributed.shared_run_dir(cfg, "c.yaml", _launch(world_size=4, nodes=2, launches_ranks=True))


def _write(tmp_path: Path, cfg: dict, run_dir: str | None) -> Path:
    cfg = {**cfg, "run_dir": run_dir} if run_dir else {k: v for k, v in cfg.items() if k != "run_dir"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_waiting_rank_opens_what_rank_0_of_its_launch_prepared(tmp_path):
    (tmp_path / "prepared").mkdir()
    (tmp_path / "run.json").write_text(json.dumps({"launch": "L1", "status": "running", "prepared": "prepared"}))
    assert distributed.wait_for_owner(tmp_path, _launch()) == tmp_path / "prepared"


def test_a_waiting_rank_stops_with_rank_0s_error(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"launch": "L1", "status": "failed", "error": "DataError: bad"}))
    with pytest.raises(UserError, match="rank 0 failed: DataError: bad"):
        distributed.wait_for_owner(tmp_path, _launch())


def test_a_waiting_rank_refuses_another_launchs_run_unless_resuming(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "run.json").write_text(json.dumps({"launch": "L0", "status": "complete", "prepared": "prepared"}))
    with pytest.raises(UserError, match="already exists and is not empty"):
        distributed.wait_for_owner(tmp_path, _launch())
    monkeypatch.setenv(distributed.WAIT_ENV, "0.3")
    with pytest.raises(UserError, match=r"rank 1: rank 0 did not prepare the run .* within 0.3 s"):
        distributed.wait_for_owner(tmp_path, _launch(), resume=True, poll_s=0.05)


def test_a_bad_wait_setting_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(distributed.WAIT_ENV, "an hour")
    with pytest.raises(UserError, match="FUNNEL_DDP_WAIT_S: 'an hour' is not a number"):
        distributed.wait_for_owner(tmp_path, _launch())


def test_the_handoff_is_read_only_by_the_children_of_the_process_that_set_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    with distributed.handed_to_children(tmp_path, tmp_path / "p"):
        assert os.environ[distributed.HANDOFF_PARENT] == str(os.getpid())
        assert distributed._inherited() is None  # this process set it: it is the parent, not a child
        monkeypatch.setenv(distributed.HANDOFF_PARENT, str(os.getppid()))
        assert distributed._inherited() == distributed.Handoff(tmp_path.resolve(), (tmp_path / "p").resolve())
    assert distributed.HANDOFF_RUN_DIR not in os.environ and distributed.HANDOFF_PARENT not in os.environ


def test_the_first_failure_recorded_is_kept(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"status": "running"}))
    (tmp_path / ".lock").write_text("host 1\n")
    distributed.record_failure(tmp_path, _launch(rank=1), UserError("the cause"))
    distributed.record_failure(tmp_path, _launch(rank=0), RuntimeError("Connection closed by peer"))
    manifest = _manifest(tmp_path)
    assert manifest["failed_rank"] == 1 and manifest["error"] == "UserError: the cause"
    assert not (tmp_path / ".lock").exists()
