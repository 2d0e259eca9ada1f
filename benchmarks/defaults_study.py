"""funnel's defaults against a plain PyTorch ESMM with PyTorch's own defaults (issue 14).

Three arms per dataset and seed, all on the same splits and the same encoded tensors:

- ``before``: ``funnel fit`` with the defaults of earlier releases: embeddings N(0, 0.05²),
  numerics standardised raw, one epoch, no early stopping.
- ``after``: ``funnel fit`` with today's defaults: the config gives only data, features
  (name, kind, column) and stages; every other key is funnel's default.
- ``plain``: a hand-written ESMM (``nn.Embedding``'s N(0, 1) and ``nn.Linear``'s own
  initialisation, Adam 1e-3, BCE on each stage's path probability: pCTR and pCTCVR), with
  funnel's default tower and embedding sizes, on tensors encoded by funnel's Featurizer with
  ``transform: auto`` (log1p for a non-negative skewed column), trained for up to
  PLAIN_EPOCHS epochs keeping the epoch with the best validation AUC of the last stage
  (patience PLAIN_PATIENCE): the obvious baseline with a validation split.
- ``plain_mean`` (for ablations): the plain loop keeping the epoch with the best mean of every
  stage's path AUC on valid, the monitor funnel falls back to when the last stage has few labels.

Reported per arm: the test AUC of each stage's path probability and ``auc_cond`` of the last
stage (its conditional on the rows where its parent happened), mean ± std over the runs.
A seed sets the synthetic data's draw and, with ``--draws 1``, the model's initialisation and
order. ``--draws K`` trains K models per arm and seed on the same data and splits, with
initialisation seeds ``seed + DRAW_STRIDE·k`` (funnel's ``seed`` key sets only the model's
initialisation and batch order: the valid split follows ``data.split_seed``, and the synthetic
and Hillstrom splits are files). The paired column is then the mean over seeds of
(mean over draws of ``after`` − mean over draws of ``plain``) ± its standard error, and how many
seeds ``after`` wins. ``--set KEY=VALUE`` (repeatable) overrides the ``after`` arm's config, for
single-variable ablations. Datasets: three synthetic funnels (default; larger with sparser rates and more
skew; stronger selection bias), Census (income -> never married, configs/esmm_census.yaml),
Adult (configs/esmm_adult.yaml) and Hillstrom (visit -> conversion, a seeded 80/10/10 split).

    OMP_NUM_THREADS=1 python benchmarks/defaults_study.py --seeds 0 1 2 --out study.json
    python benchmarks/defaults_study.py --datasets adult --arms after,plain --seeds 0
    OMP_NUM_THREADS=1 python benchmarks/defaults_study.py --datasets synth --arms after,plain \
        --seeds 0 1 2 3 4 5 --draws 3 --out study.json

The last line printed is one JSON object; ``--out`` also writes it, and a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn
from torchmetrics.functional.classification import binary_auroc

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("FUNNEL_DATA_DIR", ROOT.parent / "shared" / "data"))
PLAIN_EPOCHS, PLAIN_PATIENCE, PLAIN_LR, PLAIN_BATCH = 10, 2, 1e-3, 1024
OLD_INIT_STD = 0.05
DRAW_STRIDE = 1000  # draw k of data seed s initialises from seed s + 1000·k (k = 0: the seed itself)

SYNTH_FEATURES = [
    *({"name": c, "kind": "categorical"} for c in ("user_id", "item_id", "item_category", "device", "hour")),
    *({"name": c, "kind": "numeric"} for c in ("price", "user_age", "n_prev_visits")),
]
SYNTH = {  # SyntheticSpec arguments of each synthetic variant
    "synth": {"rows": 100_000},
    "synth_sparse": {"rows": 200_000, "rates": [0.03, 0.08], "zipf": 1.3, "n_users": 20_000, "n_items": 8_000},
    "synth_bias": {"rows": 100_000, "bias_share": 0.6, "bias_strength": 3.0},
}
HILLSTROM_CATS = ("history_segment", "mens", "womens", "zip_code", "newbie", "channel", "segment")


# ---- datasets: a config of data, features and stages only ----------------------------------------
def from_yaml(name: str) -> dict[str, Any]:
    """A shipped config reduced to data (without batch_size), bare features and the stages."""
    cfg = yaml.safe_load((ROOT / "configs" / name).read_text())
    data = {k: v for k, v in cfg["data"].items() if k != "batch_size"}
    for key in ("train", "test"):
        data[key] = data[key].replace("${data_dir}", str(DATA))
    features = [{k: f[k] for k in ("name", "kind", "column") if k in f} for f in cfg["features"]]
    return {"data": data, "features": features, "funnel": {"model": "esmm", "stages": cfg["funnel"]["stages"]}}


def hillstrom(work: Path) -> dict[str, Any]:
    """Hillstrom's 64,000 customers split 80/10/10 (seed 0) into CSVs: visit -> conversion."""
    out = work / "hillstrom"
    if not out.exists():
        out.mkdir(parents=True)
        df = pd.read_csv(next((DATA / "hillstrom").glob("*.csv")))
        part = np.random.default_rng(0).permutation(len(df)) % 10
        for split, rows in (("train", part >= 2), ("valid", part == 1), ("test", part == 0)):
            df[rows].to_csv(out / f"{split}.csv", index=False)
    features = [{"name": c, "kind": "categorical"} for c in HILLSTROM_CATS]
    features += [{"name": "recency", "kind": "numeric"}, {"name": "history", "kind": "numeric"}]
    stages = [{"name": "visit"}, {"name": "conversion", "after": "visit"}]
    data = {s: str(out / f"{s}.csv") for s in ("train", "valid", "test")}
    return {"data": data, "features": features, "funnel": {"model": "esmm", "stages": stages}}


