"""Scale benchmark: Ali-CCP-shaped data larger than memory, the streaming prepare pass, training
from the memory-mapped store against the in-memory path, and DDP on CPU.

Subcommands (each prints one JSON object as its last line; figures in docs/performance.md):

    python benchmarks/scale.py generate --rows 100_000_000 --out /work/scale-data/aliccp100m
    python benchmarks/scale.py prepare --data /work/scale-data/aliccp100m
    python benchmarks/scale.py train --data /work/scale-data/aliccp1m --repeats 2
    python benchmarks/scale.py train --data /work/scale-data/aliccp100m --limit-rows 2_000_000 --shuffle blocks
    python benchmarks/scale.py ddp --data /work/scale-data/aliccp1m

- ``generate``: Parquet shards (zstd) shaped like Ali-CCP: 19 single-valued int64 fields and
  4 multi-hot fields (list<int64> ids with list<float32> weights ``w_<field>``), Zipf ids
  over vocabularies of 3 to 1M, ``click`` ~4% and ``purchase`` ~0.5% of impressions (only after
  a click) drawn from a hidden logit of a few fields, so that AUCs exceed 0.5. Vectorised numpy,
  one shard per worker process at a time; every shard is seeded by its index, so the data
  does not depend on the number of workers.
- ``prepare``: ``funnel prepare`` in a subprocess while its RssAnon is sampled every 0.2 s.
- ``train``: one epoch (or ``--limit-rows`` rows of it) from the memory-mapped store, and the
  same tables cloned into RAM (the in-memory path), each in a fresh process; samples/s and RssAnon.
- ``ddp``: the same epoch with 2 CPU processes (gloo) against 1 process.

RssAnon (anonymous memory: heap, tensors) is what a larger data set would grow; pages of the
memory-mapped store are file-backed (RssFile), shared with the page cache and dropped under
pressure, so they are reported apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("scale")
HERE = Path(__file__).resolve().parent
CONFIG = HERE / "scale_aliccp.yaml"
CACHE_DIR = "/work/scale-data/cache"

# Ali-CCP's fields (the public release's field ids) with vocabularies of the size the real
# 1% sample has (rounded; 205 is the item id, 101 the user id).
SINGLE = {
    "101": 240_000, "121": 98, "122": 14, "124": 3, "125": 8, "126": 4, "127": 4, "128": 3, "129": 5,
    "205": 1_000_000, "206": 7_000, "207": 260_000, "210": 80_000, "216": 110_000, "508": 6_000,
    "509": 100_000, "702": 50_000, "853": 37_000, "301": 4,
}  # fmt: skip
# multi-hot user-behaviour fields: (vocabulary, mean list length)
MULTI = {"109_14": (6_000, 3.0), "110_14": (500_000, 4.0), "127_14": (54_000, 2.0), "150_14": (31_000, 3.0)}
ZIPF_S = 1.1  # rank-frequency exponent: a few ids carry most impressions, a long tail is rare
EMPTY_SHARE = 0.05  # rows whose multi-hot list is empty (the field is absent)
TAIL_SHARE = 0.005  # rows with a Pareto-long list (up to MAX_LEN ids)
MAX_LEN = 400
# the fields the hidden logits depend on, with the spread of their per-id effects
CLICK_EFFECTS = {"101": 0.5, "205": 0.5, "206": 0.3, "121": 0.3, "702": 0.3, "110_14": 0.8, "109_14": 0.5}
BUY_EFFECTS = {"101": 0.4, "205": 0.6, "216": 0.4, "122": 0.3, "127_14": 0.6, "150_14": 0.4}
CTR, CVR = 0.04, 0.125  # click share, and purchase share of clicks (0.5% of impressions)


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
def zipf_ranks(rng: np.random.Generator, vocab: int, n: int) -> np.ndarray:
    """``n`` ranks in [0, vocab) with P(rank r) ∝ (r + 1)^-ZIPF_S: the continuous inverse CDF of a
    bounded power law, floored (one vectorised power instead of a search over a CDF table)."""
    a = 1.0 - ZIPF_S
    x = (1.0 + rng.random(n) * ((vocab + 1.0) ** a - 1.0)) ** (1.0 / a)
    return np.minimum(x.astype(np.int64) - 1, vocab - 1)


def list_lengths(rng: np.random.Generator, mean: float, n: int) -> np.ndarray:
    """Geometric lengths (mean ``mean``), some empty lists, and a Pareto tail up to MAX_LEN."""
    lengths = rng.geometric(1.0 / mean, n)
    lengths[rng.random(n) < EMPTY_SHARE] = 0
    tail = rng.random(n) < TAIL_SHARE
    lengths[tail] = np.minimum(np.ceil(mean * 4 * rng.pareto(1.2, int(tail.sum())) + mean * 4), MAX_LEN)
    return lengths.astype(np.int64)


class Fields:
    """The per-field pieces every shard shares, drawn from ``seed`` alone: the id of each rank
    (a shuffled block of a global id space, like Ali-CCP's feature ids) and the per-id effects."""

    def __init__(self, seed: int):
        rng = np.random.default_rng([seed, 0])
        self.ids: dict[str, np.ndarray] = {}
        base = 0
        for name, vocab in {**SINGLE, **{k: v for k, (v, _) in MULTI.items()}}.items():
            self.ids[name] = base + rng.permutation(vocab).astype(np.int64)
            base += vocab
        self.click = {f: rng.normal(0.0, s, len(self.ids[f])).astype(np.float32) for f, s in CLICK_EFFECTS.items()}
        self.buy = {f: rng.normal(0.0, s, len(self.ids[f])).astype(np.float32) for f, s in BUY_EFFECTS.items()}


def draw(fields: Fields, seed: int, stream: int, rows: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """The columns of random stream ``stream`` (shard i is stream i + 1; 0 calibrates): single
    fields as int64 arrays, multi-hot ones as (offsets, ids, weights), and the two logits
    without their biases."""
    rng = np.random.default_rng([seed, 1, stream])
    cols: dict[str, object] = {}
    click = np.zeros(rows, np.float32)
    buy = np.zeros(rows, np.float32)
    for name, vocab in SINGLE.items():
        ranks = zipf_ranks(rng, vocab, rows)
        cols[name] = fields.ids[name][ranks]
        if name in fields.click:
            click += fields.click[name][ranks]
        if name in fields.buy:
            buy += fields.buy[name][ranks]
    for name, (vocab, mean) in MULTI.items():
        lengths = list_lengths(rng, mean, rows)
        offsets = np.zeros(rows + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ranks = zipf_ranks(rng, vocab, int(offsets[-1]))
        weights = (1.0 + rng.poisson(0.7, len(ranks))).astype(np.float32)  # e.g. a count of visits
        cols[name] = (offsets, fields.ids[name][ranks], weights)
        for effects, logit in ((fields.click, click), (fields.buy, buy)):
            if name in effects:  # the weighted mean of the list's effects (0 for an empty list)
                total = np.zeros(len(ranks) + 1, np.float64)
                np.cumsum(effects[name][ranks] * weights, out=total[1:])
                wsum = np.zeros(len(ranks) + 1, np.float64)
                np.cumsum(weights, out=wsum[1:])
                num, den = total[offsets[1:]] - total[offsets[:-1]], wsum[offsets[1:]] - wsum[offsets[:-1]]
                logit += np.divide(num, den, out=np.zeros(rows), where=den > 0).astype(np.float32)
    return cols, click, buy


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def bias_for(logit: np.ndarray, share: float) -> float:
    """The bias b with mean(sigmoid(logit + b)) == share (bisection)."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sigmoid(logit + mid).mean() < share else (lo, mid)
    return (lo + hi) / 2


def calibrate(fields: Fields, seed: int) -> tuple[float, float]:
    """Biases that give CTR and CVR in expectation, from a 500k-row sample of its own seed."""
    _, click, buy = draw(fields, seed, 0, 500_000)
    b_click = bias_for(click, CTR)
    weight = sigmoid(click + b_click)  # the purchase share is of clicks: weight rows by P(click)
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.average(sigmoid(buy + mid), weights=weight) < CVR else (lo, mid)
    return b_click, (lo + hi) / 2


def write_shard(job: tuple) -> tuple[int, int]:
    """Draw and write shard ``shard``; returns (rows, bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out, shard, rows, seed, biases = job
    fields = _fields(seed)
    cols, click, buy = draw(fields, seed, shard + 1, rows)
    rng = np.random.default_rng([seed, 2, shard])
    clicked = rng.random(rows) < sigmoid(click + biases[0])
    bought = clicked & (rng.random(rows) < sigmoid(buy + biases[1]))
    arrays: dict[str, pa.Array] = {
        "click": pa.array(clicked.astype(np.int8)),
        "purchase": pa.array(bought.astype(np.int8)),
    }
    for name, value in cols.items():
        if isinstance(value, tuple):
            offsets, ids, weights = value
            arrays[name] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids))
            arrays[f"w_{name}"] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(weights))
        else:
            arrays[name] = pa.array(value)
    path = Path(out) / f"part-{shard:05d}.parquet"
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table(arrays), tmp, compression="zstd", row_group_size=262_144)
    os.replace(tmp, path)
    return rows, path.stat().st_size


