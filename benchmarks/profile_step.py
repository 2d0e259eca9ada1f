"""Where a training step's time goes: funnel's step at batch 4096 on the throughput benchmark's model.

The bare step (forward, loss, backward, the optimisers funnel builds) runs under torch.profiler;
each operator's own time is given to one part by the step phase it ran in and the operator or
autograd node above it:

- ``embedding fwd``: the tables' lookup (``index_select``, the ids' offsets);
- ``embedding bwd``: the lookup's backward (the dense zero-fill + ``index_add_``, or the sparse
  gradient's construction);
- ``tower GEMM fwd`` / ``tower GEMM bwd``: ``addmm``/``mm`` of the towers and their backward;
- ``other fwd`` / ``other bwd``: activations, concatenation, heads and their backward;
- ``loss``: the objective (BCE terms, weighting) forward;
- ``optimiser``: every ``Optimizer.step`` (dense fused Adam over every parameter, or LazyAdam on
  the touched table rows plus fused Adam on the rest), ``zero_grad`` included.

Lightning's per-step cost (the batch loader, ``training_step``'s logging, hooks, callbacks) is the
Lightning path's step time (``benchmarks/throughput.py``'s timing of ``funnel fit``'s path, no
profiler) less the bare step's time, both measured here in alternating rounds.

    python benchmarks/profile_step.py --vocab-scale 0.4M 40M --precision 32-true bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput as tp  # noqa: E402  (the benchmark's data, config and Lightning timing)

PARTS = (
    "embedding fwd",
    "embedding bwd",
    "tower GEMM fwd",
    "tower GEMM bwd",
    "other fwd",
    "other bwd",
    "loss",
    "optimiser",
)
GEMM = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear")


def build(total_rows: int | None, rows: int, batch_size: int, sparse):
    from funnel.data.featurizer import Featurizer
    from funnel.data.loader import BatchLoader
    from funnel.models.registry import create_model
    from funnel.runs import build_graph
    from funnel.training.module import FunnelLightningModule

    vocab = tp.scaled_vocab(total_rows)
    cfg = tp.funnel_config([360, 200, 80], batch_size, 1e-3, sparse, None if total_rows is None else vocab)
    graph = build_graph(cfg)
    df = tp.make_frame(rows, vocab=vocab)
    featurizer = Featurizer(cfg, graph).fit(df)
    n_valid = max(rows // 20, 1)
    tables = {
        "train": featurizer.encode(df.iloc[n_valid:], "train"),
        "valid": featurizer.encode(df.iloc[:n_valid], "valid"),
    }
    model = create_model(graph, cfg.funnel, featurizer.layout())
    module = FunnelLightningModule(model, cfg.optim)
    optimisers = module.configure_optimizers()
    optimisers = optimisers if isinstance(optimisers, list) else [optimisers]
    batches = list(BatchLoader(tables["train"], batch_size, shuffle=True, seed=0))
    return cfg, graph, featurizer, tables, module, optimisers, batches


def bare_step(module, optimisers, batch, precision: str) -> None:
    from funnel.data.table import LABELS
    from funnel.models.registry import model_loss

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    for opt in optimisers:
        opt.zero_grad(set_to_none=True)
    with autocast:
        with record_function("funnel:forward"):
            out = module.model(batch)
        with record_function("funnel:loss"):
            loss = model_loss(module.model, out, batch[LABELS]).total
    with record_function("funnel:backward"):
        loss.backward()
    with record_function("funnel:optimiser"):
        for opt in optimisers:
            opt.step()


def part_of(event) -> str:
    """The part an operator's own time belongs to, from the events above it."""
    names, e = [], event
    while e is not None:
        names.append(e.name)
        e = e.cpu_parent
    if any(n.startswith(("Optimizer.", "funnel:optimiser")) for n in names):
        return "optimiser"
    if "funnel:loss" in names:
        return "loss"
    if "funnel:forward" in names:
        if any(n in GEMM for n in names):
            return "tower GEMM fwd"
        if any(n in ("aten::index_select", "aten::embedding") for n in names) or "_Lookup" in " ".join(names):
            return "embedding fwd"
        return "other fwd"
    if "funnel:backward" in names:
        nodes = " ".join(names)
        if "_LookupBackward" in nodes or "EmbeddingBackward" in nodes or "IndexSelectBackward" in nodes:
            return "embedding bwd"
        if any(k in nodes for k in ("AddmmBackward", "MmBackward", "LinearBackward")) and any(n in GEMM for n in names):
            return "tower GEMM bwd"
        return "other bwd"
    return "optimiser" if event.name.startswith("aten::zero") else "other bwd"


