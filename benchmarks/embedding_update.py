"""How the embedding tables are stored and updated, measured on the throughput workload.

The speed issue asks to consider a single fused embedding table with offsets and sparse
gradients with a matching optimiser. This script measures those choices in a bare training
loop (no Lightning; funnel's LazyAdam and lookup only), so that only the table layout and the
update differ:

- ``tables``: one ``nn.Embedding`` per field (funnel's layout), dense gradients, fused Adam;
- ``tables_sparse_adam``: the same tables with sparse gradients and ``torch.optim.SparseAdam``
  (what ``optim.sparse_embeddings: true`` used before LazyAdam);
- ``tables_lazy_adam``: the same with ``funnel.training.lazy_adam.LazyAdam`` (SparseAdam's
  arithmetic as row gathers and one ``index_add_`` per table; what
  ``optim.sparse_embeddings: true`` uses now);
- ``fused``: one table for all fields, ids shifted by per-field offsets, dense fused Adam;
- ``fused_lazy_adam``: the fused table with LazyAdam;
- ``funnel_lookup`` and ``funnel_lookup_lazy_adam``: the fused table looked up with
  ``funnel.models.embedding.lookup`` (its backward is one ``index_add_``), as funnel does.

ESMM shape of the issue: 20 fields with vocabularies 10 .. 100,000 (log-spaced), embedding
18, towers [360, 200, 80]. Each variant runs ``--steps`` steps (the first 20 untimed), the
variants interleaved ``--repeats`` times. The last line printed is one JSON object.

    python benchmarks/embedding_update.py --batch-size 1024

``--update-only ROWS`` times LazyAdam's update alone (the sum of repeated ids and the row-wise
Adam step, no model) on one table of ROWS rows with the throughput benchmark's ids (batch 4096
x 20 fields, the skew of ``benchmarks/throughput.py``), alternating batch by batch on one
shared state between ``one_pass`` (the update before it was chunked: ``unique`` + ``index_add_``
for the repeats, one gather and one write of each moment over all touched rows, the weight by
``index_add_``) and ``funnel`` (``funnel.training.lazy_adam`` as it is). The values are the same.

    python benchmarks/embedding_update.py --update-only 40M --steps 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from throughput import EMBED, N_FIELDS, mlp_tower  # benchmarks/ is on sys.path when run as a script
from torch import nn

from funnel.models.embedding import lookup
from funnel.training import lazy_adam
from funnel.training.lazy_adam import LazyAdam

FIELDS, TOWERS = N_FIELDS, [360, 200, 80]
VARIANTS = (
    "tables",
    "tables_sparse_adam",
    "tables_lazy_adam",
    "fused",
    "fused_lazy_adam",
    "funnel_lookup",
    "funnel_lookup_lazy_adam",
)


class Net(nn.Module):
    def __init__(self, vocab: np.ndarray, fused: bool, sparse: bool, funnel_lookup: bool = False):
        super().__init__()
        self.fused, self.funnel_lookup = fused, funnel_lookup
        if fused:
            self.emb = nn.Embedding(int(vocab.sum()), EMBED, sparse=sparse)
            self.register_buffer("offsets", torch.tensor(np.concatenate([[0], np.cumsum(vocab)[:-1]])))
        else:
            self.emb = nn.ModuleList(nn.Embedding(int(v), EMBED, sparse=sparse) for v in vocab)
        for p in self.emb.parameters():
            nn.init.normal_(p, std=0.05)

        self.ctr, self.cvr = mlp_tower(FIELDS * EMBED, TOWERS), mlp_tower(FIELDS * EMBED, TOWERS)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.funnel_lookup:
            flat = lookup(self.emb, ids + self.offsets).flatten(1)
        elif self.fused:
            flat = self.emb(ids + self.offsets).flatten(1)
        else:
            flat = torch.cat([e(ids[:, i]) for i, e in enumerate(self.emb)], 1)
        return self.ctr(flat).squeeze(1), self.cvr(flat).squeeze(1)


def run(variant: str, ids: torch.Tensor, labels: torch.Tensor, vocab: np.ndarray, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    sparse = variant.endswith(("sparse_adam", "lazy_adam"))
    net = Net(
        vocab, fused=variant.startswith(("fused", "funnel")), sparse=sparse, funnel_lookup=variant.startswith("funnel")
    )
    tables = list(net.emb.parameters())
    dense = [p for n, p in net.named_parameters() if not n.startswith("emb")]
    if not sparse:
        optimisers = [torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)]
    elif variant.endswith("sparse_adam"):
        optimisers = [torch.optim.Adam(dense, lr=1e-3, fused=True), torch.optim.SparseAdam(tables, lr=1e-3)]
    else:
        optimisers = [torch.optim.Adam(dense, lr=1e-3, fused=True), LazyAdam(tables, lr=1e-3)]
    order = torch.randperm(len(ids))
    start = 0.0
    for step in range(steps):
        if step == 20:
            start = time.perf_counter()
        rows = order[(step * batch) % (len(ids) - batch) :][:batch]
        ctr, cvr = net(ids[rows])
        y = labels[rows]
        p_ctr = torch.sigmoid(ctr)
        loss = nn.functional.binary_cross_entropy_with_logits(ctr, y[:, 0]) + nn.functional.binary_cross_entropy(
            p_ctr * torch.sigmoid(cvr), y[:, 1]
        )
        for opt in optimisers:
            opt.zero_grad()
        loss.backward()
        for opt in optimisers:
            opt.step()
    return (steps - 20) * batch / (time.perf_counter() - start)


def one_pass_update(w, state: dict, grad, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps=1e-8):
    """LazyAdam's update before it was chunked (the ``one_pass`` contender of ``--update-only``)."""
    ids, values = grad._indices()[0], grad._values()
    rows, inverse = torch.unique(ids, return_inverse=True)
    g = values.new_zeros((rows.numel(), values.shape[1])).index_add_(0, inverse, values)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    m = exp_avg.index_select(0, rows).lerp_(g, 1 - beta1)
    v = exp_avg_sq.index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
    exp_avg.index_copy_(0, rows, m)
    exp_avg_sq.index_copy_(0, rows, v)
    step = state["step"]
    step_size = lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
    w.index_add_(0, rows, m.div_(v.sqrt_().add_(eps)), alpha=-step_size)


