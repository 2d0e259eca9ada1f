"""A plug-in model written against the FunnelModel protocol (examples/custom_model.py), with its
own YAML argument, trained end to end without subclassing any funnel class.

Everything runs in subprocesses, so the plug-in's registration never leaks into the registry
that the other tests iterate over."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_model.py"
SMALL = ["data.synthetic.rows=3000", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=cwd, check=False)


def test_the_plug_in_model_trains_from_yaml_with_its_argument(tmp_path):
    done = _run(
        [
            sys.executable,
            str(EXAMPLE),
            *SMALL,
            "trainer.max_epochs=1",
            "funnel.model.gamma=1.5",
            f"run_dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "custom_model" in config and "esmm_focal" in config and "gamma: 1.5" in config
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert all(0 < metrics[f"auc/{s}"] < 1 for s in ("click", "conversion"))
    logs = (tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss/click" in logs and "train/loss/conversion" in logs  # its unweighted terms, logged


def test_its_arguments_are_checked_before_any_data_is_read(tmp_path):
    typo = _run([sys.executable, str(EXAMPLE), *SMALL, "funnel.model.gama=1.0", "data.synthetic.rows=-1"], tmp_path)
    assert (
        typo.returncode == 2
        and "funnel.model.gama: model 'esmm_focal' has no argument 'gama'. Did you mean \"gamma\"?" in typo.stderr
    )
    bad = _run([sys.executable, str(EXAMPLE), *SMALL, "funnel.model.gamma=-1", f"run_dir={tmp_path / 'r'}"], tmp_path)
    assert bad.returncode == 2 and "gamma must be >= 0, got -1" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "r").exists()  # refused by the meta-device build


def test_gamma_zero_is_exactly_the_esmm_objective(tmp_path):
    script = f"""
import sys, torch
sys.path.insert(0, {str(EXAMPLE.parent)!r})
import custom_model
from funnel.graph import FunnelGraph
from funnel.models.net import compose
from funnel.models.zoo import EntireSpaceLoss
g = FunnelGraph.chain([("click", "click", None), ("conversion", "conversion", "click")])
logits = {{"click": torch.tensor([0.3, -1.2, 2.0, 0.1], dtype=torch.float64),
          "conversion": torch.tensor([-0.5, 1.1, 0.4, -2.0], dtype=torch.float64)}}
labels = torch.tensor([[1, 1], [0, 0], [1, 0], [0, 0]], dtype=torch.float64)
out = compose(g, logits)
focal = custom_model.FocalESMM.objective(type("M", (), {{"graph": g, "gamma": 0.0}})(), out, labels)
plain = EntireSpaceLoss(g)(out, labels)
for n in g.names:
    assert torch.allclose(focal.parts[n], plain.parts[n], rtol=1e-12), n
focal2 = custom_model.FocalESMM.objective(type("M", (), {{"graph": g, "gamma": 2.0}})(), out, labels)
assert all(focal2.parts[n] < plain.parts[n] for n in g.names)  # easy rows count less
print("ok")
"""
    done = _run([sys.executable, "-c", script], tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