_FIELDS: dict[int, Fields] = {}


def _fields(seed: int) -> Fields:
    """The shared per-field tables, built once per worker process."""
    if seed not in _FIELDS:
        _FIELDS[seed] = Fields(seed)
    return _FIELDS[seed]


def generate(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    biases = calibrate(_fields(args.seed), args.seed)
    shards = [(i, min(args.shard_rows, args.rows - lo)) for i, lo in enumerate(range(0, args.rows, args.shard_rows))]
    jobs = [(str(out), i, n, args.seed, biases) for i, n in shards]
    rows = size = 0
    with mp.get_context("fork").Pool(args.workers) as pool:
        for n, b in pool.imap_unordered(write_shard, jobs):
            rows, size = rows + n, size + b
            log.info(
                "generate: %s / %s rows (%.0f rows/s)",
                f"{rows:,}",
                f"{args.rows:,}",
                rows / (time.perf_counter() - start),
            )
    seconds = time.perf_counter() - start
    return {
        "out": str(out),
        "rows": rows,
        "shards": len(shards),
        "seconds": round(seconds, 1),
        "rows_per_s": round(rows / seconds),
        "workers": args.workers,
        "bytes": size,
        "bytes_per_row": round(size / rows, 1),
        "biases": [round(b, 3) for b in biases],
    }


# ---------------------------------------------------------------------------------------------
# memory sampling
# ---------------------------------------------------------------------------------------------
def status_kb(pid: int | str, keys: tuple[str, ...] = ("RssAnon", "RssFile")) -> dict[str, int]:
    """Fields of /proc/<pid>/status in kB (empty once the process is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


class Sampler(threading.Thread):
    """Samples a process's RssAnon and RssFile every ``every`` seconds in the background;
    ``mark(name)`` records the peak since the previous mark (a phase of the run)."""

    def __init__(self, pid: int | str = "self", every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_anon = self.peak_file = self.last_anon = 0
        self.phase_peak = 0
        self.phases: dict[str, int] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            self.stopped.wait(self.every)

    def sample(self) -> None:
        kb = status_kb(self.pid)
        if kb:
            self.last_anon = kb["RssAnon"]
            self.peak_anon = max(self.peak_anon, kb["RssAnon"])
            self.phase_peak = max(self.phase_peak, kb["RssAnon"])
            self.peak_file = max(self.peak_file, kb.get("RssFile", 0))

    def mark(self, name: str) -> None:
        """The peak RssAnon (MB) of the phase that ends now."""
        self.sample()
        self.phases[name] = round(self.phase_peak / 1024)
        self.phase_peak = self.last_anon

    def stop(self) -> dict[str, int]:
        self.stopped.set()
        self.join()
        self.sample()
        return {"peak_rss_anon_mb": round(self.peak_anon / 1024), "final_rss_anon_mb": round(self.last_anon / 1024)}


def resident_mb(directory: Path) -> tuple[int, int]:
    """(MB of the store's files in the page cache, MB on disk), from fincore when installed."""
    files = [str(p) for p in Path(directory).glob("*.bin")]
    size = sum(Path(f).stat().st_size for f in files)
    try:
        out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", *files], capture_output=True, text=True, check=True)
        return round(sum(int(x) for x in out.stdout.split()) / 2**20), round(size / 2**20)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return -1, round(size / 2**20)


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------
def load(data: str, overrides: list[str]):
    """The benchmark config on ``data`` (a shard folder), with ``overrides``."""
    from funnel.spec import load_config

    return load_config(CONFIG, [f"data.train={data}", f"data.cache_dir={CACHE_DIR}", *overrides])[0]


def store_of(cfg) -> Path:
    """The cache entry (encoded store) the config's data maps to."""
    from funnel.data.cache import cache_key, cache_root

    return cache_root(cfg) / cache_key(cfg)


def run_sampled(cmd: list[str], log_path: Path) -> dict:
    """Run ``cmd`` with stderr to ``log_path``, sampling its RssAnon; returns wall time,
    peak and final RssAnon (final: the last sample before it exited) and its stdout."""
    start = time.perf_counter()
    with open(log_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        sampler = Sampler(proc.pid)
        sampler.start()
        stdout, _ = proc.communicate()
        seconds = time.perf_counter() - start
        sampler.stopped.set()
        sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log_path}")
    return {
        "seconds": round(seconds, 1),
        "peak_rss_anon_mb": round(sampler.peak_anon / 1024),
        "final_rss_anon_mb": round(sampler.last_anon / 1024),
        "stdout": stdout,
    }


def prepare(args: argparse.Namespace) -> dict:
    """A cold ``funnel prepare`` (the config's cache entry removed first), then a second one
    that hits the cache (its cost: hashing the inputs and verifying the store's checksums)."""
    import shutil

    cfg = load(args.data, args.overrides)
    entry = store_of(cfg)
    if entry.exists():
        log.info("removing the existing store %s for a cold prepare", entry)
        shutil.rmtree(entry)
    parquet = sum(p.stat().st_size for p in Path(args.data).glob("*.parquet"))
    overrides = [f"data.train={args.data}", f"data.cache_dir={CACHE_DIR}", *args.overrides]
    cmd = [sys.executable, "-m", "funnel", "prepare", str(CONFIG), *overrides]
    out = Path(args.log_dir)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    cold_log = out / f"prepare-{Path(args.data).name}.log"
    cold = run_sampled(cmd, cold_log)
    result = json.loads(cold.pop("stdout"))
    rows = sum(result["rows"].values())
    # the two passes' own times, as prepare logs them ("...: N rows in S s"): imports excluded
    passes = [float(s) for s in re.findall(r"rows in ([0-9.]+)s", cold_log.read_text())]
    hit = run_sampled(cmd, out / f"prepare-{Path(args.data).name}-hit.log")
    hit.pop("stdout")
    return {
        "data": args.data,
        "rows": result["rows"],
        "prepare_seconds": cold["seconds"],
        "prepare_rows_per_s": round(rows / cold["seconds"]),
        "fit_pass_seconds": passes[0] if passes else None,
        "encode_pass_seconds": round(sum(passes[1:]), 1) if passes else None,
        "passes_rows_per_s": round(rows / sum(passes)) if passes else None,
        "peak_rss_anon_mb": cold["peak_rss_anon_mb"],
        "final_rss_anon_mb": cold["final_rss_anon_mb"],
        "store": result["store"],
        "store_bytes": result["bytes"],
        "store_bytes_per_row": result["bytes_per_row"],
        "parquet_bytes": parquet,
        "parquet_bytes_per_row": round(parquet / rows, 1),
        "cache_hit_seconds": hit["seconds"],
        "cache_hit_peak_rss_anon_mb": hit["peak_rss_anon_mb"],
        "loadavg": [round(load_start, 1), round(os.getloadavg()[0], 1)],
    }


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
def in_memory(table):
    """The in-memory path: every tensor of an EncodedTable copied into anonymous memory."""
    import dataclasses

    from funnel.data.table import EncodedTable, Ragged

    def copy(value):
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, Ragged):
            return Ragged(copy(value.values), copy(value.offsets), copy(value.weights))
        return None if value is None else value.clone()

    return EncodedTable(**{f.name: copy(getattr(table, f.name)) for f in dataclasses.fields(table)})


def train_one(args: argparse.Namespace) -> dict:
    """One contender in this process: the store opened as it is (no checksum pass: that cost
    is the cache hit's, measured by ``prepare``), optionally cloned into RAM, then one epoch or
    its first ``--limit-rows`` rows, timed from the epoch's start (the order is drawn there)
    to the last batch's end. Validation is off: only training is timed."""
    sampler = Sampler()
    sampler.start()
    load_start = os.getloadavg()[0]
    import pytorch_lightning as pl
    import torch

    from funnel.data.datamodule import FunnelDataModule
    from funnel.models.registry import create_model
    from funnel.runs import build_graph
    from funnel.training.module import FunnelLightningModule

    sampler.mark("imports")
    if args.devices == 1:  # under DDP Lightning gives each rank cores / ranks threads
        torch.set_num_threads(args.threads)
    cfg = load(args.data, [f"data.shuffle={args.shuffle}", *args.overrides])
    graph = build_graph(cfg)
    pl.seed_everything(cfg.seed, verbose=False)
    resident_before = resident_mb(Path(args.store))
    dm = FunnelDataModule.open_prepared(cfg, graph, Path(args.store))
    sampler.mark("open")
    if args.path == "memory":
        start = time.perf_counter()
        dm.tables = {split: in_memory(t) for split, t in dm.tables.items()}
        clone_s = time.perf_counter() - start
        sampler.mark("clone")
    module = FunnelLightningModule(create_model(graph, cfg.funnel, dm.featurizer.layout()), cfg.optim)
    batch = cfg.data.batch_size
    limit = -(-args.limit_rows // batch) if args.limit_rows else None
    timer = EpochTimer()
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=limit or 1.0,
        limit_val_batches=0,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
    )
    sampler.mark("build")
    trainer.fit(module, datamodule=dm)
    sampler.mark("fit")
    memory = sampler.stop()
    rank_rows = len(dm.tables["train"]) // trainer.world_size
    rows = min(rank_rows, limit * batch) if limit else rank_rows  # this rank's rows (ranks: disjoint)
    seconds = timer.end - timer.start
    out = {
        "path": args.path,
        "shuffle": args.shuffle,
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "threads": torch.get_num_threads(),
        "train_rows": len(dm.tables["train"]),
        "rows_timed": rows,
        "batches": timer.batches,
        "seconds": round(seconds, 2),
        "order_seconds": round(timer.first_batch - timer.start, 2),
        "samples_per_s": round(rows / seconds),
        # CPU time of this process over the same span: less sensitive to other processes
        # competing for the cores (this machine is shared), though not immune
        "samples_per_cpu_s": round(rows / (timer.cpu_end - timer.cpu_start)),
        "rss_anon_mb_by_phase": sampler.phases,
        **memory,
        "peak_rss_file_mb": round(sampler.peak_file / 1024),
        "store_in_page_cache_mb_before": resident_before[0],
        "store_mb": resident_before[1],
        "loadavg": [round(load_start, 1), round(os.getloadavg()[0], 1)],
    }
    if args.path == "memory":
        out["clone_seconds"] = round(clone_s, 1)
    return out


class EpochTimer:
    """Wall times of an epoch: its start (the loader draws the order on its first batch), the
    first batch's start and the last batch's end. Built as a Lightning callback on first use,
    so that importing this module does not import Lightning."""

    def __new__(cls):
        import pytorch_lightning as pl

        class _Timer(pl.Callback):
            batches = 0

            def on_train_epoch_start(self, trainer, module):
                self.start, self.cpu_start = time.perf_counter(), time.process_time()

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if batch_idx == 0:
                    self.first_batch = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                self.end, self.cpu_end = time.perf_counter(), time.process_time()
                self.batches = batch_idx + 1

        return _Timer()


def contender(
    args: argparse.Namespace, path: str, shuffle: str, devices: int = 1, overrides: tuple[str, ...] = ()
) -> list[dict]:
    """Run ``train_one`` in a fresh process (clean RssAnon); its JSON lines (one per rank: under
    DDP Lightning starts the other ranks by running the same command line again)."""
    cmd = [sys.executable, __file__, "_one", "--data", args.data, "--store", args.store, "--path", path]
    cmd += ["--shuffle", shuffle, "--limit-rows", str(args.limit_rows or 0), "--devices", str(devices)]
    cmd += ["--threads", str(args.threads)]
    cmd += [*args.overrides, *overrides]
    log.info("running %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-5000:])
        raise SystemExit(f"{path}/{shuffle}: the training process failed ({done.returncode})")
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for r in results:
        log.info("%s", r)
    return results


def median_of(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 1)


def train(args: argparse.Namespace) -> dict:
    """Interleaved repeats of each contender; medians of samples/s, the largest peak RssAnon."""
    args.store = args.store or str(store_of(load(args.data, args.overrides)))
    contenders = [("mmap", s) for s in args.shuffle] + ([("memory", args.shuffle[0])] if not args.mmap_only else [])
    runs: dict[str, list[dict]] = {f"{p}/{s}": [] for p, s in contenders}
    for _ in range(args.repeats):
        for p, s in contenders:
            runs[f"{p}/{s}"] += contender(args, p, s)
    summary = {
        name: {
            "samples_per_s": median_of(rs, "samples_per_s"),
            "best_samples_per_s": max(r["samples_per_s"] for r in rs),
            "all_samples_per_s": [r["samples_per_s"] for r in rs],
            "samples_per_cpu_s": median_of(rs, "samples_per_cpu_s"),
            "peak_rss_anon_mb": max(r["peak_rss_anon_mb"] for r in rs),
            "rss_anon_mb_by_phase": rs[-1]["rss_anon_mb_by_phase"],
            "order_seconds": median_of(rs, "order_seconds"),
            "rows_timed": rs[0]["rows_timed"],
            "loadavg": [r["loadavg"] for r in rs],
        }
        for name, rs in runs.items()
    }
    out = {"data": args.data, "store": args.store, "train_rows": next(iter(runs.values()))[0]["train_rows"], **summary}
    if "memory/" + args.shuffle[0] in summary:
        mem = summary["memory/" + args.shuffle[0]]["samples_per_s"]
        mmap = summary["mmap/" + args.shuffle[0]]
        out["mmap_over_memory"] = round(mmap["samples_per_s"] / mem, 3)
        out["mmap_over_memory_best"] = round(
            mmap["best_samples_per_s"] / summary["memory/" + args.shuffle[0]]["best_samples_per_s"], 3
        )
        out["mmap_over_memory_cpu"] = round(
            mmap["samples_per_cpu_s"] / summary["memory/" + args.shuffle[0]]["samples_per_cpu_s"], 3
        )
    return out


def ddp(args: argparse.Namespace) -> dict:
    """One process (batch B, every core) against 2 DDP processes on CPU (gloo, batch B/2 each,
    so the same optimiser steps; Lightning gives each rank cores / ranks threads)."""
    cfg = load(args.data, args.overrides)
    args.store = args.store or str(store_of(cfg))
    batch = cfg.data.batch_size
    one, two = [], []
    for _ in range(args.repeats):
        one += contender(args, "mmap", "global", 1)
        two.append(contender(args, "mmap", "global", 2, (f"data.batch_size={batch // 2}",)))
    per_process = [statistics.mean(r["samples_per_s"] for r in ranks) for ranks in two]
    total = [sum(r["samples_per_s"] for r in ranks) for ranks in two]
    return {
        "data": args.data,
        "one_process": {
            "batch_size": batch,
            "threads": one[0]["threads"],
            "samples_per_s": median_of(one, "samples_per_s"),
            "all_samples_per_s": [r["samples_per_s"] for r in one],
            "peak_rss_anon_mb": max(r["peak_rss_anon_mb"] for r in one),
        },
        "ddp_2_processes": {
            "batch_size_per_rank": batch // 2,
            "threads_per_rank": two[0][0]["threads"],
            "samples_per_s_per_process": round(statistics.median(per_process)),
            "samples_per_s_total": round(statistics.median(total)),
            "all_per_rank": [[r["samples_per_s"] for r in ranks] for ranks in two],
            "peak_rss_anon_mb_per_rank": max(r["peak_rss_anon_mb"] for ranks in two for r in ranks),
        },
        "total_over_one_process": round(statistics.median(total) / median_of(one, "samples_per_s"), 3),
    }


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write the Ali-CCP-shaped Parquet shards")
    g.add_argument("--rows", type=int, required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--shard-rows", type=int, default=2_000_000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=os.cpu_count())
    pr = sub.add_parser("prepare", help="time `funnel prepare` (cold, then a cache hit) and sample its RssAnon")
    pr.add_argument("--data", required=True, help="the folder of Parquet shards")
    pr.add_argument("--log-dir", default="/work/scale-data/logs")
    pr.add_argument("overrides", nargs="*", help="config overrides, key=value")
    commands = {"generate": generate, "prepare": prepare, "train": train, "ddp": ddp, "_one": train_one}
    helps = {"train": "one epoch from the mmap store vs in memory", "ddp": "2 CPU processes vs 1", "_one": "(internal)"}
    for name, text in helps.items():
        t = sub.add_parser(name, help=text)
        t.add_argument("--data", required=True, help="the folder of Parquet shards (its store must be prepared)")
        t.add_argument("--store", help="the prepared store (default: the config's cache entry for --data)")
        t.add_argument("--limit-rows", type=int, default=0, help="time only the first N rows of the epoch")
        # 1 by default: on a shared 2-core machine, 2 OpenMP threads make every op up to 20x
        # slower whenever another process takes a core (measured), which buries the comparison
        t.add_argument("--threads", type=int, default=1, help="torch threads of a 1-process run")
        t.add_argument("overrides", nargs="*", help="config overrides, key=value")
        if name == "train":
            t.add_argument("--shuffle", nargs="+", default=["global"], choices=["global", "blocks"])
            t.add_argument("--mmap-only", action="store_true", help="skip the in-memory contender")
        if name != "_one":
            t.add_argument("--repeats", type=int, default=1)
        else:
            t.add_argument("--shuffle", default="global", choices=["global", "blocks"])
            t.add_argument("--path", choices=["mmap", "memory"], default="mmap")
            t.add_argument("--devices", type=int, default=1)
    args = p.parse_args(argv)
    result = commands[args.command](args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