def synthetic(name: str, seed: int, work: Path) -> dict[str, Any]:
    from funnel.synthetic import SyntheticSpec, write

    out = work / f"{name}-{seed}"
    if not out.exists():
        write(out, SyntheticSpec(**SYNTH[name], seed=seed))
    data = {s: str(out / f"{s}.csv") for s in ("train", "valid", "test")}
    stages = [{"name": "click"}, {"name": "conversion", "after": "click"}]
    return {"data": data, "features": SYNTH_FEATURES, "funnel": {"model": "esmm", "stages": stages}}


def dataset(name: str, seed: int, work: Path) -> dict[str, Any]:
    if name in SYNTH:
        return synthetic(name, seed, work)
    if name == "census":
        return from_yaml("esmm_census.yaml")
    if name == "adult":
        return from_yaml("esmm_adult.yaml")
    if name == "hillstrom":
        return hillstrom(work)
    raise SystemExit(f"unknown dataset {name!r}; choose from {[*SYNTH, 'census', 'adult', 'hillstrom']}")


# ---- the funnel arms --------------------------------------------------------------------------------
@contextlib.contextmanager
def init_std(value: float):
    """Temporarily give funnel's embedding tables (shared and bias tower) another init_std default."""
    from funnel.models.bias import BiasTower
    from funnel.models.embedding import SharedEmbeddings

    saved = []
    for fn in (SharedEmbeddings.__init__, BiasTower.__init__):
        names = [p.name for p in inspect.signature(fn).parameters.values() if p.default is not p.empty]
        defaults = list(fn.__defaults__)
        saved.append((fn, fn.__defaults__))
        defaults[names.index("init_std")] = value
        fn.__defaults__ = tuple(defaults)
    try:
        yield
    finally:
        for fn, defaults in saved:
            fn.__defaults__ = defaults


def old_defaults(base: dict[str, Any]) -> dict[str, Any]:
    features = [{**f, "transform": "standardize"} if f["kind"] == "numeric" else f for f in base["features"]]
    return {**base, "features": features, "trainer": {"max_epochs": 1, "early_stopping": None}}


def run_funnel(
    base: dict[str, Any], seed: int, work: Path, before: bool, overrides: tuple[str, ...] = ()
) -> dict[str, float]:
    """``funnel fit`` of the config (as ``fit_config``: the run directory's metrics.json, on test);
    ``seed`` is funnel's ``seed`` key (initialisation and order), ``overrides`` are ``key=value``."""
    import copy

    from funnel.spec import config_from_dict
    from funnel.spec.loader import apply_override
    from funnel.training.fit import fit_config

    raw = copy.deepcopy(old_defaults(base) if before else base)
    for item in overrides:
        apply_override(raw, item)
    trainer = {**raw.get("trainer", {}), "enable_progress_bar": False, "logger": False}
    raw = {**raw, "seed": seed, "run_dir": str(work / f"run-{time.monotonic_ns()}"), "trainer": trainer}
    with init_std(OLD_INIT_STD) if before else contextlib.nullcontext():
        run_dir = fit_config(config_from_dict(raw))
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    stages = [s["name"] for s in base["funnel"]["stages"]]
    return {key: float(metrics[key]) for key in [*(f"auc/{s}" for s in stages), f"auc_cond/{stages[-1]}"]}


# ---- the plain arm ------------------------------------------------------------------------------------
class PlainESMM(nn.Module):
    """One nn.Embedding per categorical column (PyTorch's N(0, 1)), numerics appended, one MLP
    tower per stage (nn.Linear's default init); the stage's logit is its conditional."""

    def __init__(self, cards: list[int], n_num: int, dim: int, hidden: list[int], n_stages: int):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(c, dim) for c in cards)
        self.towers = nn.ModuleList()
        for _ in range(n_stages):
            layers, width = [], len(cards) * dim + n_num
            for h in hidden:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
            self.towers.append(nn.Sequential(*layers, nn.Linear(width, 1)))

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        x = torch.cat([t(cat[:, j]) for j, t in enumerate(self.tables)] + [num], 1)  # (B, C·D + K)
        return torch.cat([tower(x) for tower in self.towers], 1)  # (B, S) conditional logits


