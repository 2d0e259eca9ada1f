"""`funnel check` and `funnel fit` agree on every model x funnel shape x bottom x weighting.

`check` runs the same preflight as `fit` (Trainer arguments, the model built on the meta
device) plus the data checks, so a config `check` accepts must train, and a config it
refuses must be refused by `fit` with the same first `error:` line. Neither may print a
traceback. The axes are read from the registries and the schema, so a newly registered
model, bottom or weighting method is covered without editing this file.

`check` is cheap and runs on the full product. `fit` (fast_dev_run) runs on a covering
subset by default: every (model, shape) with no bottom and static weighting, every
(model, bottom) and every (model, weighting) on the 2-stage chain. The full product of
fits is marked slow.
"""

from __future__ import annotations

import itertools
import typing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from funnel.models import MODELS
from funnel.models.bottoms import BOTTOMS
from funnel.spec.schema import WeightingSpec
from tests.test_cli import run_cli

# ---- the axes ----------------------------------------------------------------------------------------

# stage label columns of every shape (a child is 1 only where its parent is; a group's members exclusive)
SHAPES: dict[str, list[dict]] = {
    "chain2": [{"name": "click"}, {"name": "conversion", "after": "click"}],
    "esm2": [
        {"name": "click"},
        {"name": "cart", "after": "click"},
        {"name": "buy", "after": "click", "via": "cart"},
    ],
    "kway": [
        {"name": "click"},
        {"name": "cart", "after": "click", "group": "action"},
        {"name": "wish", "after": "click", "group": "action"},
        {"name": "buy", "after": "click", "via": "action"},
    ],
    "chain5": [
        {"name": "a"},
        {"name": "b", "after": "a"},
        {"name": "c", "after": "b"},
        {"name": "d", "after": "c"},
        {"name": "e", "after": "d"},
    ],
}
CHAIN = "chain2"

# small arguments for the built-in bottoms; a bottom not listed here is tried with its defaults
BOTTOM_ARGS: dict[str, dict] = {
    "shared_bottom": {"hidden": [8]},
    "mmoe": {"experts": 2, "expert_hidden": [8]},
    "ple": {"layers": 1, "shared_experts": 1, "specific_experts": 1, "expert_hidden": [8]},
}

MODEL_NAMES = MODELS.names()
BOTTOM_NAMES = ["none", *BOTTOMS.names()]
WEIGHTINGS = list(typing.get_args(typing.get_type_hints(WeightingSpec)["method"]))

FULL = list(itertools.product(MODEL_NAMES, SHAPES, BOTTOM_NAMES, WEIGHTINGS))
COVER = sorted(
    {(m, s, "none", "static") for m in MODEL_NAMES for s in SHAPES}
    | {(m, CHAIN, b, "static") for m in MODEL_NAMES for b in BOTTOM_NAMES}
    | {(m, CHAIN, "none", w) for m in MODEL_NAMES for w in WEIGHTINGS}
)


def _id(combo: tuple[str, str, str, str]) -> str:
    return "-".join(combo)


# ---- data: one small CSV triple per shape ------------------------------------------------------------

ROWS = 400


