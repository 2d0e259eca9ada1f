"""Training throughput of funnel against a minimal hand-written PyTorch loop and torch-rechub.

The workload of the speed issue: ESMM (click -> conversion) with 20 categorical fields
(vocabularies 10 .. 100,000, log-spaced), embedding width 18, towers [360, 200, 80], Adam,
one epoch over ``--rows`` generated rows (seeded), all data in memory. The contenders:

- ``funnel``: the real training path of ``funnel fit`` with its defaults (so
  ``optim.sparse_embeddings: auto``: sparse row-wise updates above a million table rows):
  Featurizer-encoded tables, the DataModule and its BatchLoader, the LightningModule
  (training losses logged every step), a Lightning Trainer with the CSV logger and a
  validation epoch with its metrics. Only the training batches are timed (first batch start
  to last batch end). Its first run also writes the checkpoints ``funnel fit`` writes and
  reports their bytes.
- ``funnel_dense``, ``funnel_sparse``: the same with ``optim.sparse_embeddings: false`` (dense
  gradients, fused Adam on everything) and ``true`` (sparse gradients for the embedding
  tables, funnel's LazyAdam on them, Adam on the rest).
- ``plain``: the same network and loss written as a bare loop over the same tensors
  (shuffled index gathers, forward, BCE on pCTR and pCTCVR, backward, Adam step), one
  ``nn.Embedding`` per field and torch's default Adam (foreach).
- ``plain_fused``: the same loop with ``Adam(fused=True)``, the fairer contender (funnel's
  dense path uses the fused Adam too).
- ``rechub``: torch-rechub's ESMM with its own DataGenerator and MTLTrainer (one
  ``train_one_epoch``), when ``torch_rechub`` is importable (``pip install torch-rechub``
  next to torch 2.13.0); skipped otherwise.

``--vocab-scale 0.4M 4M 40M`` repeats everything for tables of that many rows in all: the 20
vocabularies scaled to the total (the same id skew) and hashed into that many buckets. A
contender whose tables would not fit in the memory available is skipped and said so.

Every contender runs ``--repeats`` times, interleaved (one round runs each once); the medians
are reported, with each contender's peak resident memory (sampled while it runs). One JSON
line per scale is printed, and the last line printed is one JSON object
(funnel_samples_per_s, plain_samples_per_s, plain_fused_samples_per_s, ratio_vs_plain,
ratio_vs_plain_fused, rechub_samples_per_s, ratio_vs_rechub, largest_vs_smallest_tables,
peak_rss_mb, "scales": [per scale: table_rows, samples_per_s, peak_rss_mb, best_ckpt_bytes,
last_ckpt_bytes, ...], rows, batch_size, ...).

    python benchmarks/throughput.py --rows 1000000 --batch-size 4096 --repeats 3
    python benchmarks/throughput.py --vocab-scale 0.4M 4M 40M --limit-batches 25 --skip rechub
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import resource
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
from torch import nn

N_FIELDS = 20
EMBED = 18


BASE_VOCAB = np.geomspace(10, 100_000, N_FIELDS).astype(np.int64)  # 260,288 ids in all


def scaled_vocab(total_rows: int | None) -> np.ndarray:
    """The 20 vocabularies scaled so that their tables (each vocabulary + 1 unknown row) hold
    ``total_rows`` rows in all; None: the benchmark's own (log-spaced 10 .. 100,000)."""
    if total_rows is None:
        return BASE_VOCAB
    return np.maximum((BASE_VOCAB * ((total_rows - N_FIELDS) / BASE_VOCAB.sum())).astype(np.int64), 2)


def parse_rows(text: str) -> int:
    """'0.4M', '40M', '400k' or '400000' -> rows."""
    factor = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    return round(float(text[:-1] if factor > 1 else text) * factor)