def path_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(torch.sigmoid(logits), 1)  # (B, S): pCTR, pCTCVR, ...


@torch.no_grad()
def plain_scores(model: PlainESMM, table, batch: int = 65536) -> torch.Tensor:
    model.eval()
    out = [model(table.cat[i : i + batch], table.num[i : i + batch]) for i in range(0, len(table), batch)]
    model.train()
    return torch.cat(out)


def plain_aucs(logits: torch.Tensor, labels: torch.Tensor, stages: list[str]) -> dict[str, float]:
    paths = path_probs(logits)
    out = {f"auc/{s}": float(binary_auroc(paths[:, j], labels[:, j].long())) for j, s in enumerate(stages)}
    parent = labels[:, -2] > 0.5
    cond = torch.sigmoid(logits[parent, -1])
    out[f"auc_cond/{stages[-1]}"] = float(binary_auroc(cond, labels[parent, -1].long()))
    return out


def run_plain(base: dict[str, Any], seed: int, data_seed: int | None = None, pick: str = "last") -> dict[str, float]:
    """The plain loop; ``seed`` sets its initialisation and order, ``data_seed`` (default ``seed``)
    is the config's ``seed`` key, which no split depends on. ``pick``: the epoch with the best
    valid AUC of the ``last`` stage's path, or of the ``mean`` of every stage's path AUC (the
    arm ``plain_mean``, funnel's monitor when the last stage has few valid labels)."""
    from funnel.data.featurizer import Featurizer
    from funnel.data.sources import load_frames
    from funnel.runs import build_graph
    from funnel.spec import config_from_dict

    features = [{**f, "transform": "auto"} if f["kind"] == "numeric" else f for f in base["features"]]
    cfg = config_from_dict({**base, "features": features, "seed": seed if data_seed is None else data_seed})
    graph = build_graph(cfg)
    frames = load_frames(cfg)
    featurizer = Featurizer(cfg, graph).fit(frames["train"])
    tables = {split: featurizer.encode(df, split) for split, df in frames.items()}
    cats = [featurizer.encoders[f.name].cardinality for f in cfg.features if f.kind == "categorical"]
    hidden = list(cfg.funnel.tower.kwargs.get("hidden", (128, 64)))  # the mlp tower's default
    stages = graph.names
    torch.manual_seed(seed)
    model = PlainESMM(cats, tables["train"].num.shape[1], cfg.funnel.embed_dim, hidden, len(stages))
    opt = torch.optim.Adam(model.parameters(), lr=PLAIN_LR)
    train, best, best_auc, waited = tables["train"], None, -1.0, 0
    for _ in range(PLAIN_EPOCHS):
        order = torch.randperm(len(train))
        for i in range(0, len(train), PLAIN_BATCH):
            idx = order[i : i + PLAIN_BATCH]
            p = path_probs(model(train.cat[idx], train.num[idx])).clamp(1e-7, 1 - 1e-7)
            loss = sum(nn.functional.binary_cross_entropy(p[:, j], train.labels[idx, j]) for j in range(len(stages)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        valid = tables["valid"]
        aucs = plain_aucs(plain_scores(model, valid), valid.labels, stages)
        auc = aucs[f"auc/{stages[-1]}"] if pick == "last" else statistics.fmean(aucs[f"auc/{s}"] for s in stages)
        if auc > best_auc:
            best, best_auc, waited = {k: v.clone() for k, v in model.state_dict().items()}, auc, 0
        else:
            waited += 1
            if waited >= PLAIN_PATIENCE:
                break
    model.load_state_dict(best)
    return plain_aucs(plain_scores(model, tables["test"]), tables["test"].labels, stages)


# ---- the study ----------------------------------------------------------------------------------------
def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """dataset -> arm -> metric -> [mean, std (population), n]."""
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in results:
        for metric, value in r["aucs"].items():
            table.setdefault(r["dataset"], {}).setdefault(r["arm"], {}).setdefault(metric, []).append(value)
    stats = lambda v: [statistics.fmean(v), statistics.pstdev(v), len(v)]  # noqa: E731
    return {d: {a: {m: stats(v) for m, v in ms.items()} for a, ms in arms.items()} for d, arms in table.items()}


def paired(results: list[dict[str, Any]], arm: str, other: str) -> dict[str, dict[str, list[float]]]:
    """dataset -> metric -> [mean, standard error, seeds, seeds where ``arm`` is above] of the
    per-seed difference (mean over draws of ``arm``) - (mean over draws of ``other``)."""
    runs: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    for r in results:
        runs.setdefault((r["dataset"], r["seed"], r["arm"]), []).append(r["aucs"])
    diffs: dict[str, dict[str, list[float]]] = {}
    for (d, seed, a), draws in runs.items():
        if a == arm and (d, seed, other) in runs:
            for m in draws[0]:
                mean = statistics.fmean(x[m] for x in draws)
                diffs.setdefault(d, {}).setdefault(m, []).append(
                    mean - statistics.fmean(x[m] for x in runs[(d, seed, other)])
                )
    se = lambda v: statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else float("nan")  # noqa: E731
    return {
        d: {m: [statistics.fmean(v), se(v), len(v), sum(x > 0 for x in v)] for m, v in ms.items()}
        for d, ms in diffs.items()
    }


def markdown(results: list[dict[str, Any]], arms: list[str]) -> str:
    """mean ± std per arm over every run, then the paired difference after - plain over seeds
    (of the means over draws) ± its standard error, and the seeds where after is above."""
    summary = summarise(results)
    diff = paired(results, "after", "plain") if {"after", "plain"} <= set(arms) else {}
    draws = max(
        sum(1 for r in results if (r["dataset"], r["seed"], r["arm"]) == key)
        for key in {(r["dataset"], r["seed"], r["arm"]) for r in results}
    )
    head = [*arms, *(["after − plain (paired, ± SE)", "after above"] if diff else [])]
    lines = [f"| dataset | metric | {' | '.join(head)} |", "| --- | --- |" + " --- |" * len(head)]
    for d, by_arm in summary.items():
        for m in next(iter(by_arm.values())):
            cells = [f"{by_arm[a][m][0]:.4f} ± {by_arm[a][m][1]:.4f}" if a in by_arm else "" for a in arms]
            if diff:
                x = diff.get(d, {}).get(m)
                cells += [f"{x[0]:+.4f} ± {x[1]:.4f}", f"{x[3]}/{x[2]}"] if x else ["", ""]
            seeds = len({r["seed"] for r in results if r["dataset"] == d})
            lines.append(f"| {d} ({seeds} seeds × {draws} draws) | {m} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="synth,synth_sparse,synth_bias,census,adult,hillstrom")
    ap.add_argument("--arms", default="before,after,plain", help="of before, after, plain, plain_mean")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--draws", type=int, default=1, help="initialisation draws per arm and seed (same data)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE for the after arm")
    ap.add_argument("--work", default=None, help="folder for data and runs (default: a temporary one)")
    ap.add_argument("--out", default=None, help="write the results JSON here (and the table beside it as .md)")
    ap.add_argument("--first-draw", type=int, default=0, help="number the draws from here (to extend a study)")
    ap.add_argument("--table", nargs="+", default=None, help="only print the table of results JSONs written by --out")
    args = ap.parse_args()
    if args.draws < 1 or args.first_draw < 0:
        ap.error("--draws must be at least 1 and --first-draw at least 0")
    if args.table:
        results = [r for path in args.table for r in json.loads(Path(path).read_text())["results"]]
        print(
            markdown(
                results, [a for a in ("before", "after", "plain", "plain_mean") if any(r["arm"] == a for r in results)]
            )
        )
        print(json.dumps({"paired": paired(results, "after", "plain")}))
        return
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    arms = args.arms.split(",")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        os.environ.setdefault("FUNNEL_CACHE_DIR", str(work / "cache"))
        for name in args.datasets.split(","):
            for seed in args.seeds:
                base = dataset(name, seed, work)
                for draw in range(args.first_draw, args.first_draw + args.draws):
                    init = seed + DRAW_STRIDE * draw
                    for arm in arms:
                        start = time.perf_counter()
                        if arm in ("plain", "plain_mean"):
                            aucs = run_plain(base, init, data_seed=seed, pick="last" if arm == "plain" else "mean")
                        else:
                            sets = tuple(args.overrides) if arm == "after" else ()
                            aucs = run_funnel(base, init, work, arm == "before", sets)
                        row = {"dataset": name, "seed": seed, "draw": draw, "init_seed": init, "arm": arm}
                        row |= {"aucs": aucs, "s": time.perf_counter() - start}
                        results.append(row)
                        print(json.dumps(row), flush=True)
                        if args.out:
                            Path(args.out).write_text(json.dumps({"results": results, "set": args.overrides}, indent=1))
    summary = summarise(results)
    out = {"results": results, "summary": summary, "set": args.overrides}
    if {"after", "plain"} <= set(arms):
        out["paired"] = paired(results, "after", "plain")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
        Path(args.out).with_suffix(".md").write_text(markdown(results, arms) + "\n")
    print(markdown(results, arms))
    print(json.dumps({"summary": summary, "paired": out.get("paired")}))


if __name__ == "__main__":
    main()