def profile_parts(module, optimisers, batches, precision: str, steps: int) -> tuple[dict[str, float], float]:
    """Each part's ms per step under the profiler, and the bare step's ms without it."""
    for b in batches[:3]:  # warm-up: lazy state, allocator
        bare_step(module, optimisers, b, precision)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[3 : 3 + steps]:
            bare_step(module, optimisers, b, precision)
    ms: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.name.startswith("funnel:") or e.name.startswith("Optimizer."):
            continue  # regions: their operators carry the time
        ms[part_of(e)] += e.self_cpu_time_total / 1e3 / steps
    times = []
    for b in batches[3 + steps : 3 + 2 * steps]:
        t0 = time.perf_counter()
        bare_step(module, optimisers, b, precision)
        times.append((time.perf_counter() - t0) * 1e3)
    return dict(ms), statistics.median(times)


def tower_flops(width: int = 360, hidden: tuple[int, ...] = (360, 200, 80), towers: int = 2) -> int:
    """FLOPs per sample of the towers' GEMMs, forward and backward (a GEMM's backward is two
    GEMMs of its size: the input's gradient, which the tables need, and the weight's)."""
    dims = [width, *hidden, 1]
    return 3 * towers * sum(2 * a * b for a, b in zip(dims[:-1], dims[1:], strict=True))


def matmul_limit(batch: int, dtype: torch.dtype, repeats: int = 20) -> float:
    """GFLOP/s of the towers' GEMMs alone at ``batch`` rows: for each layer (B x in) @ (in x out)
    and its two backward GEMMs, on preallocated tensors (nothing else of a step)."""
    dims = [360, 360, 200, 80, 1]
    shapes = list(zip(dims[:-1], dims[1:], strict=True))
    x = {a: torch.randn(batch, a, dtype=dtype) for a, _ in shapes}
    w = {(a, b): torch.randn(a, b, dtype=dtype) for a, b in shapes}
    g = {b: torch.randn(batch, b, dtype=dtype) for _, b in shapes}

    def once() -> None:
        for _ in range(2):  # two towers
            for a, b in shapes:
                torch.mm(x[a], w[a, b])  # forward
                torch.mm(g[b], w[a, b].t())  # the input's gradient
                torch.mm(x[a].t(), g[b])  # the weight's gradient

    once()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return tower_flops() * batch / statistics.median(times) / 1e9