def make_frame(rows: int, seed: int = 0, vocab: np.ndarray = BASE_VOCAB) -> pd.DataFrame:
    """20 skewed categorical id columns and click/conversion labels from per-id effects (the
    same skew at every vocabulary size: id = vocab * u², u uniform)."""
    rng = np.random.default_rng(seed)
    cols, click_logit, conv_logit = {}, np.full(rows, -2.0), np.full(rows, -1.5)
    for f, v in enumerate(vocab):
        ids = np.minimum((v * rng.random(rows) ** 2).astype(np.int64), v - 1)  # popular low ids
        cols[f"c{f}"] = ids
        click_logit += rng.normal(0, 0.3, v)[ids]
        conv_logit += rng.normal(0, 0.3, v)[ids]
    click = rng.random(rows) < 1 / (1 + np.exp(-click_logit))
    conv = click & (rng.random(rows) < 1 / (1 + np.exp(-conv_logit)))
    return pd.DataFrame(cols | {"click": click.astype(np.int64), "conversion": conv.astype(np.int64)})


def funnel_config(
    towers: list[int], batch_size: int, lr: float, sparse: bool | str = "auto", buckets: np.ndarray | None = None
):
    """``buckets``: hash each field into this many rows (the tables then have that size whatever
    ids the data holds), else a vocabulary fitted on the data."""
    from funnel.spec import config_from_dict

    def feature(f: int) -> dict:
        return {"name": f"c{f}", "kind": "categorical"} | ({} if buckets is None else {"hash_buckets": int(buckets[f])})

    return config_from_dict(
        {
            "data": {"train": "in-memory", "batch_size": batch_size, "eval_batch_size": 65536},
            "features": [feature(f) for f in range(N_FIELDS)],
            "funnel": {
                "model": "esmm",
                "embed_dim": EMBED,
                "tower": {"type": "mlp", "hidden": towers},
                "stages": [{"name": "click"}, {"name": "conversion", "after": "click"}],
            },
            "optim": {"name": "adam", "lr": lr, "sparse_embeddings": sparse},
        }
    )


WARMUP = 0  # training batches left out of the timing (--warmup-batches)


class EpochTimer(pl.Callback):
    """Wall time from the start of training batch WARMUP (the first, by default) to the last
    one's end."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == WARMUP:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.end = time.perf_counter()


def run_funnel(
    cfg,
    graph,
    featurizer,
    tables,
    seed: int,
    limit: int | None = None,
    precision: str = "32-true",
    accelerator: str = "cpu",
    checkpoints: dict | None = None,
) -> float:
    """Samples/s of the timed training batches. ``checkpoints``: a dict to fill with the bytes of
    the checkpoints the run writes (best and last, as ``funnel fit`` keeps them), else none."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from funnel.data.datamodule import FunnelDataModule
    from funnel.models.registry import create_model
    from funnel.training.module import FunnelLightningModule

    pl.seed_everything(seed, verbose=False)
    dm = FunnelDataModule(cfg, graph, featurizer)
    dm.tables = tables
    module = FunnelLightningModule(create_model(graph, cfg.funnel, featurizer.layout()), cfg.optim)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory(dir=CKPT_DIR) as tmp:
        callbacks: list[pl.Callback] = [timer]
        if checkpoints is not None:
            monitor = f"val/auc/{graph.names[-1]}"
            saver = ModelCheckpoint(dirpath=tmp, monitor=monitor, mode="max", save_top_k=1, save_last=True)
            callbacks.append(saver)
        trainer = pl.Trainer(
            max_epochs=1,
            logger=CSVLogger(tmp, name="logs"),
            callbacks=callbacks,
            enable_checkpointing=checkpoints is not None,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_train_batches=limit or 1.0,
            precision=precision,
            accelerator=accelerator,
            devices=1,
        )
        trainer.fit(module, datamodule=dm)
        if checkpoints is not None:
            best, last = Path(saver.best_model_path), Path(saver.last_model_path)
            # funnel fit keeps best.ckpt, and last.ckpt as a hard link to it when it holds the same
            # step (one epoch here): the bytes on disk are then one file's
            checkpoints.update(
                best_ckpt_bytes=best.stat().st_size,
                last_ckpt_bytes=last.stat().st_size,
                sparse=module.sparse,
            )
    rows = min(len(tables["train"]), limit * cfg.data.batch_size) if limit else len(tables["train"])
    return (rows - WARMUP * cfg.data.batch_size) / (timer.end - timer.start)


def mlp_tower(width: int, hidden: list[int]) -> nn.Sequential:
    """Linear + ReLU per hidden size, then a Linear to one logit: the towers of the hand loops."""
    layers = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 1))


