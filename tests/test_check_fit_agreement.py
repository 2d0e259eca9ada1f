"""`funnel check` and `funnel fit` agree on every model x funnel shape x bottom x weighting.

`check` runs the same preflight as `fit` (Trainer arguments, the model built on the meta
device) plus the data checks, so a config `check` accepts must train, and a config it
refuses must be refused by `fit` with the same `error:` message (its first line and the
problems listed under it). Neither may print a traceback. The axes are read from the
registries and the schema, so a newly registered model, bottom or weighting method is
covered without editing this file.

Both commands run on the full product (6 models x 4 shapes x 4 bottoms x 4 weightings =
384 cases today), plus 3 configs per model that only the preflight refuses (18 cases), so
that a `check` that skipped the preflight would fail here. A fit is one fast_dev_run batch
on 240 rows, about 0.1 s (up to 2.5 s with gradnorm): the module takes about 25 s on 2 cores."""

from __future__ import annotations

import copy
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

Combo = tuple[str, str, str, str, str]  # model, shape, bottom, weighting, variant


def _more_width(raw: dict) -> None:  # the last stage's tower wider than the others
    raw["funnel"]["stages"][-1]["tower"] = {"type": "mlp", "hidden": [16]}


def _no_experts(raw: dict) -> None:
    raw["funnel"]["bottom"]["experts"] = 0


def _negative_clip(raw: dict) -> None:
    raw["trainer"]["gradient_clip_val"] = -1.0


# Configs that pass validation and fail only where the preflight builds the model or probes
# the Trainer, with a piece of the message that says so; tried on every model on the chain.
VARIANTS = {
    "plain": (None, None),
    "wide_last_tower": (_more_width, "same output width"),  # AIT transfer needs one tower width
    "no_experts": (_no_experts, "experts must be >= 1"),
    "negative_clip": (_negative_clip, "trainer.gradient_clip_val"),
}
VARIANT_BOTTOM = {"no_experts": "mmoe"}

FULL: list[Combo] = [(*c, "plain") for c in itertools.product(MODEL_NAMES, SHAPES, BOTTOM_NAMES, WEIGHTINGS)]
PREFLIGHT: list[Combo] = [
    (m, CHAIN, VARIANT_BOTTOM.get(v, "none"), "static", v) for m in MODEL_NAMES for v in VARIANTS if v != "plain"
]
CASES = FULL + PREFLIGHT


def _id(combo: Combo) -> str:
    return "-".join(part for part in combo if part != "plain")


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
def configs(data_dirs, tmp_path_factory) -> dict[Combo, Path]:
    """One YAML per case (run_dir is given per fit)."""
    folder = tmp_path_factory.mktemp("configs")
    paths = {}
    for model, shape, bottom, weighting, variant in CASES:
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
                "stages": copy.deepcopy(SHAPES[shape]),
            },
            "optim": {"name": "adam", "lr": 0.01},
            "trainer": {"fast_dev_run": 1, "enable_progress_bar": False, "log_every_n_steps": 1},
        }
        combo = (model, shape, bottom, weighting, variant)
        mutate = VARIANTS[variant][0]
        if mutate is not None:
            mutate(raw)
        path = folder / f"{_id(combo)}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        paths[combo] = path
    return paths


# ---- running the two commands --------------------------------------------------------------------------


def _outcome(code: int, out: str, err: str, command: str) -> tuple[int, str | None]:
    """(exit code, the `error:` message: its first line and the problems listed under it);
    the command ran cleanly (0 or 2, one error message, no traceback)."""
    assert "Traceback" not in out + err and "internal error" not in err, f"{command}: {err[-3000:]}"
    assert code in (0, 2), f"{command} exited {code}: {err[-3000:]}"
    lines = err.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    if code == 0:
        assert not starts, f"{command} exited 0 but printed {lines[starts[0]]}"
        return code, None
    assert len(starts) == 1, f"{command} exited 2 with {len(starts)} error: lines: {err[-3000:]}"
    block = [lines[starts[0]]]
    block += itertools.takewhile(lambda line: line.startswith("  - "), lines[starts[0] + 1 :])
    return code, "\n".join(block)