def compare_scales(args) -> None:
    """Bare steps of the default path at every ``--vocab-scale``, alternating step by step in one
    process (a loaded machine's drift falls on every scale alike); the median step per scale and
    its samples/s against the first scale's."""
    built = {}
    for scale in args.vocab_scale:
        sparse = {"true": True, "false": False}.get(args.sparse[0], "auto")
        _, _, featurizer, _, module, optimisers, batches = build(
            tp.parse_rows(scale), args.rows, args.batch_size, sparse
        )
        built[scale] = (sum(t.rows for t in featurizer.layout().tables), module, optimisers, batches)
    times: dict[str, list[float]] = {s: [] for s in built}
    steps = min(len(b[3]) for b in built.values())
    for i in range(steps):
        order = list(built) if i % 2 == 0 else list(reversed(built))
        for scale in order:
            _, module, optimisers, batches = built[scale]
            t0 = time.perf_counter()
            bare_step(module, optimisers, batches[i], args.precision[0])
            if i >= 2:  # after the warm-up steps
                times[scale].append(time.perf_counter() - t0)
    first = statistics.median(times[args.vocab_scale[0]])
    for scale, (rows, module, _, _) in built.items():
        step = statistics.median(times[scale])
        row = {
            "scale": scale,
            "table_rows": rows,
            "sparse": module.sparse,
            "precision": args.precision[0],
            "steps": len(times[scale]),
            "step_ms_median": round(step * 1e3, 1),
            "samples_per_s": round(args.batch_size / step),
            "vs_first_scale": round(first / step, 3),
        }
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-scale", nargs="+", default=["0.4M"], metavar="ROWS")
    ap.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"], choices=["32-true", "bf16-mixed"])
    ap.add_argument("--sparse", nargs="+", default=["auto"], help="optim.sparse_embeddings values: auto true false")
    ap.add_argument("--rows", type=int, default=200_000, help="generated rows (batches to step through)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10, help="profiled steps (and as many timed without the profiler)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of bare and Lightning timing")
    ap.add_argument("--matmul", action="store_true", help="only the GEMM limit at the tower shapes, float32 and bf16")
    ap.add_argument(
        "--compare-scales",
        action="store_true",
        help="only bare steps of every --vocab-scale alternating (first --sparse and --precision value)",
    )
    args = ap.parse_args()
    if args.compare_scales:
        compare_scales(args)
        return
    if args.matmul:
        for rnd in range(args.rounds):  # alternating rounds
            for dtype in (torch.float32, torch.bfloat16):
                gflops = matmul_limit(args.batch_size, dtype)
                row = {
                    "round": rnd,
                    "dtype": str(dtype).split(".")[1],
                    "gemm_gflop_per_s": round(gflops, 1),
                    "flop_per_sample": tower_flops(),
                    "samples_per_s_limit": round(gflops * 1e9 / tower_flops()),
                    "threads": torch.get_num_threads(),
                }
                print(json.dumps(row), flush=True)
        return
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    results = []
    for scale in args.vocab_scale:
        for sparse_text in args.sparse:
            sparse = {"true": True, "false": False}.get(sparse_text, "auto")
            cfg, graph, featurizer, tables, module, optimisers, batches = build(
                tp.parse_rows(scale), args.rows, args.batch_size, sparse
            )
            for precision in args.precision:
                bare, lightning, parts = [], [], None
                for rnd in range(args.rounds):
                    p, ms = profile_parts(module, optimisers, batches, precision, args.steps)
                    parts = parts or p
                    bare.append(ms)
                    rows = sum(t.rows for t in featurizer.layout().tables)
                    kind = "funnel_sparse" if module.sparse else "funnel_dense"
                    if tp.table_bytes(rows, kind) + 2 * 2**30 > tp.available_bytes():
                        continue  # a second model of these tables would not fit beside the bare one
                    sps = tp.run_funnel(cfg, graph, featurizer, tables, rnd, 3 + 2 * args.steps, precision)
                    lightning.append(args.batch_size / sps * 1e3)
                step = statistics.median(bare)
                pl_step = statistics.median(lightning) if lightning else float("nan")
                total = sum(parts.values())
                row = {
                    "table_rows": sum(t.rows for t in featurizer.layout().tables),
                    "sparse": module.sparse,
                    "precision": precision,
                    "bare_step_ms": round(step, 2),
                    "lightning_step_ms": round(pl_step, 2),
                    "lightning_overhead_share": round(max(pl_step - step, 0.0) / pl_step, 3) if lightning else None,
                    "profiled_ms": round(total, 2),
                    "shares": {k: round(parts.get(k, 0.0) / total, 3) for k in PARTS},
                    "ms": {k: round(parts.get(k, 0.0), 2) for k in PARTS},
                    "bare_samples_per_s": round(args.batch_size / step * 1e3),
                    "lightning_samples_per_s": round(args.batch_size / pl_step * 1e3) if lightning else None,
                }
                results.append(row)
                print(json.dumps(row), flush=True)
            del module, optimisers, batches, tables
    print_table(results)


def print_table(results: list[dict]) -> None:
    head = (
        "| rows | update | precision | " + " | ".join(PARTS) + " | bare step ms | Lightning step ms | Lightning share |"
    )
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for r in results:
        shares = " | ".join(f"{100 * r['shares'][k]:.0f}%" for k in PARTS)
        kind = "sparse" if r["sparse"] else "dense"
        share = "n/a" if r["lightning_overhead_share"] is None else f"{100 * r['lightning_overhead_share']:.0f}%"
        print(
            f"| {r['table_rows']:,} | {kind} | {r['precision']} | {shares} | {r['bare_step_ms']} | "
            f"{r['lightning_step_ms']} | {share} |"
        )


if __name__ == "__main__":
    main()