class PlainESMM(nn.Module):
    def __init__(self, vocab: list[int], towers: list[int]):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(v, EMBED) for v in vocab)
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.05)

        self.ctr, self.cvr = mlp_tower(EMBED * len(vocab), towers), mlp_tower(EMBED * len(vocab), towers)

    def forward(self, cat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([t(cat[:, f]) for f, t in enumerate(self.tables)], 1)
        return self.ctr(x).squeeze(-1), self.cvr(x).squeeze(-1)


def run_plain(
    cat: torch.Tensor,
    labels: torch.Tensor,
    vocab: list[int],
    towers: list[int],
    batch_size: int,
    lr: float,
    seed: int,
    limit: int | None = None,
    precision: str = "32-true",
    device: str = "cpu",
    fused: bool = False,
) -> float:
    """``fused``: Adam(fused=True), one kernel over all parameters (what funnel's dense path uses)."""
    torch.manual_seed(seed)
    model = PlainESMM(vocab, towers).to(device)
    cat, labels = cat.to(device), labels.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=fused or None)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    n = min(len(cat), limit * batch_size) if limit else len(cat)
    order = torch.randperm(len(cat), device=device)[:n]
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        if i == WARMUP * batch_size:
            start = time.perf_counter()
        idx = order[i : i + batch_size]
        x, y = cat[idx], labels[idx]
        with autocast:
            ctr_logit, cvr_logit = model(x)
        ctr_logit, cvr_logit = ctr_logit.float(), cvr_logit.float()
        p_ctr, p_ctcvr = torch.sigmoid(ctr_logit), torch.sigmoid(ctr_logit) * torch.sigmoid(cvr_logit)
        loss = nn.functional.binary_cross_entropy(p_ctr, y[:, 0]) + nn.functional.binary_cross_entropy(
            p_ctcvr.clamp(1e-7, 1 - 1e-7), y[:, 1]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (n - WARMUP * batch_size) / (time.perf_counter() - start)


def run_rechub(
    df: pd.DataFrame, vocab: list[int], towers: list[int], batch_size: int, lr: float, seed: int
) -> float | None:
    try:
        from torch_rechub.basic.features import SparseFeature
        from torch_rechub.models.multi_task import ESMM
        from torch_rechub.trainers import MTLTrainer
        from torch_rechub.utils.data import DataGenerator
    except ImportError:
        return None
    torch.manual_seed(seed)
    feats = [SparseFeature(f"c{f}", vocab_size=v, embed_dim=EMBED) for f, v in enumerate(vocab)]
    x = {f"c{f}": df[f"c{f}"].to_numpy() for f in range(N_FIELDS)}
    click, conv = df["click"].to_numpy(), df["conversion"].to_numpy()
    y = np.stack([conv, click, click * conv], 1)  # rechub's ESMM order: cvr, ctr, ctcvr
    train, _, _ = DataGenerator(x, y).generate_dataloader(x_val=x, y_val=y, x_test=x, y_test=y, batch_size=batch_size)
    params = {"dims": towers, "activation": "relu", "dropout": 0.0}
    model = ESMM(feats[:10], feats[10:], cvr_params=params, ctr_params=params)
    trainer = MTLTrainer(
        model,
        task_types=["classification"] * 3,
        optimizer_params={"lr": lr, "weight_decay": 0.0},
        n_epoch=1,
        device="cpu",
    )
    start = time.perf_counter()
    trainer.train_one_epoch(train)
    return len(df) / (time.perf_counter() - start)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssPeak:
    """The peak resident memory while the block runs (sampled every 20 ms from /proc): the
    process's peak since start (ru_maxrss) cannot tell the contenders of one run apart."""

    def __enter__(self) -> RssPeak:
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:  # not Linux: the process peak
        return peak_rss_mb()


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), else unlimited."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 2**62


def table_bytes(rows: int, contender: str) -> int:
    """What a contender's tables take beyond the data: weights and Adam's two moments, and a dense
    gradient of every row unless the updates are sparse (funnel's default above a million rows)."""
    sparse = contender == "funnel_sparse" or (contender == "funnel" and rows > 1_000_000)
    return rows * EMBED * 4 * (3 if sparse else 4)


