"""Test metrics of several towers on the synthetic funnel with a behaviour history, over seeds.

Every tower trains ESMM through ``funnel fit`` on ``configs/esmm_din.yaml``'s data (the data
seed is the config's, so every run sees the same splits; only the tower and the model seed
change) and is scored on the test split. The table gives mean ± std over the seeds of the
path AUC of every stage, the conditional AUC of the last stage on parent-positive rows and
against the counterfactual truth on all rows (entire space), the same figures for the
generator's true probabilities (the oracle), and the wall seconds of the whole fit (data,
training, evaluation). The last line is one JSON object.

    OMP_NUM_THREADS=1 python benchmarks/towers_history.py --rows 100000 --epochs 5 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from funnel.training.fit import fit

ROOT = Path(__file__).resolve().parents[1]
TOWERS = {
    "mlp": "{type: mlp, hidden: [128, 64]}",
    "din": "{type: din, sequence: history, target: item_id, attention: [64, 32], hidden: [128, 64]}",
    "nfwfm": "{type: nfwfm, hidden: [128, 64]}",
    "dupn": "{type: dupn, sequence: history, lstm_hidden: 32, attention: 32, hidden: [128, 64]}",
    # the paper's shape: one user vector shared by both stages' MLP towers
    "dupn_bottom": "{type: mlp, hidden: [128, 64]}",
}
BOTTOMS = {"dupn_bottom": "{type: dupn, sequence: history, lstm_hidden: 32, attention: 32}"}
KEYS = ("auc/click", "auc/conversion", "auc_cond/conversion", "auc_cond_es/conversion")


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/esmm_din.yaml"))
    ap.add_argument("--rows", type=int, default=100_000, help="generated rows (80%% train)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--towers", default=",".join(TOWERS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = [
        f"data.synthetic.rows={args.rows}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.enable_progress_bar=false",
    ]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.towers.split(","):
            for seed in range(args.seeds):
                start = time.perf_counter()
                bottom = [f"funnel.bottom={BOTTOMS[name]}"] if name in BOTTOMS else []
                overrides = [
                    *base,
                    f"funnel.tower={TOWERS[name]}",
                    *bottom,
                    f"seed={seed}",
                    f"run_dir={tmp}/{name}-{seed}",
                ]
                run = fit(args.config, overrides)
                seconds = time.perf_counter() - start
                metrics = json.loads((run / "metrics.json").read_text())
                row = {k: metrics.get(k) for k in KEYS} | {f"oracle_{k}": metrics.get(f"oracle_{k}") for k in KEYS}
                results.setdefault(name, []).append(row | {"seconds": round(seconds, 1)})
                print(name, seed, json.dumps(results[name][-1]), flush=True)

    print(f"\n| tower | {' | '.join(KEYS)} | fit seconds |\n|---" + "|---" * (len(KEYS) + 1) + "|")
    for name, rows in results.items():
        cells = [mean_std([r[k] for r in rows]) for k in KEYS]
        print(f"| {name} | {' | '.join(cells)} | {statistics.mean(r['seconds'] for r in rows):.0f} |")
    oracle = results[next(iter(results))][0]
    print("| oracle (true probabilities) | " + " | ".join(f"{oracle[f'oracle_{k}']:.4f}" for k in KEYS) + " | |")
    print(json.dumps({"rows": args.rows, "epochs": args.epochs, "threads": torch.get_num_threads(), "runs": results}))


if __name__ == "__main__":
    main()
