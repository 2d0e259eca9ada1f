"""Every shipped config validates; the synthetic ones also train one fast_dev_run step."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from funnel.models import MODELS
from funnel.spec import load_config
from funnel.training.fit import fit

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SYNTHETIC = [p for p in CONFIGS if "synthetic" in (yaml.safe_load(p.read_text()).get("data") or {})]


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def header_line(path: Path, label: str) -> str:
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.lstrip("# ").startswith(label):
            return line.split(label, 1)[1].strip()
    raise AssertionError(f"{path.name}: no `# {label}` line in the header comment")


def test_configs_are_found():
    assert len(CONFIGS) >= 2 and SYNTHETIC, [p.name for p in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=ids(CONFIGS))
def test_config_validates(path):
    cfg, _ = load_config(path)
    file = yaml.safe_load(path.read_text())
    assert cfg.stage_names() == [s["name"] for s in file["funnel"]["stages"]]
    assert [f.name for f in cfg.features] == [f["name"] for f in file["features"]]


@pytest.mark.parametrize("path", CONFIGS, ids=ids(CONFIGS))
def test_header_override_example_validates(path):
    words = shlex.split(header_line(path, "Override:"))
    assert words[:3] == ["funnel", "fit", f"configs/{path.name}"]
    cfg, _ = load_config(path, words[3:])
    assert cfg is not None
    assert header_line(path, "Launch:") == f"funnel fit configs/{path.name}"


def _branched(path: Path) -> bool:
    return any("via" in st for st in yaml.safe_load(path.read_text())["funnel"]["stages"])


# every model on every synthetic config; a funnel with branches runs the models that support them
MODEL_RUNS = [
    (p, m)
    for p in SYNTHETIC
    for m in MODELS.names()
    if not _branched(p) or MODELS.get(m).capabilities_for({}).branches  # the model's declared capability
]


@pytest.mark.parametrize(("path", "model"), MODEL_RUNS, ids=[f"{p.name}-{m}" for p, m in MODEL_RUNS])
def test_synthetic_config_trains_one_fast_dev_run_step(path, model, tmp_path):
    run_dir = fit(
        path,
        [
            f"funnel.model={model}",
            "data.synthetic.rows=2000",
            "trainer.fast_dev_run=true",
            "trainer.enable_progress_bar=false",
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    assert run_dir == tmp_path / "run"
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg, _ = load_config(path)
    assert metrics["split"] == "test" and metrics["rows"] == 200
    assert {f"auc/{s}" for s in cfg.stage_names()} <= set(metrics)


@pytest.mark.parametrize("path", CONFIGS, ids=ids(CONFIGS))
def test_config_survives_the_run_directory_round_trip(path):
    from funnel.runs import config_to_raw
    from funnel.spec import config_from_dict

    cfg, _ = load_config(path, ["funnel.loss_weighting.method=dwa", "funnel.counterfactual.method=ips"])
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_raw(cfg)))) == cfg