CONTENDERS = ("funnel", "funnel_dense", "funnel_sparse", "plain", "plain_fused", "rechub")
CKPT_DIR: str | None = None  # where the funnel contender writes its checkpoints (--ckpt-dir)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def run_scale(args, towers: list[int], skip: set[str], total_rows: int | None) -> dict:
    """Every contender ``--repeats`` times, interleaved (one round = each contender once), on
    tables of ``total_rows`` rows in all (None: the benchmark's own vocabularies)."""
    from funnel.data.featurizer import Featurizer
    from funnel.runs import build_graph

    vocab_np = scaled_vocab(total_rows)
    buckets = None if total_rows is None else vocab_np
    t0 = time.perf_counter()
    df = make_frame(args.rows, vocab=vocab_np)
    gen_s = time.perf_counter() - t0
    configs = {
        "funnel": funnel_config(towers, args.batch_size, args.lr, "auto", buckets),
        "funnel_dense": funnel_config(towers, args.batch_size, args.lr, False, buckets),
        "funnel_sparse": funnel_config(towers, args.batch_size, args.lr, True, buckets),
    }
    cfg = configs["funnel"]
    graph = build_graph(cfg)
    t0 = time.perf_counter()
    n_valid = max(args.rows // 20, 1)
    featurizer = Featurizer(cfg, graph).fit(df.iloc[n_valid:])
    tables = {
        "train": featurizer.encode(df.iloc[n_valid:], "train"),
        "valid": featurizer.encode(df.iloc[:n_valid], "valid"),
    }
    encode_s = time.perf_counter() - t0
    rss_data = _rss_mb()
    vocab = [t.rows for t in featurizer.layout().tables]
    train = tables["train"]
    print(
        f"{args.rows:,} rows generated in {gen_s:.1f}s, encoded in {encode_s:.1f}s; train {len(train):,} rows, "
        f"tables {sum(vocab):,} rows, batch {args.batch_size}, towers {towers}, {torch.get_num_threads()} threads",
        flush=True,
    )
    results: dict[str, list[float]] = {k: [] for k in CONTENDERS}
    rss: dict[str, float] = {}
    ckpt: dict = {}
    skipped: dict[str, float] = {}  # contender -> GiB its tables would need
    labels = train.labels.float()
    for rep in range(args.repeats):
        for name in CONTENDERS:
            if name in skip or (name == "funnel_sparse" and args.accelerator != "cpu"):
                continue
            if name == "rechub" and (args.limit_batches or args.accelerator != "cpu" or args.precision != "32-true"):
                continue
            need = table_bytes(sum(vocab), name)
            if need + 2 * 2**30 > available_bytes():  # 2 GiB for the step's activations and the allocator
                print(
                    f"{name}: skipped, its tables need about {need / 2**30:.1f} GiB, "
                    f"{available_bytes() / 2**30:.1f} GiB available",
                    flush=True,
                )
                skipped[name] = round(need / 2**30, 1)
                continue
            gc.collect()  # the last contender's tables, before this one allocates its own
            with RssPeak() as peak:
                if name.startswith("funnel"):
                    keep = ckpt if name == "funnel" and rep == 0 and not args.no_checkpoints else None
                    r = run_funnel(
                        configs[name],
                        graph,
                        featurizer,
                        tables,
                        rep,
                        args.limit_batches,
                        args.precision,
                        args.accelerator,
                        checkpoints=keep,
                    )
                elif name.startswith("plain"):
                    r = run_plain(
                        train.cat,
                        labels,
                        vocab,
                        towers,
                        args.batch_size,
                        args.lr,
                        rep,
                        args.limit_batches,
                        args.precision,
                        args.accelerator,
                        fused=name == "plain_fused",
                    )
                else:
                    raw_vocab = [int(df[f"c{f}"].max()) + 1 for f in range(N_FIELDS)]  # rechub reads the raw ids
                    frame = df.iloc[n_valid:].reset_index(drop=True)
                    r = run_rechub(frame, raw_vocab, towers, args.batch_size, args.lr, rep)
            if r is not None:
                results[name].append(r)
                rss[name] = round(max(rss.get(name, 0.0), peak.peak))
        print(f"run {rep + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in results.items() if v), flush=True)
    med = {k: (round(statistics.median(v)) if v else None) for k, v in results.items()}
    return {
        "table_rows": sum(vocab),
        "samples_per_s": med,
        "peak_rss_mb": rss,
        "rss_after_encoding_mb": round(rss_data),
        "skipped_for_memory_gib": skipped,
        "default_path_sparse": ckpt.get("sparse"),
        "best_ckpt_bytes": ckpt.get("best_ckpt_bytes"),
        "last_ckpt_bytes": ckpt.get("last_ckpt_bytes"),
        "encoded_train_mb": round(train.nbytes() / 2**20, 1),
        "encode_s": round(encode_s, 2),
        "runs": {k: [round(x) for x in v] for k, v in results.items() if v},
    }


def main() -> None:
    global CKPT_DIR, WARMUP
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--towers", default="360,200,80", help="hidden sizes of each tower, comma-separated")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help=f"comma-separated contenders to skip: {','.join(CONTENDERS)}")
    ap.add_argument(
        "--vocab-scale",
        nargs="+",
        default=None,
        metavar="ROWS",
        help="embedding rows in all (e.g. 0.4M 4M 40M): the 20 vocabularies scaled to each total, hashed "
        "into that many buckets; one set of results per total",
    )
    ap.add_argument(
        "--limit-batches",
        type=int,
        default=None,
        help="time only this many training batches (for large tables); rechub is skipped",
    )
    ap.add_argument(
        "--precision",
        default="32-true",
        choices=["32-true", "bf16-mixed"],
        help="bf16-mixed: bfloat16 autocast for funnel (Lightning precision) and the plain loop",
    )
    ap.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU (rechub skipped)")
    ap.add_argument("--no-checkpoints", action="store_true", help="do not write (and size) funnel's checkpoints")
    ap.add_argument("--ckpt-dir", default=None, help="folder for the checkpoints' temporary run dirs (default: /tmp)")
    ap.add_argument(
        "--warmup-batches",
        type=int,
        default=0,
        help="leave the first N training batches out of the timing (a large table's first step allocates "
        "its optimiser state: gigabytes at 40M rows); rechub always times its whole epoch",
    )
    args = ap.parse_args()
    CKPT_DIR, WARMUP = args.ckpt_dir, args.warmup_batches
    towers = [int(t) for t in args.towers.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    totals = [parse_rows(t) for t in args.vocab_scale] if args.vocab_scale else [None]
    scales = []
    for total in totals:
        scales.append(run_scale(args, towers, skip, total))
        print(json.dumps({"scale": scales[-1]}), flush=True)
    first, med = scales[0], scales[0]["samples_per_s"]
    out = {
        "funnel_samples_per_s": med["funnel"],
        "plain_samples_per_s": med["plain"],
        "plain_fused_samples_per_s": med["plain_fused"],
        "ratio_vs_plain": _ratio(med["funnel"], med["plain"]),
        "ratio_vs_plain_fused": _ratio(med["funnel"], med["plain_fused"]),
        "rechub_samples_per_s": med["rechub"],
        "ratio_vs_rechub": _ratio(med["funnel"], med["rechub"]),
        "funnel_dense_samples_per_s": med["funnel_dense"],
        "funnel_sparse_samples_per_s": med["funnel_sparse"],
        "sparse_ratio_vs_plain": _ratio(med["funnel_sparse"], med["plain"]),
        "sparse_ratio_vs_rechub": _ratio(med["funnel_sparse"], med["rechub"]),
        # the default path at the largest tables against the smallest (the target: >= 0.8)
        "largest_vs_smallest_tables": _ratio(scales[-1]["samples_per_s"]["funnel"], med["funnel"]),
        "peak_rss_mb": round(peak_rss_mb()),
        "rss_after_encoding_mb": first["rss_after_encoding_mb"],
        "encoded_train_mb": first["encoded_train_mb"],
        "encode_s": first["encode_s"],
        "rows": args.rows,
        "batch_size": args.batch_size,
        "limit_batches": args.limit_batches,
        "warmup_batches": args.warmup_batches,
        "precision": args.precision,
        "accelerator": args.accelerator,
        "towers": towers,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "scales": scales,
        "runs": first["runs"],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
