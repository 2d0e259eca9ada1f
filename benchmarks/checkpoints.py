"""Checkpoint bytes and the training stall of saving them, before and after lean checkpoints.

The model of the throughput benchmark (benchmarks/throughput.py): ESMM, 20 categorical fields
hashed into tables of ``--rows`` rows in all (log-spaced sizes, as there), embedding 18, towers
[360, 200, 80], Adam (LazyAdam on the tables above optim.sparse_min_rows, as ``funnel fit``
picks), so every save carries both moments of every row. Each contender trains ``--epochs``
short epochs (``--steps`` batches each) with a validation at every epoch end, where the
checkpoints are saved; the monitor is the step (mode max), so every epoch improves: the case
that writes the most.

- ``before``: what funnel did until this change: Lightning's ModelCheckpoint (top-1 monitored
  file epochN.ckpt and last.ckpt, both full: weights, moments, loops) written synchronously by
  Lightning's TorchCheckpointIO (which serialises into memory first, then writes).
- ``after``: funnel's BestAndLast + BackgroundCheckpointIO (funnel/training/checkpointing.py):
  the best as weights only, last.ckpt full, both copied into reused CPU buffers and written by
  a background thread.
- ``none``: no checkpoint at all (the training time without any save).

Reported per contender (medians over the epochs after the first, over ``--repeats`` rounds run
interleaved): bytes of the best and last files, seconds the training thread spent inside the
save calls (the stall), seconds the writes took (in the background for ``after``), and the
training time of an epoch that runs while the previous epoch's files are being written, against
``none``. The last line printed is one JSON object.

    python benchmarks/checkpoints.py --rows 0.4M 40M --epochs 3 --steps 20 --repeats 2

``--contenders`` picks some of them; ``--buffers keep|release|auto`` sets how ``after`` keeps its
snapshot buffers between saves (``FUNNEL_CHECKPOINT_BUFFERS``, default auto). Each contender also
reports its resident memory at each epoch's first batch: buffers kept between saves show there.

A contender whose memory (the model, its moments and a second copy of both, for the snapshot or
for Lightning's in-memory serialisation) would not fit in MemAvailable is skipped with a
message; ``--optim sgd`` measures the weights alone (no moments) in a third of the memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from funnel.training.checkpointing import BackgroundCheckpointIO, BestAndLast

N_FIELDS = 20
EMBED = 18
BASE_VOCAB = np.geomspace(10, 100_000, N_FIELDS)
CONTENDERS = ("before", "after", "none")
FOLDERS: list[Path] = []  # the checkpoint folders of this process (removed if it is stopped)


def parse_rows(text: str) -> int:
    """'0.4M', '40M', '400k' or '400000' -> rows."""
    factor = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    return round(float(text[:-1] if factor > 1 else text) * factor)


def buckets(total_rows: int) -> list[int]:
    return [max(int(v), 2) for v in BASE_VOCAB * (total_rows / BASE_VOCAB.sum())]


def config(total_rows: int, batch_size: int, optim: str):
    from funnel.spec import config_from_dict

    return config_from_dict(
        {
            "data": {"train": "in-memory", "batch_size": batch_size, "eval_batch_size": 65536},
            "features": [
                {"name": f"c{f}", "kind": "categorical", "hash_buckets": b} for f, b in enumerate(buckets(total_rows))
            ],
            "funnel": {
                "model": "esmm",
                "embed_dim": EMBED,
                "tower": {"type": "mlp", "hidden": [360, 200, 80]},
                "stages": [{"name": "click"}, {"name": "conversion", "after": "click"}],
            },
            "optim": {"name": optim, "lr": 0.001},
        }
    )


def frame(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cols = {f"c{f}": rng.integers(0, 10**9, rows) for f in range(N_FIELDS)}
    click = rng.random(rows) < 0.2
    conv = click & (rng.random(rows) < 0.3)
    return pd.DataFrame(cols | {"click": click.astype(np.int64), "conversion": conv.astype(np.int64)})


class TimedSync(TorchCheckpointIO):
    def __init__(self):
        super().__init__()
        self.calls: list[float] = []

    def save_checkpoint(self, *args, **kwargs):
        start = time.perf_counter()
        super().save_checkpoint(*args, **kwargs)
        self.calls.append(time.perf_counter() - start)


class TimedBackground(BackgroundCheckpointIO):
    def __init__(self, buffers: str | None = None):
        self.writes: list[float] = []
        self.calls: list[float] = []
        self.waits: list[float] = []  # the part of each call spent waiting for the previous write

        def write(obj, path):
            from funnel.training.checkpointing import save_atomic

            start = time.perf_counter()
            save_atomic(obj, path)
            self.writes.append(time.perf_counter() - start)

        super().__init__(write=write, buffers=buffers)
        self.kept: list[bool] = []  # each save: were its snapshot buffers kept after the write

    def _keeps(self, checkpoint):
        keep = super()._keeps(checkpoint)
        self.kept.append(keep)
        return keep

    def save_checkpoint(self, *args, **kwargs):
        start, blocked = time.perf_counter(), self.blocked_s
        super().save_checkpoint(*args, **kwargs)
        self.calls.append(time.perf_counter() - start)
        self.waits.append(self.blocked_s - blocked)


class EpochClock(pl.Callback):
    """Training seconds of each epoch (first batch start to last batch end), and the process's
    resident memory at each epoch's first batch (snapshot buffers kept between saves show there)."""

    def __init__(self):
        self.train: list[float] = []
        self.rss: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            self._start = time.perf_counter()
            self.rss.append(rss_bytes())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._end = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self.train.append(self._end - self._start)


