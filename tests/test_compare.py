"""`funnel compare`: models x seeds on the same splits, summarised as mean ± std."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from funnel.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_project_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the commands name configs/ relative to the project, as a user would


TINY = [
    "data.synthetic.rows=3000",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "trainer.early_stopping=null",
]


def test_compare_trains_every_model_and_seed_and_summarises_their_metrics(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "configs/esmm.yaml", *TINY, "--models", "esmm,base", "--seeds", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| esmm |" in printed and "| base |" in printed and printed.rstrip().endswith(str(out))
    result = json.loads((out / "compare.json").read_text())
    assert set(result["runs"]) == {"esmm", "base"} and all(len(r) == 2 for r in result["runs"].values())
    for model, runs in result["runs"].items():
        values = [r["auc_cond_es/conversion"] for r in runs]
        mean, std = result["summary"][model]["auc_cond_es/conversion"]
        assert mean == statistics.mean(values) and std == statistics.stdev(values)
    # same data for every run: the oracle is identical
    oracles = {r["oracle_auc/conversion"] for runs in result["runs"].values() for r in runs}
    assert len(oracles) == 1
    assert (out / "compare.md").read_text().startswith("configs/esmm.yaml: esmm, base, 2 seed(s)")
    assert (out / "esmm-seed1" / "metrics.json").is_file()


def test_compare_rejects_an_unknown_model_before_training(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "configs/esmm.yaml", *TINY, "--models", "esmm,bsae", "--out", str(out)]) == 2
    assert 'Did you mean "base"?' in capsys.readouterr().err
    assert not out.exists()
