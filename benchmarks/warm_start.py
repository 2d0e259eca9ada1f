"""Daily retraining on a sequence of synthetic days: warm start vs cold start vs full retraining.

The days come from `funnel.synthetic.generate_days` on the world of ``configs/esmm.yaml``'s
``data.synthetic`` (same users, items and truth functions every day; item popularity drifts
and new items appear each day). For every day d = 1 .. days-1 three models are trained and
scored on day d+1 (one more day is drawn for the last evaluation):

- ``warm``: day d alone, ``init_from`` the warm run of day d-1 (day 0's run is a cold one);
- ``cold``: day d alone, from scratch;
- ``full``: days 0 .. d concatenated, from scratch.

Each fit holds out ``data.valid_split`` of its own training rows for validation and keeps the
best epoch by ``val/auc/conversion``, as the config says. ``seconds`` is the wall time of
``funnel.fit`` (reading and encoding the data, training, validation); evaluation on day d+1
(``Run.evaluate``) is not counted. Torch runs ``--threads`` threads (default 1: on a shared
2-core machine two threads ran 3x slower). One JSON line is printed per seed and day; the
markdown table (means over seeds per day, then means over days) goes to ``OUT/warm_start.md``
and every line to ``OUT/warm_start.jsonl`` as it comes.

    python benchmarks/warm_start.py --days 10 --rows-per-day 100000 --epochs 2 --seeds 0,1 --out runs/warm_start
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

import funnel
from funnel.spec import load_config
from funnel.synthetic import generate_days

log = logging.getLogger("warm_start")

STRATEGIES = ("warm", "cold", "full")
METRICS = ("auc/click", "auc/conversion")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/esmm.yaml", help="base config; its data.synthetic sets the world")
    p.add_argument("--days", type=int, default=10, help="training days 0 .. days-1 (day `days` is only scored)")
    p.add_argument("--rows-per-day", type=int, default=100_000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--drift", type=float, default=0.3, help="std of each item's daily log-popularity step")
    p.add_argument("--new-items-per-day", type=int, default=50)
    p.add_argument("--seeds", default="0", help="comma-separated; each seeds both the days and the models")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--out", default="runs/warm_start", help="a new or empty folder for data, runs and the table")
    return p.parse_args()


def fit(cfg_path: str, train: Path, run_dir: Path, epochs: int, seed: int, init_from: Path | None) -> tuple[Any, float]:
    overrides = [
        "data.synthetic=null",
        f"data.train={train}",
        "data.cache=false",
        f"seed={seed}",
        f"run_dir={run_dir}",
        f"trainer.max_epochs={epochs}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    if init_from is not None:
        overrides.append(f"init_from={init_from}")
    start = time.perf_counter()
    run = funnel.fit(cfg_path, overrides)
    return run, time.perf_counter() - start


def score(run: Any, frame: pd.DataFrame, seconds: float) -> dict[str, float]:
    metrics = run.evaluate(frame)
    return {m: round(metrics[m], 4) for m in METRICS} | {"seconds": round(seconds, 2)}


def study_seed(args: argparse.Namespace, seed: int, out: Path) -> list[dict[str, Any]]:
    """Every day's line for one seed; each is printed and appended to OUT/warm_start.jsonl."""
    base = load_config(args.config)[0].data.synthetic
    if base is None:
        raise SystemExit(f"{args.config}: needs a data.synthetic section (the world the days are drawn from)")
    spec = dataclasses.replace(base, rows=args.rows_per_day, seed=seed)
    frames = generate_days(spec, args.days + 1, drift=args.drift, new_items_per_day=args.new_items_per_day)
    data = out / f"seed{seed}" / "data"
    data.mkdir(parents=True)
    files = []
    for day, frame in enumerate(frames):
        files.append(data / f"day{day}.parquet")
        frame.to_parquet(files[-1])

    runs = out / f"seed{seed}" / "runs"
    warm, seconds = fit(args.config, files[0], runs / "day0", args.epochs, seed, None)
    first = {"seed": seed, "day": 0, "eval_day": 1, "all": score(warm, frames[1], seconds)}
    lines = [_emit(first, out)]
    for day in range(1, args.days):
        full_file = data / f"days0-{day}.parquet"
        pd.concat(frames[: day + 1], ignore_index=True).to_parquet(full_file)
        warm, warm_s = fit(args.config, files[day], runs / f"warm_day{day}", args.epochs, seed, warm.path)
        cold, cold_s = fit(args.config, files[day], runs / f"cold_day{day}", args.epochs, seed, None)
        full, full_s = fit(args.config, full_file, runs / f"full_day{day}", args.epochs, seed, None)
        test = frames[day + 1]
        seen = set(frames[day]["item_id"])
        line = {
            "seed": seed,
            "day": day,
            "eval_day": day + 1,
            "warm": score(warm, test, warm_s),
            "cold": score(cold, test, cold_s),
            "full": score(full, test, full_s),
            "oracle": {m: round(v, 4) for m, v in _oracle(warm, test).items()},
            "eval_rows_item_unseen_on_day": round(float((~test["item_id"].isin(seen)).mean()), 4),
        }
        lines.append(_emit(line, out))
    return lines