def state_bytes(module) -> tuple[int, int]:
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    return weights, weights * 3


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def guard_memory(floor: int, folders: list[Path]) -> None:
    """Stop this process (removing its checkpoint folders) when MemAvailable falls below ``floor``
    bytes: the machine is shared, and the kernel's OOM killer would pick a process at random."""

    def watch():
        while True:
            if mem_available() < floor:
                print(f"MemAvailable below {floor / 1e9:.1f} GB: stopped, nothing measured", flush=True)
                for folder in folders:
                    shutil.rmtree(folder, ignore_errors=True)
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def run_one(name, cfg, graph, featurizer, tables, args, out_dir: Path) -> dict:
    from pytorch_lightning.loggers import CSVLogger

    from funnel.data.datamodule import FunnelDataModule
    from funnel.models.registry import create_model
    from funnel.training.module import FunnelLightningModule

    pl.seed_everything(0, verbose=False)
    dm = FunnelDataModule(cfg, graph, featurizer)
    dm.tables = tables
    module = FunnelLightningModule(create_model(graph, cfg.funnel, featurizer.layout()), cfg.optim)
    clock = EpochClock()
    callbacks: list[pl.Callback] = [clock]
    plugins = []
    io = None
    if name == "before":
        saver = ModelCheckpoint(
            dirpath=out_dir,
            filename="epoch{epoch}",
            auto_insert_metric_name=False,
            monitor="step",
            mode="max",
            save_top_k=1,
            save_last=True,
        )
        io = TimedSync()
    elif name == "after":
        names = {"filename": "epoch{epoch}", "auto_insert_metric_name": False}
        saver = BestAndLast(dirpath=out_dir, monitor="step", mode="max", save_top_k=1, **names)
        io = TimedBackground(args.buffers)
    if io is not None:
        callbacks.append(saver)
        plugins.append(io)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=CSVLogger(out_dir, name="logs"),
        callbacks=callbacks,
        plugins=plugins,
        enable_checkpointing=io is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=args.steps,
        accelerator="cpu",
        devices=1,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - start  # includes waiting for the last background write
    result = {"fit_s": fit_s, "train_s": clock.train, "sparse": module.sparse, "epoch_start_rss": clock.rss}
    if io is not None:
        best, last = Path(saver.best_model_path), Path(saver.last_model_path)
        result |= {
            "best_bytes": best.stat().st_size,
            "last_bytes": last.stat().st_size,
            "save_calls_s": io.calls,
            "write_s": getattr(io, "writes", io.calls),
            "wait_calls_s": getattr(io, "waits", [0.0] * len(io.calls)),
            "buffers_kept": getattr(io, "kept", None),
        }
    del trainer, module, dm
    return result


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_scale(total_rows: int, args) -> dict:
    from funnel.data.featurizer import Featurizer
    from funnel.runs import build_graph

    cfg = config(total_rows, args.batch_size, args.optim)
    graph = build_graph(cfg)
    df = frame(args.steps * args.batch_size + 4096, seed=0)
    featurizer = Featurizer(cfg, graph).fit(df.iloc[4096:])
    tables = {"train": featurizer.encode(df.iloc[4096:], "train"), "valid": featurizer.encode(df.iloc[:4096], "valid")}
    rows = sum(t.rows for t in featurizer.layout().tables)
    weights = rows * EMBED * 4
    full = weights * (3 if args.optim == "adam" else 1)
    sparse = args.optim == "adam" and rows > 1_000_000  # optim.sparse_embeddings: auto (its default minimum)
    # the state, its second copy (snapshot or serialisation), a dense gradient unless sparse, 1 GiB
    need = 2 * full + (0 if sparse else weights) + (1 << 30)
    skip = need > mem_available()
    print(
        f"tables {rows:,} rows: weights {weights / 1e9:.2f} GB, full state {full / 1e9:.2f} GB ({args.optim}); "
        f"needs ~{need / 1e9:.1f} GB, {mem_available() / 1e9:.1f} GB available"
        + ("; SKIPPED the savers (not enough memory)" if skip else ""),
        flush=True,
    )
    runs: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    for _ in range(args.repeats):
        for name in args.contenders:
            if skip and name != "none":
                continue
            out = Path(tempfile.mkdtemp(prefix=f"ckpt-{name}-", dir=args.dir))
            FOLDERS.append(out)
            try:
                runs[name].append(run_one(name, cfg, graph, featurizer, tables, args, out))
            finally:
                shutil.rmtree(out, ignore_errors=True)
    summary: dict = {"table_rows": rows, "optim": args.optim, "skipped_savers": skip}
    base = median([t for r in runs["none"] for t in r["train_s"][1:]])
    summary["none_epoch_train_s"] = base
    for name in ("before", "after"):
        if not runs[name]:
            continue
        r0 = runs[name][0]
        summary[name] = {
            "best_bytes": r0["best_bytes"],
            "last_bytes": r0["last_bytes"],
            "sparse": r0["sparse"],
            # the stall: seconds the training thread spent in the two save calls of an epoch end
            # (the first epoch's apart: it allocates the snapshot buffers)
            "stall_first_epoch_s": median([sum(r["save_calls_s"][:2]) for r in runs[name]]),
            "stall_per_epoch_s": median(
                [sum(r["save_calls_s"][i : i + 2]) for r in runs[name] for i in range(2, len(r["save_calls_s"]), 2)]
            ),
            "save_calls": len(r0["save_calls_s"]),
            # of which waiting for the previous epoch's write (an epoch shorter than a write)
            "wait_per_epoch_s": median(
                [sum(r["wait_calls_s"][i : i + 2]) for r in runs[name] for i in range(2, len(r["wait_calls_s"]), 2)]
            ),
            "write_s_median": median([s for r in runs[name] for s in r["write_s"]]),
            "write_s_max": max(s for r in runs[name] for s in r["write_s"]),
            "epoch_train_s": median([t for r in runs[name] for t in r["train_s"][1:]]),
            "fit_s": median([r["fit_s"] for r in runs[name]]),
            "epoch_start_rss_bytes": r0["epoch_start_rss"],
            "buffers_kept": r0["buffers_kept"],
        }
    summary["none_fit_s"] = median([r["fit_s"] for r in runs["none"]])
    summary["none_epoch_start_rss_bytes"] = runs["none"][0]["epoch_start_rss"] if runs["none"] else None
    return summary


