"""Training throughput of every built-in tower on the same data and batch size.

Each tower trains one epoch of ESMM (funnel's real path: DataModule, LightningModule,
Trainer, training metrics logged; validation off so that only training is timed) on the
synthetic funnel with a behaviour history from ``configs/esmm_din.yaml``. The data is
generated and encoded once; the figure is training rows / wall seconds of ``trainer.fit``,
the median over ``--repeats`` runs. The last line is one JSON object.

    python benchmarks/towers.py --rows 200000 --batch-size 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from funnel.data.datamodule import FunnelDataModule
from funnel.models.registry import create_model
from funnel.runs import build_graph
from funnel.spec import load_config
from funnel.training.module import FunnelLightningModule

ROOT = Path(__file__).resolve().parents[1]
TOWERS = {
    "mlp": "{type: mlp, hidden: [128, 64]}",
    "deepfm": "{type: deepfm, hidden: [128, 64]}",
    "dcn": "{type: dcn, cross_layers: 2, hidden: [128, 64]}",
    "field_sum": (
        "{type: field_sum, groups: {user: [user_id, history], item: [item_id, item_category]}, hidden: [128, 64]}"
    ),
    "din": "{type: din, sequence: history, target: item_id, hidden: [128, 64]}",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/esmm_din.yaml"))
    ap.add_argument("--rows", type=int, default=200_000, help="generated rows (80%% train)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--towers", default=",".join(TOWERS))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    base = [f"data.synthetic.rows={args.rows}", f"data.batch_size={args.batch_size}"]
    cfg, _ = load_config(args.config, base)
    graph = build_graph(cfg)
    dm = FunnelDataModule(cfg, graph)
    dm.prepare()
    n_train = len(dm.tables["train"])
    results = {}
    for name in args.towers.split(","):
        tower_cfg, _ = load_config(args.config, [*base, f"funnel.tower={TOWERS[name]}"])
        times = []
        for rep in range(args.repeats):
            pl.seed_everything(rep, verbose=False)
            model = create_model(graph, tower_cfg.funnel, dm.featurizer.layout())
            module = FunnelLightningModule(model, tower_cfg.optim)
            trainer = pl.Trainer(
                max_epochs=1,
                limit_val_batches=0,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
            )
            start = time.perf_counter()
            trainer.fit(module, datamodule=dm)
            times.append(time.perf_counter() - start)
        params = sum(p.numel() for p in model.parameters())
        results[name] = {
            "samples_per_s": round(n_train / statistics.median(times)),
            "params": params,
            "seconds": [round(t, 2) for t in times],
        }
        print(
            f"{name:>10}: {results[name]['samples_per_s']:>8,} samples/s  ({params:,} parameters, runs {times})",
            flush=True,
        )

    print(f"\n| tower | samples/s (median of {args.repeats}) | parameters |\n| --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['samples_per_s']:,} | {r['params']:,} |")
    print(
        json.dumps(
            {
                "rows_train": n_train,
                "batch_size": args.batch_size,
                "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(),
                "towers": results,
            }
        )
    )


if __name__ == "__main__":
    main()