def _emit(line: dict[str, Any], out: Path) -> dict[str, Any]:
    print(json.dumps(line), flush=True)
    with (out / "warm_start.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")
    return line


def _oracle(run: Any, frame: pd.DataFrame) -> dict[str, float]:
    metrics = run.evaluate(frame)
    return {m: metrics[f"oracle_{m}"] for m in METRICS}


def table(lines: list[dict[str, Any]], seeds: list[int]) -> str:
    days = sorted({line["day"] for line in lines if line["day"] > 0})

    def mean(day: int, strategy: str, key: str) -> float:
        return statistics.fmean(x[strategy][key] for x in lines if x["day"] == day)

    head = ["day → eval"] + [f"{s} {m.split('/')[1]}" for s in STRATEGIES for m in METRICS]
    head += [f"{s} s" for s in STRATEGIES] + ["oracle click", "oracle conversion"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for d in days:
        cells = [f"{d} → {d + 1}"] + [f"{mean(d, s, m):.4f}" for s in STRATEGIES for m in METRICS]
        cells += [f"{mean(d, s, 'seconds'):.1f}" for s in STRATEGIES] + [f"{mean(d, 'oracle', m):.4f}" for m in METRICS]
        rows.append("| " + " | ".join(cells) + " |")

    def over_days(seed: int, strategy: str, key: str) -> float:
        return statistics.fmean(x[strategy][key] for x in lines if x["seed"] == seed and x["day"] > 0)

    cells = ["**mean 1-9**" if days == list(range(1, 10)) else "**mean**"]
    for s in STRATEGIES:
        for m in METRICS:
            per_seed = [over_days(seed, s, m) for seed in seeds]
            spread = f" ± {statistics.stdev(per_seed):.4f}" if len(per_seed) > 1 else ""
            cells.append(f"**{statistics.fmean(per_seed):.4f}**{spread}")
    cells += [f"**{statistics.fmean(over_days(seed, s, 'seconds') for seed in seeds):.1f}**" for s in STRATEGIES]
    cells += [f"{statistics.fmean(over_days(seed, 'oracle', m) for seed in seeds):.4f}" for m in METRICS]
    rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def main() -> None:
    args = parse_args()
    import pytorch_lightning  # noqa: F401  (it sets its loggers' levels on import; quieted below)
    import torch

    torch.set_num_threads(args.threads)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("pytorch_lightning", "pytorch_lightning.utilities.rank_zero", "funnel"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|log_every_n_steps|num_workers).*")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    lines = []
    for seed in seeds:
        lines += study_seed(args, seed, out)
        log.info("seed %d done after %.0f s", seed, time.perf_counter() - start)
    md = table(lines, seeds)
    (out / "warm_start.md").write_text(md)
    print(md)
    log.info("study took %.0f s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
