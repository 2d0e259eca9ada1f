"""Data loading and prediction speed on an Ali-CCP-shaped file.

The file has the columns of torch-rechub's Ali-CCP sample (``click``, ``purchase``, 23
integer-coded sparse fields such as ``101`` (user) and ``205`` (item), 8 dense ``D...``
floats). Values are drawn with Ali-CCP-like vocabulary sizes (up to ~470k ids), seeded.

Measured, each in a fresh subprocess so that peak RSS belongs to one phase:

- ``encode``: ``FunnelDataModule.prepare()`` with an empty cache: CSV (or Parquet) parse,
  encoder fit on the train part, encoding of train and the held-out validation rows;
- ``cached``: the same call again, served from the on-disk cache (no parsing);
- ``predict``: ``funnel predict`` on the whole file (chunks of 262,144 rows) with a model
  of the throughput benchmark's shape (towers [360, 200, 80], embedding 18), trained for a
  handful of steps: the speed does not depend on the weights. Timed from loading the run
  to the last row written; ``predict_bf16`` is the same with ``--bf16``.

The last line printed is one JSON object.

    python benchmarks/data_loading.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

SPARSE = {
    "101": 238_000,
    "121": 98,
    "122": 14,
    "124": 3,
    "125": 8,
    "126": 4,
    "127": 4,
    "128": 3,
    "129": 5,
    "205": 467_000,
    "206": 6_900,
    "207": 264_000,
    "210": 80_000,
    "216": 106_000,
    "508": 5_600,
    "509": 110_000,
    "702": 90_000,
    "853": 38_000,
    "301": 4,
    "109_14": 5_700,
    "110_14": 1_000_000,
    "127_14": 1_000_000,
    "150_14": 1_000_000,
}
DENSE = ["D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853"]


def make_file(rows: int, out: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    cols = {"click": (rng.random(rows) < 0.04).astype(np.int64)}
    cols["purchase"] = cols["click"] & (rng.random(rows) < 0.05)
    for name, vocab in SPARSE.items():
        vocab = min(vocab, rows)  # a small file cannot hold a million distinct ids
        cols[name] = np.minimum((vocab * rng.random(rows) ** 3).astype(np.int64), vocab - 1)
    for name in DENSE:
        cols[name] = np.round(rng.random(rows) * (rng.random(rows) < 0.6), 4)
    df = pd.DataFrame(cols)
    if out.suffix == ".parquet":
        df.to_parquet(out, index=False)
    else:
        df.to_csv(out, index=False)


def config(path: Path, cache_dir: Path, run_dir: Path | None = None) -> dict:
    return {
        "data": {"train": str(path), "valid_split": 0.1, "batch_size": 4096, "cache_dir": str(cache_dir)},
        "features": [{"name": c, "kind": "categorical"} for c in SPARSE]
        + [{"name": c, "kind": "numeric"} for c in DENSE],
        "funnel": {
            "model": "esmm",
            "embed_dim": 18,
            "tower": {"type": "mlp", "hidden": [360, 200, 80]},
            "stages": [{"name": "click"}, {"name": "purchase", "after": "click"}],
        },
        "trainer": {
            "max_steps": 5,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "logger": False,
            "enable_checkpointing": True,
        },
        "run_dir": str(run_dir) if run_dir else None,
    }


def phase(args: argparse.Namespace) -> None:
    """One measured phase in this process (imports excluded from the timing); prints one JSON line."""
    from funnel.data.datamodule import FunnelDataModule
    from funnel.inference import predict_run
    from funnel.runs import build_graph
    from funnel.spec import config_from_dict
    from funnel.training.fit import fit_config

    raw = json.loads(Path(args.config).read_text())
    cfg = config_from_dict(raw)
    start = time.perf_counter()
    extra = {}
    if args.phase in ("encode", "cached"):
        dm = FunnelDataModule(cfg, build_graph(cfg))
        dm.prepare()
        rows = sum(len(t) for t in dm.tables.values())
        extra["encoded_mb"] = round(sum(t.nbytes() for t in dm.tables.values()) / 2**20, 1)
    elif args.phase == "fit":
        fit_config(cfg)
        rows = 0
    else:
        predict_run(raw["run_dir"], args.data, args.out, bf16=args.bf16)
        if args.out.endswith(".parquet"):
            rows = len(pd.read_parquet(args.out, columns=["p_click"]))
        else:
            with open(args.out) as fh:
                rows = sum(1 for _ in fh) - 1
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "phase": args.phase,
                "rows": rows,
                "seconds": round(seconds, 2),
                "rows_per_s": round(rows / seconds) if rows else None,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                **extra,
            }
        )
    )


def run_phase(name: str, cfg_path: Path, *flags: str, **extra: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--config", str(cfg_path), *flags]
    for k, v in extra.items():
        cmd += [f"--{k}", v]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{name:>8}: {result}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--format", choices=["csv", "parquet"], default="csv")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        phase(args)
        return
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        data = tmp / f"ali_ccp_like.{args.format}"
        start = time.perf_counter()
        make_file(args.rows, data)
        size_mb = data.stat().st_size / 2**20
        print(
            f"{args.rows:,} rows written to {data.name} ({size_mb:.0f} MB) in {time.perf_counter() - start:.1f}s",
            flush=True,
        )
        cfg_path = tmp / "config.json"
        cfg_path.write_text(json.dumps(config(data, tmp / "cache", tmp / "run")))
        encode = run_phase("encode", cfg_path)
        cached = run_phase("cached", cfg_path)
        run_phase("fit", cfg_path)
        predict = run_phase("predict", cfg_path, data=str(data), out=str(tmp / f"pred.{args.format}"))
        bf16 = run_phase("predict", cfg_path, "--bf16", data=str(data), out=str(tmp / f"pred_bf16.{args.format}"))
    print(
        json.dumps(
            {
                "rows": args.rows,
                "format": args.format,
                "file_mb": round(size_mb),
                "encode_rows_per_s": encode["rows_per_s"],
                "encode_s": encode["seconds"],
                "encode_peak_rss_mb": encode["peak_rss_mb"],
                "encoded_mb": encode["encoded_mb"],
                "cached_s": cached["seconds"],
                "cached_peak_rss_mb": cached["peak_rss_mb"],
                "predict_rows_per_s": predict["rows_per_s"],
                "predict_s": predict["seconds"],
                "predict_peak_rss_mb": predict["peak_rss_mb"],
                "predict_bf16_rows_per_s": bf16["rows_per_s"],
                "predict_bf16_s": bf16["seconds"],
                "predict_bf16_peak_rss_mb": bf16["peak_rss_mb"],
            }
        )
    )


if __name__ == "__main__":
    main()
