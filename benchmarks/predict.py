"""`funnel predict` from Parquet on the benchmark model, phase by phase, against the machine's limit.

The model has the shape of benchmarks/throughput.py (ESMM click -> conversion, 20 categorical
fields with vocabularies 10 .. 100,000, embedding 18, towers [360, 200, 80]: about 0.87 MFLOP
per row in the forward pass), trained for a few steps on the generated file (the speed does
not depend on the weights). Measured, in this order, each in float32 and bf16 (``--bf16``),
the two precisions alternating round by round in one process:

- ``limit``: the two towers alone (``nn.Linear`` + ReLU on random (4096, 360) inputs), the
  most an eager forward pass of this model can reach here (rows/s and GFLOP/s);
  ``limit_fused``: the same with each Linear+ReLU fused (funnel/fusion.py), as predict runs;
- ``forward``: the model's forward pass over the encoded file (lookup, towers, funnel
  composition, probabilities), in ``--batch-size`` batches, nothing read or written;
- ``phases``: one pass over the file, serial, each phase timed: parse (Parquet -> pandas),
  encode (``Featurizer.encode``), forward (``predict_table``) and write (Parquet);
- ``before``: the predict loop before this benchmark's changes (parse read ahead, then
  encode, forward with eager layers and write in turn);
- ``predict``: ``predict_run`` end to end (the pipeline, as `funnel predict` runs it),
  timed from the first chunk read to the last row written (load of the run excluded);
  for ``before`` and ``predict`` also rows per CPU-second of the process (``_per_cpu_s``,
  from ``time.process_time``, load of the run included), which a loaded machine disturbs less;
- ``rss``: ``funnel predict`` in a fresh process on the file and on a file 4x as long,
  peak RSS (``ru_maxrss`` of the child) and rows/s, both precisions.

The last line printed is one JSON object.

    OMP_NUM_THREADS=2 python benchmarks/predict.py --rows 1000000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

N_FIELDS = 20
EMBED = 18
TOWERS = [360, 200, 80]


def make_file(rows: int, out: Path, seed: int = 0, copies: int = 1) -> None:
    """20 skewed categorical id columns and click/conversion labels (as throughput.py draws them),
    written ``copies`` times over in one Parquet file (row groups of 262,144)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    vocab = np.geomspace(10, 100_000, N_FIELDS).astype(np.int64)
    cols = {f"c{f}": np.minimum((v * rng.random(rows) ** 2).astype(np.int64), v - 1) for f, v in enumerate(vocab)}
    cols["click"] = (rng.random(rows) < 0.1).astype(np.int64)
    cols["conversion"] = cols["click"] & (rng.random(rows) < 0.2).astype(np.int64)
    table = pa.Table.from_pandas(pd.DataFrame(cols), preserve_index=False)
    with pq.ParquetWriter(out, table.schema) as writer:
        for _ in range(copies):
            writer.write_table(table, row_group_size=262_144)


def config(path: Path, run_dir: Path) -> dict:
    return {
        "data": {"train": str(path), "valid_split": 0.05, "batch_size": 4096, "cache": False},
        "features": [{"name": f"c{f}", "kind": "categorical"} for f in range(N_FIELDS)],
        "funnel": {
            "model": "esmm",
            "embed_dim": EMBED,
            "tower": {"type": "mlp", "hidden": TOWERS},
            "stages": [{"name": "click"}, {"name": "conversion", "after": "click"}],
        },
        "trainer": {
            "max_steps": 5,
            "val_check_interval": 5,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "logger": False,
            "enable_checkpointing": True,
        },
        "run_dir": str(run_dir),
    }


def tower_flops_per_row() -> int:
    """Multiply-adds x 2 of the two towers for one row."""
    sizes = [N_FIELDS * EMBED, *TOWERS, 1]
    return 2 * 2 * sum(a * b for a, b in zip(sizes, sizes[1:], strict=False))


def towers(bf16: bool) -> list[torch.nn.Module]:
    """The two MLP towers of the model, as plain layers."""

    def tower() -> torch.nn.Module:
        sizes = [N_FIELDS * EMBED, *TOWERS]
        layers: list[torch.nn.Module] = []
        for a, b in zip(sizes, sizes[1:], strict=False):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        net = torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-1], 1))
        return net.to(torch.bfloat16) if bf16 else net

    return [tower(), tower()]


