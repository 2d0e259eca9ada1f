"""Small shared fixtures: a tiny seeded synthetic CSV funnel and a YAML config writer."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from funnel.synthetic import SyntheticSpec, write

# 3,000 rows: 2,400 train / 300 valid / 300 test; high rates so that even the 300-row
# test split has both classes of every stage (about 60 clicks and 18 conversions).
TINY = SyntheticSpec(rows=3_000, n_users=200, n_items=100, rates=(0.2, 0.3), seed=0)

# Features of the synthetic CSVs; small embeddings and towers keep a fit to a few seconds.
TINY_FEATURES = [
    {"name": "user_id", "kind": "categorical"},
    {"name": "item_id", "kind": "categorical"},
    {"name": "device", "kind": "categorical"},
    {"name": "hour", "kind": "categorical"},
    {"name": "price", "kind": "numeric", "transform": "log1p"},
    {"name": "n_prev_visits", "kind": "numeric", "transform": "log1p"},
]

# Lightning warns (an error under filterwarnings=error) when an epoch has fewer batches
# than log_every_n_steps; tiny data needs 1.
TINY_TRAINER = {"max_epochs": 1, "enable_progress_bar": False, "log_every_n_steps": 1}


@pytest.fixture(autouse=True, scope="session")
def _private_data_cache(tmp_path_factory):
    """Tests never write funnel's data cache into the home folder."""
    import os

    old = os.environ.get("FUNNEL_CACHE_DIR")
    os.environ["FUNNEL_CACHE_DIR"] = str(tmp_path_factory.mktemp("funnel-cache"))
    yield
    if old is None:
        os.environ.pop("FUNNEL_CACHE_DIR", None)
    else:
        os.environ["FUNNEL_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _restore_logging():
    """`funnel.cli.main` reconfigures the root logger; undo it after every test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """train.csv / valid.csv / test.csv / truth.json of the tiny synthetic funnel (read-only)."""
    out = tmp_path_factory.mktemp("synth")
    write(out, TINY)
    return out


def _csv_config(data_dir: Path, run_dir: Path) -> dict[str, Any]:
    return {
        "seed": 0,
        "run_dir": str(run_dir),
        "data": {
            "train": str(data_dir / "train.csv"),
            "valid": str(data_dir / "valid.csv"),
            "test": str(data_dir / "test.csv"),
            "batch_size": 256,
        },
        "features": copy.deepcopy(TINY_FEATURES),
        "funnel": {
            "model": "esmm",
            "embed_dim": 4,
            "tower": {"type": "mlp", "hidden": [8]},
            "stages": [{"name": "click"}, {"name": "conversion", "after": "click"}],
        },
        "optim": {"name": "adam", "lr": 0.01},
        "trainer": dict(TINY_TRAINER),
    }


@pytest.fixture(scope="session")
def make_config(synth_dir) -> Callable[[Path], dict[str, Any]]:
    """make_config(run_dir) -> a fresh config mapping for the tiny CSVs (for module fixtures)."""
    return lambda run_dir: _csv_config(synth_dir, run_dir)


@pytest.fixture
def base_config(make_config, tmp_path) -> dict[str, Any]:
    """A fresh, modifiable config mapping for the tiny CSVs; its run_dir is tmp_path/run."""
    return make_config(tmp_path / "run")


@pytest.fixture
def write_config(tmp_path) -> Callable[..., Path]:
    """write_config(mapping or YAML text, name="config.yaml") -> the written path in tmp_path."""

    def _write(content: dict[str, Any] | str, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
        return path

    return _write
