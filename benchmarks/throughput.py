"""Training throughput of funnel against a minimal hand-written PyTorch loop and torch-rechub.

The workload of the speed issue: ESMM (click -> conversion) with 20 categorical fields
(vocabularies 10 .. 100,000, log-spaced), embedding width 18, towers [360, 200, 80], Adam,
one epoch over ``--rows`` generated rows (seeded), all data in memory. Three contenders:

- ``funnel``: the real training path of ``funnel fit``: Featurizer-encoded tables, the
  DataModule and its BatchLoader, the LightningModule (training losses logged every step),
  a Lightning Trainer with the CSV logger and a validation epoch with its metrics.
  Only the training batches are timed (first batch start to last batch end).
- ``plain``: the same network and loss written as a bare loop over the same tensors
  (shuffled index gathers, forward, BCE on pCTR and pCTCVR, backward, Adam step).
- ``funnel_sparse``: the same with ``optim.sparse_embeddings: true`` (sparse gradients for
  the embedding tables, funnel's LazyAdam on them, Adam on the rest).
- ``rechub``: torch-rechub's ESMM with its own DataGenerator and MTLTrainer (one
  ``train_one_epoch``), when ``torch_rechub`` is importable (``pip install torch-rechub``
  next to torch 2.13.0); skipped otherwise.

Every contender runs ``--repeats`` times; the medians are reported. The last line printed
is one JSON object (funnel_samples_per_s, plain_samples_per_s, ratio_vs_plain,
rechub_samples_per_s, ratio_vs_rechub, peak_rss_mb, rows, batch_size, ...).

    python benchmarks/throughput.py --rows 1000000 --batch-size 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import tempfile
import time
import warnings

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch import nn

N_FIELDS = 20
EMBED = 18


def make_frame(rows: int, seed: int = 0) -> pd.DataFrame:
    """20 skewed categorical id columns and click/conversion labels from per-id effects."""
    rng = np.random.default_rng(seed)
    vocab = np.geomspace(10, 100_000, N_FIELDS).astype(np.int64)
    cols, click_logit, conv_logit = {}, np.full(rows, -2.0), np.full(rows, -1.5)
    for f, v in enumerate(vocab):
        ids = np.minimum((v * rng.random(rows) ** 2).astype(np.int64), v - 1)  # popular low ids
        cols[f"c{f}"] = ids
        click_logit += rng.normal(0, 0.3, v)[ids]
        conv_logit += rng.normal(0, 0.3, v)[ids]
    click = rng.random(rows) < 1 / (1 + np.exp(-click_logit))
    conv = click & (rng.random(rows) < 1 / (1 + np.exp(-conv_logit)))
    return pd.DataFrame(cols | {"click": click.astype(np.int64), "conversion": conv.astype(np.int64)})


def funnel_config(towers: list[int], batch_size: int, lr: float, sparse: bool = False):
    from funnel.spec import config_from_dict

    return config_from_dict(
        {
            "data": {"train": "in-memory", "batch_size": batch_size, "eval_batch_size": 65536},
            "features": [{"name": f"c{f}", "kind": "categorical"} for f in range(N_FIELDS)],
            "funnel": {
                "model": "esmm",
                "embed_dim": EMBED,
                "tower": {"type": "mlp", "hidden": towers},
                "stages": [{"name": "click"}, {"name": "conversion", "after": "click"}],
            },
            "optim": {"name": "adam", "lr": lr, "sparse_embeddings": sparse},
        }
    )


class EpochTimer(pl.Callback):
    """Wall time from the first training batch's start to the last one's end."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
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
) -> float:
    from pytorch_lightning.loggers import CSVLogger

    from funnel.data.datamodule import FunnelDataModule
    from funnel.models.registry import create_model
    from funnel.training.module import FunnelLightningModule

    pl.seed_everything(seed, verbose=False)
    dm = FunnelDataModule(cfg, graph, featurizer)
    dm.tables = tables
    module = FunnelLightningModule(create_model(graph, cfg.funnel, featurizer.layout()), cfg.optim)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_epochs=1,
            logger=CSVLogger(tmp, name="logs"),
            callbacks=[timer],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_train_batches=limit or 1.0,
            precision=precision,
            accelerator=accelerator,
            devices=1,
        )
        trainer.fit(module, datamodule=dm)
    rows = min(len(tables["train"]), limit * cfg.data.batch_size) if limit else len(tables["train"])
    return rows / (timer.end - timer.start)


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
) -> float:
    torch.manual_seed(seed)
    model = PlainESMM(vocab, towers).to(device)
    cat, labels = cat.to(device), labels.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    n = min(len(cat), limit * batch_size) if limit else len(cat)
    order = torch.randperm(len(cat), device=device)[:n]
    start = time.perf_counter()
    for i in range(0, n, batch_size):
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
    return n / (time.perf_counter() - start)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--towers", default="360,200,80", help="hidden sizes of each tower, comma-separated")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated contenders to skip: funnel,funnel_sparse,plain,rechub")
    ap.add_argument(
        "--limit-batches",
        type=int,
        default=None,
        help="time only this many training batches (for 10M-row memory runs); rechub is skipped",
    )
    ap.add_argument(
        "--precision",
        default="32-true",
        choices=["32-true", "bf16-mixed"],
        help="bf16-mixed: bfloat16 autocast for funnel (Lightning precision) and the plain loop",
    )
    ap.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU (rechub skipped)")
    args = ap.parse_args()
    towers = [int(t) for t in args.towers.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    from funnel.data.featurizer import Featurizer
    from funnel.runs import build_graph

    t0 = time.perf_counter()
    df = make_frame(args.rows)
    gen_s = time.perf_counter() - t0
    cfg = funnel_config(towers, args.batch_size, args.lr)
    graph = build_graph(cfg)
    t0 = time.perf_counter()
    n_valid = max(args.rows // 20, 1)
    featurizer = Featurizer(cfg, graph).fit(df.iloc[n_valid:])
    tables = {
        "train": featurizer.encode(df.iloc[n_valid:], "train"),
        "valid": featurizer.encode(df.iloc[:n_valid], "valid"),
    }
    encode_s = time.perf_counter() - t0
    rss_data = peak_rss_mb()
    vocab = [t.rows for t in featurizer.layout().tables]
    train = tables["train"]
    print(
        f"{args.rows:,} rows generated in {gen_s:.1f}s, encoded in {encode_s:.1f}s; train {len(train):,} rows, "
        f"batch {args.batch_size}, towers {towers}, {torch.get_num_threads()} threads",
        flush=True,
    )

    results: dict[str, list[float]] = {"funnel": [], "funnel_sparse": [], "plain": [], "rechub": []}
    sparse_cfg = funnel_config(towers, args.batch_size, args.lr, sparse=True)
    for rep in range(args.repeats):
        if "funnel" not in skip:
            results["funnel"].append(
                run_funnel(cfg, graph, featurizer, tables, rep, args.limit_batches, args.precision, args.accelerator)
            )
        if "funnel_sparse" not in skip and args.accelerator == "cpu":
            results["funnel_sparse"].append(
                run_funnel(sparse_cfg, graph, featurizer, tables, rep, args.limit_batches, args.precision)
            )
        if "plain" not in skip:
            results["plain"].append(
                run_plain(
                    train.cat,
                    train.labels.float(),
                    vocab,
                    towers,
                    args.batch_size,
                    args.lr,
                    rep,
                    args.limit_batches,
                    args.precision,
                    args.accelerator,
                )
            )
        if (
            "rechub" not in skip
            and not args.limit_batches
            and args.accelerator == "cpu"
            and args.precision == "32-true"
        ):
            raw_vocab = [int(df[f"c{f}"].max()) + 1 for f in range(N_FIELDS)]  # rechub reads the raw ids
            r = run_rechub(df.iloc[n_valid:].reset_index(drop=True), raw_vocab, towers, args.batch_size, args.lr, rep)
            if r is not None:
                results["rechub"].append(r)
        print(f"run {rep + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in results.items() if v), flush=True)

    med = {k: (round(statistics.median(v)) if v else None) for k, v in results.items()}
    out = {
        "funnel_samples_per_s": med["funnel"],
        "plain_samples_per_s": med["plain"],
        "ratio_vs_plain": round(med["funnel"] / med["plain"], 3) if med["funnel"] and med["plain"] else None,
        "rechub_samples_per_s": med["rechub"],
        "ratio_vs_rechub": round(med["funnel"] / med["rechub"], 3) if med["funnel"] and med["rechub"] else None,
        "funnel_sparse_samples_per_s": med["funnel_sparse"],
        "sparse_ratio_vs_plain": round(med["funnel_sparse"] / med["plain"], 3)
        if med["funnel_sparse"] and med["plain"]
        else None,
        "sparse_ratio_vs_rechub": round(med["funnel_sparse"] / med["rechub"], 3)
        if med["funnel_sparse"] and med["rechub"]
        else None,
        "peak_rss_mb": round(peak_rss_mb()),
        "rss_after_encoding_mb": round(rss_data),
        "encoded_train_mb": round(train.nbytes() / 2**20, 1),
        "encode_s": round(encode_s, 2),
        "rows": args.rows,
        "batch_size": args.batch_size,
        "limit_batches": args.limit_batches,
        "precision": args.precision,
        "accelerator": args.accelerator,
        "towers": towers,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "runs": {k: [round(x) for x in v] for k, v in results.items()},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