@pytest.fixture(scope="module")
def checked(configs) -> dict[Combo, tuple[int, str, str]]:
    """`funnel check` of every case, run once: exit code, stdout, stderr."""
    return {combo: run_cli(["-q", "check", str(path)]) for combo, path in configs.items()}


def _checked(checked, combo: Combo) -> tuple[int, str | None]:
    code, out, err = checked[combo]
    outcome = _outcome(code, out, err, f"check {_id(combo)}")
    if code == 0:
        assert "config and data OK" in out, _id(combo)
    return outcome


def _fit_agrees(checked, configs, combo: Combo, run_dir: Path) -> None:
    want = _checked(checked, combo)
    code, out, err = run_cli(["-q", "fit", str(configs[combo]), f"run_dir={run_dir}"])
    assert _outcome(code, out, err, f"fit {_id(combo)}") == want, (
        f"{_id(combo)}: check says {want}, fit says {(code, err.strip()[-2000:])}"
    )
    if code == 0:
        assert (run_dir / "metrics.json").is_file() and f"run directory: {run_dir}" in out
    else:  # refused before training: the claimed run directory is not left behind
        assert not run_dir.exists()


# ---- the tests -----------------------------------------------------------------------------------------


def test_the_axes_come_from_the_registries():
    assert len(MODEL_NAMES) >= 6 and {"esmm", "base", "aitm"} <= set(MODEL_NAMES)
    assert set(BOTTOM_ARGS) <= set(BOTTOMS.names()) and len(BOTTOM_NAMES) >= 4
    assert set(VARIANT_BOTTOM.values()) <= set(BOTTOMS.names())
    assert set(WEIGHTINGS) >= {"static", "uncertainty", "dwa", "gradnorm"}
    assert len(FULL) == len(MODEL_NAMES) * len(SHAPES) * len(BOTTOM_NAMES) * len(WEIGHTINGS)
    assert len(PREFLIGHT) == len(MODEL_NAMES) * (len(VARIANTS) - 1)


@pytest.mark.parametrize("combo", CASES, ids=_id)
def test_check_accepts_or_refuses_cleanly(checked, combo):
    _checked(checked, combo)


def test_check_both_accepts_and_refuses_so_agreement_is_not_vacuous(checked):
    outcomes = {combo: _checked(checked, combo) for combo in CASES}
    accepted = {c for c, (code, _) in outcomes.items() if code == 0}
    refused = {c: error for c, (code, error) in outcomes.items() if code == 2}
    for model in MODEL_NAMES:  # every model trains on the plain chain at least, and is refused somewhere
        assert (model, CHAIN, "none", "static", "plain") in accepted, model
        assert any(c[0] == model for c in refused), model
    # on each axis some value is refused for some model: a shape, a bottom, a weighting
    plain = [c for c in refused if c[4] == "plain"]
    assert {s for _, s, b, w, _ in plain if b == "none" and w == "static"} - {CHAIN}
    assert {b for _, s, b, w, _ in plain if s == CHAIN and w == "static"} - {"none"}
    assert {w for _, s, b, w, _ in plain if s == CHAIN and b == "none"} - {"static"}
    # and each preflight-only problem is refused by `check` itself, with the preflight's message
    for variant, (_, message) in VARIANTS.items():
        if message is not None:
            assert any(c[4] == variant and message in error for c, error in refused.items()), variant
    assert any(c[4] == "wide_last_tower" for c in accepted)  # only models with AIT transfer refuse it


@pytest.mark.parametrize("combo", CASES, ids=_id)
def test_fit_agrees_with_check(checked, configs, combo, tmp_path, capfd):
    _fit_agrees(checked, configs, combo, tmp_path / "run")
    assert capfd.readouterr() == ("", "")  # everything went through the captured streams: nothing printed