def update_only(total_rows: int, steps: int, batch: int = 4096) -> dict:
    """ms per update of ``one_pass`` and ``funnel`` at ``total_rows`` rows, alternating (module docstring)."""
    from throughput import scaled_vocab

    vocab = scaled_vocab(total_rows) + 1  # + each table's unknown row
    offsets = np.concatenate([[0], np.cumsum(vocab)[:-1]])
    rows = int(vocab.sum())
    rng = np.random.default_rng(0)
    w = torch.randn(rows, EMBED)
    state = {"step": 0, "exp_avg": torch.zeros(rows, EMBED), "exp_avg_sq": torch.zeros(rows, EMBED)}
    times: dict[str, list[float]] = {"one_pass": [], "funnel": []}
    unique = []
    for i in range(steps):
        skewed = [np.minimum((v * rng.random(batch) ** 2).astype(np.int64), v - 1) for v in vocab]
        ids = torch.tensor((np.stack(skewed, 1) + offsets).reshape(-1))
        values = torch.randn(len(ids), EMBED) * 0.01
        grad = torch.sparse_coo_tensor(ids.unsqueeze(0), values, (rows, EMBED), check_invariants=False)
        for name in ("one_pass", "funnel") if i % 2 == 0 else ("funnel", "one_pass"):
            state["step"] += 1
            start = time.perf_counter()
            if name == "one_pass":
                one_pass_update(w, state, grad)
            else:
                touched, g = lazy_adam.touched_rows(grad)
                LazyAdam._update(w, touched, g, state, 1e-3, 0.9, 0.999, 1e-8)
            if i >= 2:  # after the first touches of the state
                times[name].append((time.perf_counter() - start) * 1e3)
        unique.append(int(torch.unique(ids).numel()))
    one, ours = statistics.median(times["one_pass"]), statistics.median(times["funnel"])
    return {
        "table_rows": rows,
        "unique_rows_per_batch": round(statistics.median(unique)),
        "chunk_rows": lazy_adam.CHUNK_ROWS,
        "steps": len(times["funnel"]),
        "one_pass_ms_median": round(one, 2),
        "funnel_ms_median": round(ours, 2),
        "one_pass_over_funnel": round(one / ours, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--update-only", metavar="ROWS", help="LazyAdam's update alone on ROWS rows (0.4M, 40M)")
    args = ap.parse_args()
    if args.update_only:
        from throughput import parse_rows

        print(json.dumps(update_only(parse_rows(args.update_only), args.steps)))
        return
    rng = np.random.default_rng(0)
    vocab = np.geomspace(10, 100_000, FIELDS).astype(np.int64)
    ids = torch.tensor(
        np.stack([np.minimum((v * rng.random(args.rows) ** 2).astype(np.int64), v - 1) for v in vocab], 1)
    )
    labels = torch.tensor(rng.random((args.rows, 2)) < 0.1, dtype=torch.float32)
    runs: dict[str, list[int]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for variant in VARIANTS:
            runs[variant].append(round(run(variant, ids, labels, vocab, args.batch_size, args.steps)))
        print(f"run {r + 1}: " + ", ".join(f"{v} {runs[v][-1]:,}/s" for v in VARIANTS), flush=True)
    print(
        json.dumps(
            {
                "batch_size": args.batch_size,
                "threads": torch.get_num_threads(),
                "median_samples_per_s": {v: statistics.median(runs[v]) for v in VARIANTS},
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    main()
