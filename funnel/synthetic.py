"""Synthetic sequential-funnel data with a known ground truth.

Every row is one impression. A chain of stages follows it (default ``click -> conversion``),
and a stage can only happen if its parent did. The true probabilities are built from hidden
latent factors, so a model can be scored against the oracle. Each row also gets a
counterfactual draw ``cf_<stage>`` of every conditional stage, whether or not the parent
happened. ESMM-style models claim to estimate that quantity over the whole impression space,
but observed data only shows it on the rows where the parent happened.

Ids are short strings (``"u12"``, ``"i7"``, ``"c3"``, ``"d1"``) so that nothing downstream
mistakes them for numbers. ``hour`` is an int from 0 to 23 and should be treated as a
category. Rows are drawn independently, so they are already in random order.

`generate_days` draws a sequence of days from one such world, with item popularity drifting
from day to day and new items appearing (for warm-start studies).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from funnel.atomic import atomic_path, write_text
from funnel.errors import UserError

log = logging.getLogger(__name__)

MAX_STAGES = 8
FEATURE_COLUMNS = ("user_id", "item_id", "item_category", "device", "hour", "price", "user_age", "n_prev_visits")
_DEFAULT_RATES = (0.08, 0.15, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5)
_LATENT_DIM = 8
_ZIPF_OFFSET = 10.0
_SHARED = 0.5  # share of each item vector's variance common to all stages
_HISTORY_EFFECT = 4.0  # click logit per unit share of the history in the candidate's category
_HISTORY_STEER = 0.4  # with a history: share of impressions showing an item of a favourite category
_HISTORY_FOCUS = 0.7  # share of history items drawn from the user's two favourite categories
_POSITION_EFFECT = 1.0  # first-stage logit falls by this times log(position)
# ESM² data: logit shifts of the last stage through the branch (y3) and around it (y4); most
# purchases go through the cart, as in the ESM² paper's Taobao logs
_BRANCH_SHIFT = (2.5, -1.5)
_BRANCH_SCALE = 0.5  # ... and depend on x mostly through whether the cart happened (y2)
_MISSING_VISITS = 0.02  # share of n_prev_visits hidden as NaN, to exercise missing-value handling


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. Every field is checked on construction and all problems are reported together."""

    rows: int = 200_000
    stages: tuple[str, ...] = ("click", "conversion")  # a chain; the first stage follows the impression
    n_users: int = 5_000
    n_items: int = 2_000
    n_categories: int = 40
    n_devices: int = 4
    zipf: float = 1.1  # popularity skew of users and items; 0 = uniform
    rates: tuple[float, ...] | None = None  # target mean p(stage | parent); None -> _DEFAULT_RATES
    bias_share: float = 0.3  # share of "clickbait" items whose later stages run against their click appeal
    bias_strength: float = 2.0  # logit penalty per standard deviation of click appeal, for clickbait items
    # std of per-row logit noise inside the true probability: heterogeneity no feature explains.
    # 0 keeps the truth a function of the observed features, so the oracle is reachable.
    noise: float = 0.0
    valid_frac: float = 0.1
    test_frac: float = 0.1
    seed: int = 0
    # share of each hidden per-user/per-item effect (biases and latent vectors) common to all
    # stages, unrotated: item quality that drives clicks also drives conversions, so a model
    # sharing embeddings across stages can learn the sparse stages from the dense first one
    stage_correlation: float = 0.0
    # > 0: a `history` column of up to this many recently viewed items ("i3|i17|i5", most
    # recent last), drawn mostly from two favourite categories per user; every stage's truth
    # rises with the share of the history in the candidate item's category (DIN's signal)
    history_len: int = 0
    # > 0: a `position` column (1..positions, where the item was displayed). A ranker puts
    # relevant items and favoured categories on top, and the first stage's logit falls by
    # log(position) · 1.0; the truth gains true_p_<first>_free and cf_<first>_free: the same
    # impression at position 1
    positions: int = 0
    # ESM²: the last stage follows the third-to-last and is reached through both outcomes of
    # the second-to-last (e.g. click -> cart -> buy with buy `after: click, via: cart`), each
    # outcome with its own hidden tower; needs 3+ stages
    branch: bool = False

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON/YAML) but store tuples so the spec stays hashable.
        object.__setattr__(self, "stages", tuple(self.stages))
        if self.rates is not None:
            object.__setattr__(self, "rates", tuple(float(r) for r in self.rates))
        problems = list(self._problems())
        if problems:
            raise ValueError("invalid SyntheticSpec:\n  - " + "\n  - ".join(problems))

    def _problems(self) -> Iterator[str]:
        if self.rows <= 0:
            yield f"rows={self.rows}: must be a positive int, e.g. rows=10_000"
        for name in ("n_users", "n_items", "n_categories", "n_devices"):
            if getattr(self, name) < 1:
                yield f"{name}={getattr(self, name)}: must be >= 1"
        if not 1 <= len(self.stages) <= MAX_STAGES:
            yield f"stages={self.stages}: give between 1 and {MAX_STAGES} stage names"
        duplicates = sorted({s for s in self.stages if self.stages.count(s) > 1})
        if duplicates:
            yield f"stages={self.stages}: duplicate names {duplicates}; give every stage a unique name"
        for s in self.stages:
            if not (isinstance(s, str) and s.isidentifier()):
                yield f"stages: {s!r} is not a valid name; use letters, digits and underscores"
            elif s in FEATURE_COLUMNS or s in ("history", "position"):
                yield f"stages: {s!r} is also a feature column; rename the stage"
        if self.rates is not None:
            if len(self.rates) != len(self.stages):
                yield (
                    f"rates has {len(self.rates)} values but stages has {len(self.stages)}; "
                    "give one rate per stage, or rates=None for the defaults"
                )
            if any(not 0 < r < 1 for r in self.rates):
                yield f"rates={self.rates}: every rate must lie strictly between 0 and 1"
        if self.zipf < 0:
            yield f"zipf={self.zipf}: must be >= 0 (0 means uniform popularity)"
        for name in ("bias_share", "stage_correlation"):
            if not 0 <= getattr(self, name) <= 1:
                yield f"{name}={getattr(self, name)}: must lie in [0, 1]"
        if self.positions < 0:
            yield f"positions={self.positions}: must be >= 0 (0: no position column)"
        if self.history_len < 0:
            yield f"history_len={self.history_len}: must be >= 0 (0: no history column)"
        for name in ("bias_strength", "noise"):
            if getattr(self, name) < 0:
                yield f"{name}={getattr(self, name)}: must be >= 0"
        for name in ("valid_frac", "test_frac"):
            if not 0 <= getattr(self, name) < 1:
                yield f"{name}={getattr(self, name)}: must lie in [0, 1)"
        if self.branch and len(self.stages) < 3:
            yield f"branch=True needs at least 3 stages (e.g. click, cart, buy), got {len(self.stages)}"
        if self.valid_frac + self.test_frac >= 1:
            yield (
                f"valid_frac + test_frac = {self.valid_frac + self.test_frac:g}: must be < 1 "
                "so that training rows remain; lower one of them"
            )

    @property
    def target_rates(self) -> tuple[float, ...]:
        """The rates in effect: ``rates`` if given, otherwise the defaults, one per stage."""
        return self.rates if self.rates is not None else _DEFAULT_RATES[: len(self.stages)]


