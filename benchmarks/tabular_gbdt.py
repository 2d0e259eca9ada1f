"""Numeric embeddings against gradient-boosted trees on Census, Adult and Hillstrom.

For each dataset, the same train / valid / test rows go to scikit-learn's
HistGradientBoostingClassifier (defaults; categorical columns as categories; early stopping on
the valid rows), one model per task, and to funnel, both as independent tasks (stages without
`after`) and as the ESMM chain, with every numeric feature as ``--variants``: ``none`` (the
standardised column), ``bins``, ``plr``, or ``both`` (a bins and a plr feature per column). It
reports the test AUC per task, mean ± std over ``--seeds``, and two paired bootstraps of the best
funnel variant minus the GBDT on the test rows: seed 0's, and the mean over the seeds' AUCs. The
last line is one JSON object.

- Census-Income (KDD): official train (10% held out as valid, seed 0) and official test; tasks
  income > 50K and never married (the ESMM chain's second stage is income AND never married,
  so the GBDT is also fitted on that product label to compare).
- Adult: adult.data (10% valid) and adult.test; the same two tasks.
- Hillstrom: a seeded 70/10/20 split; visit and conversion (conversion implies visit).

``--runs R0 R1 R2`` scores finished `funnel fit` runs of a shipped config (e.g. configs/census.yaml,
one per seed) on the same test rows instead of training (their own valid split chose their
checkpoints).

    pip install -e .[bench]
    OMP_NUM_THREADS=1 python benchmarks/tabular_gbdt.py --datasets census --seeds 0 1 2 --epochs 4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FUNNEL_DATA_DIR", ROOT.parent / "shared" / "data"))
log = logging.getLogger("tabular_gbdt")

CENSUS_NAMES = [
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour", "hs_college",
    "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin", "sex", "union_member",
    "unemp_reason", "full_or_part_emp", "capital_gains", "capital_losses", "stock_dividends",
    "tax_filer_stat", "region_prev_res", "state_prev_res", "det_hh_fam_stat", "det_hh_summ",
    "instance_weight", "mig_chg_msa", "mig_chg_reg", "mig_move_reg", "mig_same", "mig_prev_sunbelt",
    "num_emp", "fam_under_18", "country_father", "country_mother", "country_self", "citizenship",
    "own_or_self", "vet_question", "vet_benefits", "weeks_worked", "year", "income_50k",
]  # fmt: skip
ADULT_NAMES = [
    "age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
    "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week", "native_country", "income",
]  # fmt: skip


@dataclass
class Dataset:
    name: str
    splits: dict[str, pd.DataFrame]  # train, valid, test: feature columns and the 0/1 task columns
    numeric: dict[str, str]  # numeric column -> its transform (standardize | log1p)
    categorical: list[str]
    tasks: tuple[str, str]  # (first, second): the ESMM chain is first -> second
    funnel: dict  # embed_dim, tower, batch size, lr of funnel's runs


def _valid_mask(n: int, seed: int = 0, share: float = 0.1) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < share


def census() -> Dataset:
    read = {"header": None, "names": CENSUS_NAMES, "skipinitialspace": True}
    train = pd.read_csv(DATA / "census-income-kdd/census-income.train.csv.gz", **read)
    test = pd.read_csv(DATA / "census-income-kdd/census-income.test.csv.gz", **read)
    numeric = {"age": "standardize", "num_emp": "standardize", "weeks_worked": "standardize"}
    numeric |= dict.fromkeys(["wage_per_hour", "capital_gains", "capital_losses", "stock_dividends"], "log1p")
    drop = {"instance_weight", "marital_stat", "income_50k"}
    categorical = [c for c in CENSUS_NAMES if c not in drop and c not in numeric]

    def labelled(df: pd.DataFrame) -> pd.DataFrame:
        out = df[[*numeric, *categorical]].copy()
        out["income"] = (df["income_50k"] == "50000+.").astype(int)
        out["married"] = (df["marital_stat"] == "Never married").astype(int)
        return out

    held = _valid_mask(len(train))
    splits = {"train": labelled(train[~held]), "valid": labelled(train[held]), "test": labelled(test)}
    hp = {"embed_dim": 8, "hidden": [128, 64], "batch_size": 1024, "lr": 0.001}
    return Dataset("census", splits, numeric, categorical, ("income", "married"), hp)


def adult() -> Dataset:
    read = {"header": None, "names": ADULT_NAMES, "skipinitialspace": True, "na_values": ["?"], "comment": "|"}
    train = pd.read_csv(DATA / "uci-adult/adult.data", **read).dropna(subset=["income"])
    test = pd.read_csv(DATA / "uci-adult/adult.test", **read).dropna(subset=["income"])
    numeric = {"age": "standardize", "education_num": "standardize", "hours_per_week": "standardize"}
    numeric |= dict.fromkeys(["fnlwgt", "capital_gain", "capital_loss"], "log1p")
    categorical = ["workclass", "education", "occupation", "relationship", "race", "sex", "native_country"]

    def labelled(df: pd.DataFrame) -> pd.DataFrame:
        out = df[[*numeric, *categorical]].copy()
        out["income"] = df["income"].str.rstrip(".").eq(">50K").astype(int)
        out["married"] = (df["marital_status"] == "Never-married").astype(int)
        return out

    held = _valid_mask(len(train))
    splits = {"train": labelled(train[~held]), "valid": labelled(train[held]), "test": labelled(test)}
    hp = {"embed_dim": 8, "hidden": [64, 32], "batch_size": 256, "lr": 0.001}
    return Dataset("adult", splits, numeric, categorical, ("income", "married"), hp)


def hillstrom() -> Dataset:
    df = pd.read_csv(DATA / "hillstrom/Kevin_Hillstrom_MineThatData_E-MailAnalytics_DataMiningChallenge_2008.03.20.csv")
    numeric = {"recency": "standardize", "history": "log1p"}
    categorical = ["history_segment", "mens", "womens", "zip_code", "newbie", "channel", "segment"]
    draw = np.random.default_rng(0).random(len(df))
    part = np.where(draw < 0.7, "train", np.where(draw < 0.8, "valid", "test"))
    cols = [*numeric, *categorical, "visit", "conversion"]
    splits = {s: df.loc[part == s, cols].reset_index(drop=True) for s in ("train", "valid", "test")}
    hp = {"embed_dim": 8, "hidden": [64, 32], "batch_size": 512, "lr": 0.001}
    return Dataset("hillstrom", splits, numeric, categorical, ("visit", "conversion"), hp)


DATASETS = {"census": census, "adult": adult, "hillstrom": hillstrom}


# ---- the GBDT side -------------------------------------------------------------------------------------------
def tokens(col: pd.Series) -> pd.Series:
    """A column as strings, missing values as one more category ("<NA>", as funnel's encoders)."""
    return col.astype("string").fillna("<NA>").astype(object)


def gbdt_scores(ds: Dataset, label: str, seed: int) -> np.ndarray:
    """Test probabilities of HistGradientBoostingClassifier (defaults) for one 0/1 label column."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    def x(df: pd.DataFrame) -> pd.DataFrame:
        out = df[list(ds.numeric)].astype(float)
        for c in ds.categorical:  # one category set for every split: the train values (others: missing)
            values = tokens(ds.splits["train"][c]).unique()
            out[c] = pd.Categorical(tokens(df[c]), categories=sorted(values))
        return out

    model = HistGradientBoostingClassifier(categorical_features="from_dtype", early_stopping=True, random_state=seed)
    tr, va, te = ds.splits["train"], ds.splits["valid"], ds.splits["test"]
    model.fit(x(tr), tr[label], X_val=x(va), y_val=va[label])
    return model.predict_proba(x(te))[:, 1]


def labels_of(ds: Dataset) -> dict[str, np.ndarray]:
    """The test label of each reported task: both tasks and, for the chain, first AND second."""
    te = ds.splits["test"]
    return {task: te[task].to_numpy() for task in (*ds.tasks, "chain")}


# ---- the funnel side -----------------------------------------------------------------------------------------
def features(
    ds: Dataset,
    variant: str,
    bins: int,
    frequencies: int,
    sigma: float,
    sigma_log1p: float | None = None,
    transform_all: str | None = None,
    sigma_of: dict[str, float] | None = None,
) -> list[dict]:
    """Every numeric column as ``variant``; ``sigma_log1p``: the PLR sigma of the log1p (skewed
    money) columns, where it differs from the others' ``sigma``; ``sigma_of``: column -> its own
    sigma (over both); ``transform_all``: one transform for every numeric column (e.g. quantile)
    instead of the dataset's per-column choice (which still picks the sigma)."""
    out = []
    for c, chosen in ds.numeric.items():
        col_sigma = sigma_log1p if sigma_log1p is not None and chosen == "log1p" else sigma
        col_sigma = (sigma_of or {}).get(c, col_sigma)
        transform = transform_all or chosen
        plain = {"name": c, "kind": "numeric", "transform": transform}
        binned = {"name": c, "kind": "numeric", "embedding": "bins", "bins": bins}
        plr = {"name": c, "kind": "numeric", "transform": transform, "embedding": "plr"}
        plr |= {"frequencies": frequencies, "sigma": col_sigma}
        if variant == "none":
            out.append(plain)
        elif variant == "bins":
            out.append(binned)
        elif variant == "plr":
            out.append(plr)
        else:  # both: one field of each per column
            out += [binned, {**plr, "name": f"{c}_plr", "column": c}]
    return out + [{"name": c, "kind": "categorical"} for c in ds.categorical]


def sigma_of(args) -> dict[str, float]:
    """``--sigma-col age=1 capital_gain=7``: column -> PLR sigma."""
    out = {}
    for item in args.sigma_col or []:
        name, _, value = item.partition("=")
        out[name] = float(value)
    return out


def funnel_config(ds: Dataset, files: dict[str, Path], variant: str, chain: bool, seed: int, args) -> dict:
    first, second = ds.tasks
    hp = ds.funnel
    stages = [{"name": first}, {"name": second, **({"after": first} if chain else {})}]
    return {
        "seed": seed,
        "run_dir": str(
            Path(args.work) / "runs" / f"{ds.name}-{variant}-{'chain' if chain else 'indep'}-{seed}-{time.time_ns()}"
        ),
        "data": {
            **{s: str(p) for s, p in files.items()},
            "batch_size": args.batch_size or hp["batch_size"],
            "label_conflicts": "zero",  # the chain: second = first AND second
            "cache": False,
        },
        "features": features(
            ds, variant, args.bins, args.frequencies, args.sigma, args.sigma_log1p, args.transform, sigma_of(args)
        ),
        "funnel": {
            "model": "esmm",
            "embed_dim": args.embed_dim or hp["embed_dim"],
            "tower": {"type": "mlp", "hidden": args.hidden or hp["hidden"], "dropout": args.dropout},
            "stages": stages,
        },
        "optim": {
            "name": args.optim,
            "lr": args.lr or hp["lr"],
            "weight_decay": args.weight_decay,
            "schedule": args.schedule,
            "warmup_steps": args.warmup_steps,
            "ema_decay": args.ema_decay,
        },
        "trainer": {
            "max_epochs": args.epochs,
            "monitor": args.monitor,
            "mode": "min" if args.monitor.endswith("loss") else "max",
            "early_stopping": args.early_stopping,
            "enable_progress_bar": False,
            "log_every_n_steps": 50,
        },
    }


def funnel_scores(ds: Dataset, files: dict[str, Path], variant: str, chain: bool, seed: int, args) -> dict:
    """Test probabilities per reported task: the two stages (independent) or income and the chain."""
    import funnel

    run = funnel.fit(funnel_config(ds, files, variant, chain, seed, args))
    p = run.predict(ds.splits["test"])
    first, second = ds.tasks
    out = {first: p[f"p_{first}"].to_numpy()}
    out["chain" if chain else second] = p[f"p_{second}"].to_numpy()
    return out


def run_scores(ds: Dataset, run_dir: Path, chain: bool = False) -> dict[str, np.ndarray]:
    """Test probabilities of a finished run whose stages are named as the dataset's tasks;
    ``chain``: its second stage follows the first, so its output is scored as the chain's label."""
    import funnel

    p = funnel.load_run(run_dir).predict(ds.splits["test"])
    out = {task: p[f"p_{task}"].to_numpy() for task in ds.tasks if f"p_{task}" in p}
    if chain and ds.tasks[1] in out:
        out["chain"] = out.pop(ds.tasks[1])
    if not out:
        raise SystemExit(f"{run_dir}: no stage named {' or '.join(ds.tasks)} (its outputs: {list(p.columns)})")
    return out


# ---- statistics ----------------------------------------------------------------------------------------------
def auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def paired_bootstrap(y: np.ndarray, a: np.ndarray, b: np.ndarray, rounds: int, seed: int = 0) -> dict:
    """AUC(a) - AUC(b) on the test rows and its 95% interval over ``rounds`` resamples of them."""
    out = paired_bootstrap_seeds(y, [a], b, rounds, seed)
    del out["seeds"]
    return out


def paired_bootstrap_seeds(y: np.ndarray, runs: list[np.ndarray], b: np.ndarray, rounds: int, seed: int = 0) -> dict:
    """The mean over seeds of AUC(run) - AUC(b), and its 95% interval over ``rounds`` resamples of
    the test rows (each resample scores every seed's run on the same rows)."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(rounds):
        i = rng.integers(0, len(y), len(y))
        if y[i].min() != y[i].max():
            base = auc(y[i], b[i])
            diffs.append(float(np.mean([auc(y[i], a[i]) for a in runs])) - base)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    mean = float(np.mean([auc(y, a) for a in runs])) - auc(y, b)
    return {"diff": mean, "ci95": [float(lo), float(hi)], "rounds": len(diffs), "seeds": len(runs)}


def summary(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": [round(v, 5) for v in values]}


# ---- main ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["census"], choices=sorted(DATASETS))
    p.add_argument("--variants", nargs="+", default=["none", "bins", "plr"], choices=["none", "bins", "plr", "both"])
    p.add_argument("--setups", nargs="+", default=["indep", "chain"], choices=["indep", "chain"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--gbdt-seeds", nargs="+", type=int, default=[0], help="deterministic given the split: one is enough"
    )
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--early-stopping", type=int, default=3)
    p.add_argument("--lr", type=float, default=None, help="funnel's learning rate (default: per dataset)")
    p.add_argument("--embed-dim", type=int, default=None, help="funnel's embed_dim (default: per dataset)")
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="funnel's MLP widths (default: per dataset)")
    p.add_argument("--batch-size", type=int, default=None, help="funnel's batch size (default: per dataset)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--optim", default="adam", choices=["adam", "adamw"])
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine", "linear"])
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--ema-decay", type=float, default=0.0, help="funnel's optim.ema_decay (0: no weight average)")
    p.add_argument("--bins", type=int, default=32)
    p.add_argument("--frequencies", type=int, default=16)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--sigma-log1p", type=float, default=None, help="PLR sigma of the log1p columns (default: --sigma)")
    p.add_argument("--sigma-col", nargs="*", default=None, help="per-column PLR sigma: NAME=SIGMA ...")
    p.add_argument(
        "--transform",
        default=None,
        choices=["standardize", "log1p", "quantile"],
        help="every numeric column's transform",
    )
    p.add_argument("--monitor", default="val/loss", help="funnel's trainer.monitor (a val/auc/... is maximised)")
    p.add_argument("--bootstrap", type=int, default=200, help="paired bootstrap rounds (0: none)")
    p.add_argument("--work", default=None, help="folder for the split files and runs (default: a temporary one)")
    p.add_argument(
        "--runs",
        nargs="+",
        default=None,
        help="score these finished `funnel fit` runs (one per seed; stages named as the tasks) instead of training",
    )
    p.add_argument("--runs-chain", action="store_true", help="--runs: their second stage has `after` (ESMM)")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    args = p.parse_args(argv)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("benchmarks/tabular_gbdt.py needs scikit-learn: pip install -e .[bench]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("funnel", "pytorch_lightning", "lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    args.work = args.work or tmp.name
    result: dict = {"threads": torch.get_num_threads(), "args": {k: v for k, v in vars(args).items() if k != "out"}}
    for name in args.datasets:
        ds = DATASETS[name]()
        folder = Path(args.work) / name
        folder.mkdir(parents=True, exist_ok=True)
        first, second = ds.tasks
        for split in ds.splits.values():  # the chain's label, for the GBDT (funnel derives it)
            split["chain"] = split[first] & split[second]
        files = {s: folder / f"{s}.csv" for s in ds.splits}
        for s, path in files.items():
            ds.splits[s].to_csv(path, index=False)
        truth = labels_of(ds)
        table: dict[str, dict] = {}
        preds: dict[str, dict[str, np.ndarray]] = {}  # seed-0 test scores by row name
        every: dict[str, dict[str, list[np.ndarray]]] = {}  # every seed's test scores by row name
        start = time.perf_counter()
        rows = {}
        for task in truth:
            aucs = []
            for seed in args.gbdt_seeds:
                cached = folder / f"gbdt-{task}-{seed}.npy"  # the same split files give the same scores
                scores = np.load(cached) if cached.exists() else gbdt_scores(ds, task, seed)
                np.save(cached, scores)
                aucs.append(auc(truth[task], scores))
                if seed == args.gbdt_seeds[0]:
                    preds.setdefault("gbdt", {})[task] = scores
            rows[task] = summary(aucs)
        table["gbdt"] = rows
        log.info(
            "%s gbdt: %s (%.0fs)", name, {k: round(v["mean"], 4) for k, v in rows.items()}, time.perf_counter() - start
        )
        if args.runs:  # finished `funnel fit` runs (one per seed) scored on the same test rows
            key = "funnel-runs"
            for run_dir in args.runs:
                scores = run_scores(ds, Path(run_dir), args.runs_chain)
                for task, s in scores.items():
                    every.setdefault(key, {}).setdefault(task, []).append(s)
                preds.setdefault(key, scores)
            table[key] = {task: summary([auc(truth[task], s) for s in v]) for task, v in every[key].items()}
            log.info("%s %s: %s", name, key, {t: round(v["mean"], 4) for t, v in table[key].items()})
        for setup in args.setups if not args.runs else ():
            for variant in args.variants:
                key = f"funnel-{setup}-{variant}"
                start = time.perf_counter()
                per_task: dict[str, list[float]] = {}
                for seed in args.seeds:
                    scores = funnel_scores(ds, files, variant, setup == "chain", seed, args)
                    for task, s in scores.items():
                        per_task.setdefault(task, []).append(auc(truth[task], s))
                        every.setdefault(key, {}).setdefault(task, []).append(s)
                    if seed == args.seeds[0]:
                        preds[key] = scores
                table[key] = {task: summary(v) for task, v in per_task.items()}
                table[key]["seconds_per_run"] = round((time.perf_counter() - start) / len(args.seeds), 1)
                log.info("%s %s: %s", name, key, {t: round(float(np.mean(v)), 4) for t, v in per_task.items()})
        # the best funnel row per task (by mean test AUC) against the GBDT, paired on the test rows
        best = {}
        for task in truth:
            rows_with = [k for k in table if k != "gbdt" and task in table[k]]
            if not rows_with:
                continue
            top = max(rows_with, key=lambda k: table[k][task]["mean"])
            best[task] = {"row": top, "mean_minus_gbdt": table[top][task]["mean"] - table["gbdt"][task]["mean"]}
            if args.bootstrap:
                best[task]["bootstrap_seed0"] = paired_bootstrap(
                    truth[task], preds[top][task], preds["gbdt"][task], args.bootstrap
                )
                best[task]["bootstrap_seed_mean"] = paired_bootstrap_seeds(
                    truth[task], every[top][task], preds["gbdt"][task], args.bootstrap
                )
        result[name] = {"rows": {s: len(d) for s, d in ds.splits.items()}, "table": table, "best": best}
        over = f"the runs {args.runs}" if args.runs else f"seeds {args.seeds}"
        print(f"\n{name}: test AUC, mean ± std over {over}")
        tasks = list(truth)
        print(f"{'row':28s}" + "".join(f"{t:>20s}" for t in tasks))
        for key, row in table.items():
            cells = [f"{row[t]['mean']:.4f} ± {row[t]['std']:.4f}" if t in row else "" for t in tasks]
            print(f"{key:28s}" + "".join(f"{c:>20s}" for c in cells))
        for task, b in best.items():
            print(f"best {task}: {b['row']} {b['mean_minus_gbdt']:+.4f} vs gbdt {b.get('bootstrap_seed0', '')}")
            print(f"  mean over seeds: {b.get('bootstrap_seed_mean', '')}")
        sys.stdout.flush()
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line)
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