def save_only(total_rows: int, args) -> dict:
    """Seconds per save of the model's weights (what best.ckpt holds) at ``total_rows``, without
    training: Lightning's synchronous save against the snapshot + background write, interleaved."""
    from funnel.data.featurizer import Featurizer
    from funnel.models.registry import create_model
    from funnel.runs import build_graph

    cfg = config(total_rows, args.batch_size, args.optim)
    graph = build_graph(cfg)
    featurizer = Featurizer(cfg, graph).fit(frame(1000, seed=0))
    model = create_model(graph, cfg.funnel, featurizer.layout())
    state = {"epoch": 0, "global_step": 1, "state_dict": model.state_dict()}
    weights = sum(t.numel() * t.element_size() for t in state["state_dict"].values())
    out = Path(tempfile.mkdtemp(prefix="ckpt-save-", dir=args.dir))
    FOLDERS.append(out)
    before, after_call, after_write = [], [], []
    try:
        for rep in range(args.repeats):
            sync = TimedSync()
            sync.save_checkpoint(state, out / "sync.ckpt")
            before.append(sync.calls[0])
            (out / "sync.ckpt").unlink()
            background = TimedBackground()
            state["global_step"] = rep + 2  # another step: a fresh copy
            background.save_checkpoint(state, out / "async.ckpt")
            background.teardown()
            after_call.append(background.calls[0])
            after_write.append(background.writes[0])
            size = (out / "async.ckpt").stat().st_size
            (out / "async.ckpt").unlink()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "table_rows": sum(t.rows for t in featurizer.layout().tables),
        "weights_bytes": weights,
        "file_bytes": size,
        "before_sync_save_s": before,
        "after_stall_s": after_call,
        "after_background_write_s": after_write,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=["0.4M", "40M"], help="table rows in all (0.4M, 40M)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="training batches per epoch")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--optim", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-only", action="store_true", help="time saves of the weights alone, no training")
    parser.add_argument("--min-free-gb", type=float, default=1.5, help="stop when MemAvailable falls below this")
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (default: the temp folder)")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument(
        "--buffers",
        choices=["auto", "keep", "release"],
        default=None,
        help="the after contender's snapshot buffers (default: FUNNEL_CHECKPOINT_BUFFERS, else auto)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    guard_memory(int(args.min_free_gb * 1e9), FOLDERS)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    results = {}
    if args.save_only:
        for text in args.rows:
            results[text] = r = save_only(parse_rows(text), args)
            print(
                f"{text}: {r['file_bytes'] / 1e9:.2f} GB of weights; Lightning sync save "
                f"{statistics.median(r['before_sync_save_s']):.2f} s; snapshot (the stall) "
                f"{statistics.median(r['after_stall_s']):.2f} s + background write "
                f"{statistics.median(r['after_background_write_s']):.2f} s",
                flush=True,
            )
        print(json.dumps({"save_only": True, "threads": args.threads, "results": results}))
        return
    for text in args.rows:
        results[text] = summary = run_scale(parse_rows(text), args)
        print(f"\n{text} rows ({summary['table_rows']:,} table rows, {args.optim}):")
        print(
            f"{'':8} {'best MB':>9} {'last MB':>9} {'stall s':>9} {'(waited)':>9} {'stall@0':>9} {'write s':>9} "
            f"{'epoch s':>9} {'fit s':>9}"
        )
        for name in ("before", "after"):
            s = summary.get(name)
            if s:
                print(
                    f"{name:8} {s['best_bytes'] / 1e6:9.1f} {s['last_bytes'] / 1e6:9.1f} {s['stall_per_epoch_s']:9.3f} "
                    f"{s['wait_per_epoch_s']:9.3f} {s['stall_first_epoch_s']:9.3f} {s['write_s_median']:9.3f} "
                    f"{s['epoch_train_s']:9.3f} {s['fit_s']:9.1f}"
                )
        blank = f"{'':>9} " * 6
        if summary["none_fit_s"] is not None:
            print(f"{'none':8} {blank}{summary['none_epoch_train_s']:9.3f} {summary['none_fit_s']:9.1f}", flush=True)
    print(json.dumps({"threads": args.threads, "epochs": args.epochs, "steps": args.steps, "results": results}))


if __name__ == "__main__":
    main()