def _labels(shape: str, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    if shape == "chain2":
        click = rng.random(n) < 0.5
        return {"click": click, "conversion": click & (rng.random(n) < 0.5)}
    if shape == "esm2":
        click = rng.random(n) < 0.6
        cart = click & (rng.random(n) < 0.5)
        return {"click": click, "cart": cart, "buy": click & (rng.random(n) < np.where(cart, 0.6, 0.3))}
    if shape == "kway":
        click = rng.random(n) < 0.6
        action = np.where(click, rng.choice(3, n, p=[0.4, 0.35, 0.25]), 0)  # 0 neither, 1 cart, 2 wish
        buy = click & (rng.random(n) < np.choose(action, [0.2, 0.6, 0.4]))
        return {"click": click, "cart": action == 1, "wish": action == 2, "buy": buy}
    if shape == "chain5":
        out, parent = {}, np.ones(n, bool)
        for name in "abcde":
            parent = out[name] = parent & (rng.random(n) < 0.7)  # e: about 17% of the rows
        return out
    raise AssertionError(shape)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> dict[str, Path]:
    """train/valid/test.csv (240/80/80 rows) per shape; every split has both classes of every stage."""
    rng = np.random.default_rng(0)
    dirs = {}
    for shape in SHAPES:
        labels = _labels(shape, rng, ROWS)
        df = pd.DataFrame(
            {
                "user_id": rng.integers(20, size=ROWS).astype(str),
                "device": rng.choice(["ios", "android", "web"], ROWS),
                "price": rng.lognormal(size=ROWS).round(3),
                "age": rng.integers(18, 70, size=ROWS),
                **{name: y.astype(int) for name, y in labels.items()},
            }
        )
        out = tmp_path_factory.mktemp(f"data-{shape}")
        for split, rows in (("train", slice(0, 240)), ("valid", slice(240, 320)), ("test", slice(320, ROWS))):
            part = df.iloc[rows]
            assert all(0 < part[name].sum() < len(part) for name in labels), (shape, split)
            part.to_csv(out / f"{split}.csv", index=False)
        dirs[shape] = out
    return dirs


@pytest.fixture(scope="module")
def configs(data_dirs, tmp_path_factory) -> dict[tuple[str, str, str, str], Path]:
    """One YAML per combination of the full product (run_dir is given per fit)."""
    folder = tmp_path_factory.mktemp("configs")
    paths = {}
    for model, shape, bottom, weighting in FULL:
        data = data_dirs[shape]
        raw = {
            "seed": 0,
            "data": {
                "train": str(data / "train.csv"),
                "valid": str(data / "valid.csv"),
                "test": str(data / "test.csv"),
                "batch_size": 64,
            },
            "features": [
                {"name": "user_id", "kind": "categorical"},
                {"name": "device", "kind": "categorical"},
                {"name": "price", "kind": "numeric", "transform": "log1p"},
                {"name": "age", "kind": "numeric"},
            ],
            "funnel": {
                "model": model,
                "embed_dim": 4,
                "tower": {"type": "mlp", "hidden": [8]},
                "bottom": None if bottom == "none" else {"type": bottom, **BOTTOM_ARGS.get(bottom, {})},
                "loss_weighting": {"method": weighting},
                "stages": SHAPES[shape],
            },
            "optim": {"name": "adam", "lr": 0.01},
            "trainer": {"fast_dev_run": 1, "enable_progress_bar": False, "log_every_n_steps": 1},
        }
        path = folder / f"{_id((model, shape, bottom, weighting))}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        paths[(model, shape, bottom, weighting)] = path
    return paths


# ---- running the two commands --------------------------------------------------------------------------


def _outcome(code: int, out: str, err: str, command: str) -> tuple[int, str | None]:
    """(exit code, first `error:` line); the command ran cleanly (0 or 2, no traceback)."""
    assert "Traceback" not in out + err and "internal error" not in err, f"{command}: {err[-3000:]}"
    assert code in (0, 2), f"{command} exited {code}: {err[-3000:]}"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if code == 2:
        assert errors, f"{command} exited 2 without an error: line: {err[-3000:]}"
    return code, errors[0] if errors else None


@pytest.fixture(scope="module")
def checked(configs) -> dict[tuple[str, str, str, str], tuple[int, str | None]]:
    """`funnel check` of every combination of the full product, run once."""
    results = {}
    for combo, path in configs.items():
        code, out, err = run_cli(["-q", "check", str(path)])
        results[combo] = _outcome(code, out, err, f"check {_id(combo)}")
        if code == 0:
            assert "config and data OK" in out, _id(combo)
    return results


def _fit_agrees(checked, configs, combo, run_dir: Path) -> None:
    code, out, err = run_cli(["-q", "fit", str(configs[combo]), f"run_dir={run_dir}"])
    assert _outcome(code, out, err, f"fit {_id(combo)}") == checked[combo], (
        f"{_id(combo)}: check says {checked[combo]}, fit says {(code, err.strip()[-2000:])}"
    )
    if code == 0:
        assert (run_dir / "metrics.json").is_file() and f"run directory: {run_dir}" in out
    else:  # refused before training: the claimed run directory is not left behind
        assert not run_dir.exists()


# ---- the tests -----------------------------------------------------------------------------------------


def test_the_axes_come_from_the_registries():
    assert len(MODEL_NAMES) >= 6 and {"esmm", "base", "aitm"} <= set(MODEL_NAMES)
    assert set(BOTTOM_ARGS) <= set(BOTTOMS.names()) and len(BOTTOM_NAMES) >= 4
    assert set(WEIGHTINGS) >= {"static", "uncertainty", "dwa", "gradnorm"}
    assert len(FULL) == len(MODEL_NAMES) * len(SHAPES) * len(BOTTOM_NAMES) * len(WEIGHTINGS)
    # the cover holds every (model, shape), (model, bottom) and (model, weighting) pair
    assert {(m, s) for m, s, _, _ in COVER} == set(itertools.product(MODEL_NAMES, SHAPES))
    assert {(m, b) for m, _, b, _ in COVER} == set(itertools.product(MODEL_NAMES, BOTTOM_NAMES))
    assert {(m, w) for m, _, _, w in COVER} == set(itertools.product(MODEL_NAMES, WEIGHTINGS))


@pytest.mark.parametrize("combo", FULL, ids=_id)
def test_check_accepts_or_refuses_cleanly(checked, combo):
    code, error = checked[combo]
    assert (code == 0 and error is None) or (code == 2 and error.startswith("error: "))


def test_check_both_accepts_and_refuses_so_agreement_is_not_vacuous(checked):
    accepted = {c for c, (code, _) in checked.items() if code == 0}
    refused = set(checked) - accepted
    for model in MODEL_NAMES:  # every model trains on the plain chain at least
        assert (model, CHAIN, "none", "static") in accepted, model
    # on each axis, some value is refused for some model: a shape, a bottom, a weighting
    assert {s for _, s, b, w in refused if b == "none" and w == "static"} - {CHAIN}
    assert {b for _, s, b, w in refused if s == CHAIN and w == "static"} - {"none"}
    assert {w for _, s, b, w in refused if s == CHAIN and b == "none"} - {"static"}
    # and every refusal the cover can see is in the cover
    assert {c for c in COVER if c in refused}


@pytest.mark.parametrize("combo", COVER, ids=_id)
def test_fit_agrees_with_check(checked, configs, combo, tmp_path):
    _fit_agrees(checked, configs, combo, tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("combo", FULL, ids=_id)
def test_fit_agrees_with_check_on_the_full_product(checked, configs, combo, tmp_path):
    _fit_agrees(checked, configs, combo, tmp_path / "run")