def truth_columns(stages: Sequence[str]) -> list[str]:
    """Names of all ground-truth columns for these stages, in frame order."""
    return [c for s in stages for c in (f"true_p_{s}_cond", f"true_p_{s}", f"cf_{s}")]


def _column_docs(stages: Sequence[str]) -> dict[str, str]:
    """A one-line description of every column `generate` produces."""
    docs = {
        "user_id": "categorical, 'u<int>'; Zipf-popular users",
        "item_id": "categorical, 'i<int>'; Zipf-popular items",
        "item_category": "categorical, 'c<int>'; a function of item_id",
        "device": "categorical, 'd<int>'; context",
        "hour": "categorical int 0..23; context, evening-heavy traffic",
        "price": "numeric > 0; lognormal item price with small per-row jitter",
        "user_age": "numeric; a function of user_id",
        "n_prev_visits": f"numeric count >= 0, ~{_MISSING_VISITS:.0%} NaN (truth uses the hidden value)",
        "history": "sequence of item ids 'i3|i17', most recent last (only with history_len > 0)",
        "position": "categorical int 1..positions: display slot, 1 = top (only with positions > 0)",
    }
    parent = "impression"
    for s in stages:
        docs[s] = f"observed 0/1 label: {parent} happened and cf_{s} = 1"
        docs[f"true_p_{s}_cond"] = f"true p({s} | {parent}, x)"
        docs[f"true_p_{s}"] = f"true p({s} | impression, x) = product of the conditionals up to {s}"
        docs[f"cf_{s}"] = f"counterfactual 0/1 draw from true_p_{s}_cond, also where {parent} is 0"
        docs[f"true_p_{s}_free"] = f"true p({s} | x) had the row been shown at position 1 (only with positions > 0)"
        docs[f"cf_{s}_free"] = f"0/1 draw from true_p_{s}_free with the same uniform as {s} (only with positions > 0)"
        parent = s
    return docs


