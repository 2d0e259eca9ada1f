"""Train ESMM and BASE on the same synthetic funnel for a few seeds and compare them
against the ground truth (entire-space pCVR AUC and calibration, oracle ceilings).

    python examples/esmm_vs_base.py --seeds 3
    python examples/esmm_vs_base.py --config configs/esmm.yaml --seeds 2 optim.lr=0.001

Extra ``key.sub=value`` arguments are passed to every run as config overrides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from funnel.training.fit import fit

KEYS = ("auc/{s}", "auc_cond/{s}", "auc_cond_es/{s}", "calib_cond_es/{s}", "mae_cond_es/{s}", "oracle_auc_cond_es/{s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/esmm.yaml")
    ap.add_argument("--models", default="esmm,base")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--stage", default="conversion", help="the stage whose metrics are tabled")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for seed in range(args.seeds):
                run = fit(args.config, [*args.overrides, f"funnel.model={model}", f"seed={seed}",
                                        "trainer.enable_progress_bar=false", f"run_dir={Path(tmp) / f'{model}-{seed}'}"])
                results.setdefault(model, []).append(json.loads((run / "metrics.json").read_text()))

    keys = [k.format(s=args.stage) for k in KEYS]
    print(f"\n{args.config}, stage {args.stage!r}, {args.seeds} seeds (mean ± std, test split)")
    print("| model | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for model, runs in results.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in runs if r.get(k) is not None]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.4f} ± {sd:.4f}" if vals else "n/a")
        print(f"| {model} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