@torch.inference_mode()
def time_limit(bf16: bool, batch: int, fuse: bool, batches: int = 60) -> float:
    """Rows/s of the two towers alone on random inputs (``fuse``: Linear+ReLU fused)."""
    from funnel.fusion import fuse_linear_relu

    net = towers(bf16)
    if fuse:
        for tower in net:
            fuse_linear_relu(tower)
    x = torch.randn(batch, N_FIELDS * EMBED, dtype=torch.bfloat16 if bf16 else torch.float32)
    for tower in net:
        tower(x)
    start = time.perf_counter()
    for _ in range(batches):
        for tower in net:
            tower(x)
    return batches * batch / (time.perf_counter() - start)


def load(run_dir: Path, bf16: bool, fuse: bool = True):
    """The run's model as `funnel predict` scores with it (``fuse``: Linear+ReLU fused)."""
    from funnel.fusion import fuse_linear_relu
    from funnel.inference import dense_layers_to_bf16
    from funnel.runs import load_run

    cfg, graph, featurizer, model = load_run(run_dir)
    if bf16:
        dense_layers_to_bf16(model)
    if fuse:
        fuse_linear_relu(model)
    return cfg, featurizer, model


def time_forward(run_dir: Path, data: Path, bf16: bool, batch: int) -> float:
    """Rows/s of the model's forward pass (predict_table) over the encoded file."""
    from funnel.data.io import iter_table
    from funnel.inference import predict_table

    cfg, featurizer, model = load(run_dir, bf16)
    chunks = iter_table(data, None, featurizer.feature_columns())
    tables = [featurizer.encode(df, "bench", labels=False) for df in chunks]
    predict_table(model, tables[0], batch, bf16)  # warm-up
    start = time.perf_counter()
    rows = sum(len(predict_table(model, t, batch, bf16)) for t in tables)
    return rows / (time.perf_counter() - start)


def time_phases(run_dir: Path, data: Path, out: Path, bf16: bool, batch: int, chunk_rows: int) -> dict:
    """One serial pass: seconds per phase (parse, encode, forward, write)."""
    from funnel.data.io import TableWriter, iter_table
    from funnel.inference import predict_table

    cfg, featurizer, model = load(run_dir, bf16)
    secs = dict.fromkeys(("parse", "encode", "forward", "write"), 0.0)
    rows = 0
    chunks = iter_table(data, None, featurizer.feature_columns(), chunk_rows)
    with TableWriter(out) as writer:
        while True:
            t0 = time.perf_counter()
            df = next(chunks, None)
            t1 = time.perf_counter()
            secs["parse"] += t1 - t0
            if df is None:
                break
            table = featurizer.encode(df, "bench", labels=False)
            t2 = time.perf_counter()
            pred = predict_table(model, table, batch, bf16)
            t3 = time.perf_counter()
            writer.write(pred)
            secs["write"] += time.perf_counter() - t3
            secs["encode"] += t2 - t1
            secs["forward"] += t3 - t2
            rows += len(pred)
    total = sum(secs.values())
    return {
        "total_s": round(total, 3),
        **{f"{k}_s": round(v, 3) for k, v in secs.items()},
        **{f"{k}_rows_per_s": round(rows / v) for k, v in secs.items()},
        "rows_per_s": round(rows / total),
    }


def time_before(run_dir: Path, data: Path, out: Path, bf16: bool, batch: int, chunk_rows: int) -> float:
    """Rows/s of the predict loop as it was before the pipeline and the fused layers: the next
    chunk parsed in a background thread, encode, forward (eager layers) and write in turn."""
    from funnel.data.io import TableWriter, iter_table, prefetched
    from funnel.inference import predict_table

    cfg, featurizer, model = load(run_dir, bf16, fuse=False)
    start, rows = time.perf_counter(), 0
    with TableWriter(out) as writer:
        for df in prefetched(iter_table(data, None, featurizer.feature_columns(), chunk_rows)):
            pred = predict_table(model, featurizer.encode(df, "bench", labels=False), batch, bf16)
            writer.write(pred)
            rows += len(pred)
    return rows / (time.perf_counter() - start)


def time_predict(run_dir: Path, data: Path, out: Path, bf16: bool, batch: int, chunk_rows: int) -> float:
    from funnel.inference import predict_run

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("funnel.inference")
    handler = Keep()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        predict_run(run_dir, data, out, bf16=bf16, batch_size=batch, chunk_rows=chunk_rows)
    finally:
        log.removeHandler(handler)
    return float(records[-1].args[-1])  # the rows/s predict logs (from the first chunk read)