def generate(spec: SyntheticSpec) -> pd.DataFrame:
    """All rows: features, one 0/1 label per stage, then `truth_columns`. Deterministic from the seed."""
    rng = np.random.default_rng(spec.seed)
    return _draw(spec, rng, rng)[0]


def generate_days(spec: SyntheticSpec, days: int, drift: float = 0.3, new_items_per_day: int = 0) -> list[pd.DataFrame]:
    """``days`` frames of ``spec.rows`` impressions each, from one hidden world: the same users,
    items, latent vectors and truth functions (intercepts fixed on day 0) every day. Only what
    is shown moves:

    - item popularity drifts: every item's log-popularity takes a random walk with
      ``drift`` as the standard deviation of its daily step (0: the same popularity every day);
    - ``new_items_per_day`` items appear on each day after the first, with ids never seen
      before (``i<n_items>``, ``i<n_items + 1>``, ...): item ``i<n_items + k>`` first shows on
      day ``1 + k // new_items_per_day``, at a Zipf popularity of its own.

    The columns are those of `generate` (with the truth columns); each day's rates move a little
    with the popularity mix. Deterministic from the seed. The world differs from `generate`'s
    for the same seed and depends on ``days`` and ``new_items_per_day`` (they set the catalogue
    size). ``valid_frac``/``test_frac`` are ignored: split a day with `split_frames` if needed.
    """
    problems = list(_day_problems(spec, days, drift, new_items_per_day))
    if problems:
        raise ValueError("invalid generate_days arguments:\n  - " + "\n  - ".join(problems))
    world = dataclasses.replace(spec, n_items=spec.n_items + (days - 1) * new_items_per_day)
    ids = np.arange(world.n_items)
    birth = np.where(ids < spec.n_items, 0, (ids - spec.n_items) // max(new_items_per_day, 1) + 1)
    steps = np.random.default_rng([spec.seed, 5]).standard_normal((days, world.n_items))
    walk = drift * np.cumsum(steps[1:], axis=0)  # (days - 1, items): day 0 has no step yet
    frames, intercepts = [], None
    for day in range(days):
        log_shift = np.where(birth <= day, walk[day - 1] if day else 0.0, -np.inf)
        # The world stream restarts every day, so every day draws the same world.
        same_world, todays_rows = np.random.default_rng([spec.seed, 6]), np.random.default_rng([spec.seed, 7, day])
        frame, intercepts = _draw(world, same_world, todays_rows, log_shift, intercepts)
        frames.append(frame)
    return frames


def _day_problems(spec: SyntheticSpec, days: int, drift: float, new_items_per_day: int) -> Iterator[str]:
    if not isinstance(days, int | np.integer) or days < 1:
        yield f"days={days!r}: must be an int >= 1, e.g. days=10"
    if not isinstance(drift, int | float | np.number) or not 0 <= drift < np.inf:
        yield f"drift={drift!r}: must be a finite number >= 0 (0: popularity does not move), e.g. drift=0.3"
    if not isinstance(new_items_per_day, int | np.integer) or new_items_per_day < 0:
        yield f"new_items_per_day={new_items_per_day!r}: must be an int >= 0, e.g. new_items_per_day=50"
    if spec.history_len or spec.positions:
        yield (
            f"history_len={spec.history_len}, positions={spec.positions}: generate_days draws neither "
            "column; set both to 0"
        )


def _draw(
    spec: SyntheticSpec,
    world: np.random.Generator,
    rows: np.random.Generator,
    item_log_shift: np.ndarray | None = None,
    intercepts: list[float] | None = None,
) -> tuple[pd.DataFrame, list[float]]:
    """The frame of `generate` and each stage's calibrated intercept. ``world`` draws the hidden
    world (ids' attributes, latent vectors, effects), ``rows`` the impressions; `generate` passes
    one stream as both (the draws interleave, in this order). ``item_log_shift`` (per item, -inf:
    never shown) moves the item popularity; ``intercepts`` replaces the calibration."""
    n, n_stages, d = spec.rows, len(spec.stages), _LATENT_DIM

    # Who sees what, and when.
    u = rows.choice(spec.n_users, size=n, p=_zipf_weights(spec.n_users, spec.zipf, world))
    item_p = _zipf_weights(spec.n_items, spec.zipf, world)
    if item_log_shift is not None:
        item_p = item_p * np.exp(item_log_shift)
        item_p /= item_p.sum()
    i = rows.choice(spec.n_items, size=n, p=item_p)
    item_cat = world.integers(spec.n_categories, size=spec.n_items)
    if spec.history_len:  # own stream: the other columns do not move
        side = np.random.default_rng([spec.seed, 3])
        favourite = side.integers(spec.n_categories, size=(spec.n_users, 2))[u]  # (N, 2) per row's user
        steer = side.random(n) < _HISTORY_STEER  # the recommender shows items of a favourite category
        fav_items = _items_in(side, np.take_along_axis(favourite, side.integers(2, size=(n, 1)), 1)[:, 0], item_cat)
        i = np.where(steer, fav_items, i)
    device = rows.choice(spec.n_devices, size=n, p=world.dirichlet(np.full(spec.n_devices, 2.0)))
    traffic = 1 + 0.6 * np.sin(2 * np.pi * (np.arange(24) - 14) / 24)
    hour = rows.choice(24, size=n, p=traffic / traffic.sum())

    # Observed numeric features.
    item_logprice = world.normal(3.5, 0.8, spec.n_categories)[item_cat] + world.normal(0, 0.5, spec.n_items)
    logprice = item_logprice[i] + rows.normal(0, 0.05, n)  # row jitter: discounts, rounding
    user_age = np.clip(world.normal(38, 12, spec.n_users), 18, 80).round()
    visits = rows.poisson(np.exp(world.normal(0.5, 1.0, spec.n_users))[u]).astype(float)
    hide_visits = rows.random(n) < _MISSING_VISITS  # hidden from the model only; the truth uses them
    z_item_price = _standardise(item_logprice)
    z_price = (logprice - item_logprice.mean()) / (item_logprice.std() + 1e-12)
    z_age, z_visits = _standardise(user_age)[u], _standardise(np.log1p(visits))

    # Hidden per-stage effects. Every stage reads the same user vector and a shared part of the
    # item vector, so multi-task models have something to transfer; later stages see the shared
    # part through a random rotation, so without clickbait their logits barely correlate with the
    # click logit and bias_share alone controls how unrepresentative the clicked rows are.
    n_towers = n_stages + int(spec.branch)  # the branched stage has a second hidden tower
    user_vec = world.standard_normal((spec.n_users, d))
    rotation = _random_rotations(world, n_towers, d)
    shared_vec = world.standard_normal((spec.n_items, d))
    item_vec = np.sqrt(_SHARED) * np.einsum("id,kde->kie", shared_vec, rotation) + np.sqrt(
        1 - _SHARED
    ) * world.standard_normal((n_towers, spec.n_items, d))
    user_bias = world.normal(0, 0.5, (n_towers, spec.n_users))
    item_bias = world.normal(0, 0.8, (n_towers, spec.n_items))
    if spec.stage_correlation > 0:  # a separate stream: the default data does not move
        rho, common = spec.stage_correlation, np.random.default_rng([spec.seed, 2])
        item_vec = np.sqrt(rho) * common.standard_normal((spec.n_items, d)) + np.sqrt(1 - rho) * item_vec
        user_bias = np.sqrt(rho) * common.normal(0, 0.5, spec.n_users) + np.sqrt(1 - rho) * user_bias
        item_bias = np.sqrt(rho) * common.normal(0, 0.8, spec.n_items) + np.sqrt(1 - rho) * item_bias
    cat_eff = world.normal(0, 0.3, (n_towers, spec.n_categories))
    dev_eff = world.normal(0, 0.3, (n_towers, spec.n_devices))
    hour_amp, hour_phase = world.normal(0, 0.3, n_towers), world.uniform(0, 24, n_towers)
    # Price and loyalty matter little for a click but a lot for the later, costlier steps.
    later = np.arange(n_towers) > 0
    beta_price = np.where(later, -0.4, -0.05) + world.normal(0, 0.1, n_towers)
    beta_visits = np.where(later, 0.3, 0.05) + world.normal(0, 0.1, n_towers)
    beta_age = world.normal(0, 0.2, n_towers)

    # Clickbait: for these items every later stage runs against the item's own click appeal.
    click_appeal = _standardise(item_bias[0] + cat_eff[0, item_cat] + beta_price[0] * z_item_price)
    clickbait = world.random(spec.n_items) < spec.bias_share
    bait_penalty = spec.bias_strength * np.where(clickbait, click_appeal, 0.0)

    match = np.zeros(n)
    if spec.history_len:
        history, match = _history(side, spec, favourite, item_cat, item_cat[i])
        match = match - match.mean()

    labels, truth = {}, {}
    parent_path, parent_label = np.ones(n), np.ones(n, dtype=bool)
    uv = user_vec[u]  # (N, d), reused by every stage

    def stage_logit(k: int) -> np.ndarray:
        logit = (0.8 / np.sqrt(d)) * np.einsum("nd,nd->n", uv, item_vec[k][i])
        logit += user_bias[k][u] + item_bias[k][i] + cat_eff[k][item_cat[i]] + dev_eff[k][device]
        logit += hour_amp[k] * np.sin(2 * np.pi * (hour - hour_phase[k]) / 24)
        logit += beta_price[k] * z_price + beta_age[k] * z_age + beta_visits[k] * z_visits
        if k > 0:
            logit -= bait_penalty[i]
        logit += (_HISTORY_EFFECT if k == 0 else 0.75 * _HISTORY_EFFECT) * match
        return logit + spec.noise * rows.standard_normal(n)

    paths, label_of, cf_of, cond_of, used = [], [], [], [], []
    for k, (stage, rate) in enumerate(zip(spec.stages, spec.target_rates, strict=True)):
        if spec.branch and k == n_stages - 1:
            # ESM²: reached from stage k-2 through both outcomes of stage k-1 (the branch),
            # y3 when the branch happened (a boost: carted items sell), y4 when it did not
            after_path, after_label, y2, branch_cf = paths[k - 2], label_of[k - 2], cond_of[k - 1], cf_of[k - 1]
            l3 = _BRANCH_SCALE * stage_logit(k) + _BRANCH_SHIFT[0]
            l4 = _BRANCH_SCALE * stage_logit(n_stages) + _BRANCH_SHIFT[1]
            c = _calibrate_mixture(l3, l4, y2, after_path, rate) if intercepts is None else intercepts[k]
            y3, y4 = _sigmoid(l3 + c), _sigmoid(l4 + c)
            p_cond = y2 * y3 + (1 - y2) * y4
            draw = rows.random(n)
            cf = np.where(branch_cf, draw < y3, draw < y4)
            parent_label, parent_path = after_label & cf, after_path * p_cond
            truth |= {
                f"true_p_{stage}_via_{spec.stages[k - 1]}_cond": y3,
                f"true_p_{stage}_via_not_{spec.stages[k - 1]}_cond": y4,
            }
        else:
            logit = stage_logit(k)
            free = logit  # position-free relevance (the same row shown at position 1)
            if k == 0 and spec.positions:
                position = _positions(spec, logit, item_cat[i])
                logit = logit - _POSITION_EFFECT * np.log(position)
            # Weight by the parent's path probability: the expected parent-positive population.
            c = _calibrate_intercept(logit, parent_path, rate) if intercepts is None else intercepts[k]
            logit += c
            p_cond = _sigmoid(logit)
            draw = rows.random(n)
            cf = draw < p_cond
            if k == 0 and spec.positions:
                p_free = _sigmoid(free + c)
                truth |= {f"true_p_{stage}_free": p_free, f"cf_{stage}_free": (draw < p_free).astype(np.int64)}
            parent_label = parent_label & cf
            parent_path = parent_path * p_cond
        used.append(c)
        paths.append(parent_path)
        label_of.append(parent_label)
        cf_of.append(cf)
        cond_of.append(p_cond)
        labels[stage] = parent_label.astype(np.int64)
        truth |= {f"true_p_{stage}_cond": p_cond, f"true_p_{stage}": parent_path, f"cf_{stage}": cf.astype(np.int64)}

    frame = {
        "user_id": _names("u", spec.n_users)[u],
        "item_id": _names("i", spec.n_items)[i],
        "item_category": _names("c", spec.n_categories)[item_cat[i]],
        "device": _names("d", spec.n_devices)[device],
        "hour": hour,
        "price": np.round(np.exp(logprice), 2),
        "user_age": user_age[u],
        "n_prev_visits": np.where(hide_visits, np.nan, visits),
    }
    if spec.history_len:
        frame["history"] = history
    if spec.positions:
        frame["position"] = position
    extra_truth = {
        c: v for c, v in truth.items() if "_via_" in c or c.endswith("_free")
    }  # ESM²'s y3, y4; position-free
    return pd.DataFrame(frame | labels | {c: truth[c] for c in truth_columns(spec.stages)} | extra_truth), used


def split_frames(df: pd.DataFrame, spec: SyntheticSpec) -> dict[str, pd.DataFrame]:
    """Split into disjoint ``train``/``valid``/``test`` frames sized by the spec's fractions."""
    # A separate stream, so the split does not move when generate() changes its draws.
    order = np.random.default_rng([spec.seed, 1]).permutation(len(df))
    n_test, n_valid = round(len(df) * spec.test_frac), round(len(df) * spec.valid_frac)
    parts = {"train": order[n_test + n_valid :], "valid": order[n_test : n_test + n_valid], "test": order[:n_test]}
    return {name: df.iloc[np.sort(idx)].reset_index(drop=True) for name, idx in parts.items()}


SYNTH_FILES = ("train.csv", "valid.csv", "test.csv", "truth.json")


def write(out_dir: str | Path, spec: SyntheticSpec) -> dict[str, Path]:
    """Write train/valid/test CSVs and ``truth.json``; return their paths keyed train/valid/test/truth."""
    out = Path(out_dir)
    taken = [str(out / n) for n in SYNTH_FILES if (out / n).exists()]
    if taken:
        raise UserError(
            f"{', '.join(taken)} already exist(s); funnel synth never overwrites files. "
            "Choose a new folder, or delete them first."
        )
    start = time.perf_counter()
    frames = split_frames(generate(spec), spec)
    paths: dict[str, Path] = {}
    for name, frame in frames.items():
        paths[name] = out / f"{name}.csv"
        # 8 significant digits keep cents on prices and make the files about half as large.
        with atomic_path(paths[name]) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.8g")
    truth = {
        "spec": dataclasses.asdict(spec) | {"target_rates": list(spec.target_rates)},
        "rows": {name: len(frame) for name, frame in frames.items()},
        "columns": {c: doc for c, doc in _column_docs(spec.stages).items() if c in frames["test"].columns},
        "oracle_test": _oracle_metrics(frames["test"], spec.stages),
    }
    paths["truth"] = out / "truth.json"
    write_text(paths["truth"], json.dumps(truth, indent=2) + "\n")
    log.info("wrote %d rows to %s in %.1fs", spec.rows, out, time.perf_counter() - start)
    return paths


def _oracle_metrics(df: pd.DataFrame, stages: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Per stage: observed rates and the AUCs the true probabilities reach (None if a class is absent).

    ``path_auc``: true_p_s vs label s, all rows. ``cond_auc``: true_p_s_cond vs label s on
    parent-positive rows. ``cf_auc``: true_p_s_cond vs cf_s, all rows.
    """
    metrics: dict[str, dict[str, float | None]] = {}
    parent = np.ones(len(df), dtype=bool)
    for s in stages:
        label, cond = df[s].to_numpy() == 1, df[f"true_p_{s}_cond"].to_numpy()
        metrics[s] = {
            "rate_on_parent": float(label[parent].mean()) if parent.any() else None,
            "true_cond_mean_on_parent": float(cond[parent].mean()) if parent.any() else None,
            "true_cond_mean_all": float(cond.mean()),
            "path_auc": _auc(label, df[f"true_p_{s}"].to_numpy()),
            "cond_auc": _auc(label[parent], cond[parent]),
            "cf_auc": _auc(df[f"cf_{s}"].to_numpy() == 1, cond),
        }
        parent = label
    return metrics


def _positions(spec: SyntheticSpec, relevance: np.ndarray, category: np.ndarray) -> np.ndarray:
    """Display slots (1 = top, every slot equally often) from a ranker that mixes relevance
    with a placement rule: some item categories are shown lower whatever their relevance
    (sponsored slots, merchandising). A model that ignores position mistakes that rule for
    low appeal of those categories; a position-aware one need not."""
    rng = np.random.default_rng([spec.seed, 4])
    placement = rng.normal(0, 1.0, spec.n_categories)
    score = 0.5 * _standardise(relevance) - placement[category] + rng.normal(0, 1.0, len(relevance))
    rank = np.argsort(np.argsort(-score, kind="stable"), kind="stable")  # 0 = best
    return 1 + (rank * spec.positions) // len(relevance)


def _items_in(rng: np.random.Generator, cats: np.ndarray, item_cat: np.ndarray) -> np.ndarray:
    """One uniformly drawn item of each given category (any item for a category without items)."""
    n_items, n_cats = len(item_cat), int(item_cat.max()) + 1
    by_cat = np.argsort(item_cat, kind="stable")  # item ids grouped by category
    count = np.bincount(item_cat, minlength=max(n_cats, int(cats.max()) + 1))
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    pick = start[cats] + (rng.random(cats.shape) * np.maximum(count[cats], 1)).astype(np.int64)
    return np.where(count[cats] == 0, rng.integers(n_items, size=cats.shape), by_cat[np.minimum(pick, n_items - 1)])


def _history(
    rng: np.random.Generator, spec: SyntheticSpec, favourite: np.ndarray, item_cat: np.ndarray, target_cat: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per row: "|"-joined recent items, and the share of them in the candidate's category."""
    n, width = len(favourite), spec.history_len
    cats = np.where(
        rng.random((n, width)) < _HISTORY_FOCUS,
        np.take_along_axis(favourite, rng.integers(2, size=(n, width)), 1),
        rng.integers(spec.n_categories, size=(n, width)),
    )
    items = _items_in(rng, cats, item_cat)
    length = rng.integers(0, width + 1, size=n)
    real = np.arange(width)[None, :] < length[:, None]  # (N, L) the first `length` slots are used
    same = (item_cat[items] == target_cat[:, None]) & real
    share = same.sum(1) / np.maximum(length, 1)
    names = _names("i", spec.n_items)
    text = ["|".join(names[items[r, : length[r]]]) for r in range(n)]
    return np.array(text, dtype=object), share


def _zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    # Zipf-Mandelbrot: the offset keeps a long tail without a handful of ids owning most rows.
    w = (np.arange(1, n + 1) + _ZIPF_OFFSET) ** -float(exponent)
    return rng.permutation(w / w.sum())  # shuffled so that popularity is not readable from the id


def _random_rotations(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """(n, d, d) random orthogonal matrices; the first is the identity."""
    q, r = np.linalg.qr(rng.standard_normal((n, d, d)))
    q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]  # makes the draw uniform (Haar)
    q[0] = np.eye(d)
    return q


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-12)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # tanh form cannot overflow


def _names(prefix: str, n: int) -> np.ndarray:
    return np.char.add(prefix, np.arange(n).astype(str)).astype(object)


def _calibrate_intercept(logit: np.ndarray, weight: np.ndarray, rate: float) -> float:
    """The shift c with weighted mean of sigmoid(logit + c) == rate (Newton, bisection fallback)."""
    w = weight / weight.sum()
    lo, hi = -50.0, 50.0
    c = float(np.log(rate / (1 - rate)) - w @ logit)
    for _ in range(100):
        p = _sigmoid(logit + c)
        gap = float(w @ p) - rate
        if abs(gap) < 1e-7 * rate:
            break
        lo, hi = (lo, c) if gap > 0 else (c, hi)
        slope = float(w @ (p * (1 - p)))
        step = c - gap / slope if slope > 0 else lo - 1.0
        c = step if lo < step < hi else 0.5 * (lo + hi)  # the mean is monotone in c, so bisection is safe
    return c


def _calibrate_mixture(l3: np.ndarray, l4: np.ndarray, y2: np.ndarray, weight: np.ndarray, rate: float) -> float:
    """The shift c with weighted mean of y2·σ(l3+c) + (1-y2)·σ(l4+c) == rate (bisection: monotone in c)."""
    w = weight / weight.sum()
    lo, hi = -50.0, 50.0
    for _ in range(80):
        c = 0.5 * (lo + hi)
        gap = float(w @ (y2 * _sigmoid(l3 + c) + (1 - y2) * _sigmoid(l4 + c))) - rate
        lo, hi = (lo, c) if gap > 0 else (c, hi)
    return 0.5 * (lo + hi)


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = pd.Series(score).rank().to_numpy()  # average ranks, so ties count one half
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