def child_predict(run_dir: Path, data: Path, out: Path, bf16: bool) -> dict:
    """`funnel predict` in a fresh process: its rows/s (as logged) and its peak RSS (GNU time)."""
    cmd = ["/usr/bin/time", "-f", "peak_rss_kb=%M", sys.executable, "-m", "funnel", "predict", str(run_dir)]
    cmd += ["--data", str(data), "--out", str(out), *(["--bf16"] if bf16 else [])]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"funnel predict failed:\n{done.stderr[-3000:]}")
    lines = done.stderr.splitlines()
    rate = [line.rsplit("(", 1)[-1].split()[0] for line in lines if "rows/s" in line]
    rss = [int(line.split("=")[1]) for line in lines if line.startswith("peak_rss_kb=")]
    rate_now = float(rate[-1]) if rate else None
    return {"rows_per_s": rate_now, "wall_s": round(wall, 2), "peak_rss_mb": round(rss[-1] / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--chunk-rows", type=int, default=262_144)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--skip", default="", help="to skip, comma-separated: limit,forward,phases,before,predict,rss")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    logging.basicConfig(level=logging.WARNING)
    result: dict = {"rows": args.rows, "threads": torch.get_num_threads(), "batch_size": args.batch_size}
    result["tower_mflop_per_row"] = round(tower_flops_per_row() / 1e6, 3)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        data = tmp / "bench.parquet"
        make_file(args.rows, data)
        from funnel.spec import config_from_dict
        from funnel.training.fit import fit_config

        run_dir = tmp / "run"
        fit_config(config_from_dict(config(data, run_dir)))
        precisions = {"f32": False, "bf16": True}
        samples: dict[str, list] = {}
        for r in range(args.repeats):
            for name, bf16 in precisions.items():  # alternating: both see the same load
                if "limit" not in skip:
                    samples.setdefault(f"limit_{name}", []).append(time_limit(bf16, args.batch_size, False))
                    samples.setdefault(f"limit_fused_{name}", []).append(time_limit(bf16, args.batch_size, True))
                if "forward" not in skip:
                    samples.setdefault(f"forward_{name}", []).append(time_forward(run_dir, data, bf16, args.batch_size))
                if "phases" not in skip:
                    ph = time_phases(run_dir, data, tmp / "p.parquet", bf16, args.batch_size, args.chunk_rows)
                    samples.setdefault(f"phases_{name}", []).append(ph)
                for key, fn in (("before", time_before), ("predict", time_predict)):
                    if key in skip:
                        continue
                    cpu = time.process_time()  # every thread of this process: robust to a loaded machine
                    rate = fn(run_dir, data, tmp / f"{key}.parquet", bf16, args.batch_size, args.chunk_rows)
                    samples.setdefault(f"{key}_{name}", []).append(rate)
                    samples.setdefault(f"{key}_{name}_per_cpu_s", []).append(args.rows / (time.process_time() - cpu))
            print(f"round {r}: {json.dumps({k: v[-1] for k, v in samples.items()})}", flush=True)
        for key, values in samples.items():
            if isinstance(values[0], dict):
                best = min(values, key=lambda v: v["total_s"])  # the least disturbed pass
                result[key] = best
            else:
                result[f"{key}_rows_per_s"] = round(statistics.median(values))
                result[f"{key}_all"] = [round(v) for v in values]
        for name in precisions:
            if f"limit_{name}_rows_per_s" in result:
                lim = result[f"limit_{name}_rows_per_s"]
                for key in ("limit", "limit_fused"):
                    rate = result[f"{key}_{name}_rows_per_s"]
                    result[f"{key}_{name}_gflops"] = round(rate * tower_flops_per_row() / 1e9, 1)
                for key in ("limit_fused", "forward", "before", "predict"):
                    if f"{key}_{name}_rows_per_s" in result:
                        result[f"{key}_{name}_share_of_limit"] = round(result[f"{key}_{name}_rows_per_s"] / lim, 3)
            if f"before_{name}_all" in result and f"predict_{name}_all" in result:  # per round: same load
                pairs = zip(samples[f"predict_{name}"], samples[f"before_{name}"], strict=True)
                result[f"predict_{name}_vs_before"] = round(statistics.median(p / b for p, b in pairs), 3)
                pairs = zip(samples[f"predict_{name}_per_cpu_s"], samples[f"before_{name}_per_cpu_s"], strict=True)
                result[f"predict_{name}_vs_before_per_cpu_s"] = round(statistics.median(p / b for p, b in pairs), 3)
        if "rss" not in skip:
            big = tmp / "bench4x.parquet"
            make_file(args.rows, big, copies=4)
            for name, bf16 in precisions.items():
                for label, path in (("1x", data), ("4x", big)):
                    result[f"rss_{name}_{label}"] = child_predict(run_dir, path, tmp / "r.parquet", bf16)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
