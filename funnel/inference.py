"""Scoring outside the training loop: metrics of a table, and prediction columns."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from funnel.atomic import same_file, write_text
from funnel.data.io import TableWriter, iter_table, output_format, prefetched, resolve_path, table_columns
from funnel.data.loader import BatchLoader
from funnel.data.table import LABELS, EncodedTable
from funnel.errors import UserError
from funnel.fusion import fuse_linear_relu
from funnel.graph import FunnelGraph
from funnel.models.registry import FunnelModel
from funnel.runs import BEST, CONFIG, ENCODERS, MANIFEST, METRICS, METRICS_VALID, load_run

log = logging.getLogger(__name__)


@torch.inference_mode()
def score(model: FunnelModel, table: EncodedTable, batch_size: int, bf16: bool = False):
    """Yield (batch, log_reach (B, S), log_cond (B, S), edge logits) over the table, in row order.
    ``bf16``: the towers run under bfloat16 autocast (faster on CPUs with AVX512-BF16/AMX);
    the funnel composition and the outputs stay float32."""
    model.eval()
    names = model.graph.names
    for batch in BatchLoader(table, batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, _ = model.edge_logits(batch)
        out = model.compose({k: v.float() for k, v in logits.items()})
        yield (batch, *out.log_stacked(names), out.logits)


def dense_layers_to_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """Cast every Linear layer to bfloat16 in place, for scoring under ``score(..., bf16=True)``:
    autocast then has no weight to cast at every call (measured 8% faster). Embedding tables,
    norms and the funnel composition stay float32."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(torch.bfloat16)
    return model


def _branch_columns(graph: FunnelGraph) -> dict[str, str]:
    """p_<stage>_via_<branch>_cond column -> the tower that gives it."""
    return {
        f"p_{s.name}_via_{'not_' if e.negated else ''}{e.source}_cond": e.tower
        for s in graph.stages
        for e in graph.branch_edges(s.name)
    }


def prediction_columns(graph: FunnelGraph) -> list[str]:
    """The columns `funnel predict` writes, in order."""
    cols = [c for name in graph.names for c in (f"p_{name}", f"p_{name}_cond")]
    return cols + list(_branch_columns(graph))


def evaluate_table(model: FunnelModel, table: EncodedTable, batch_size: int = 16384) -> dict[str, Any]:
    return evaluate_tables(model, [table], batch_size)


def evaluate_tables(model: FunnelModel, tables: Iterable[EncodedTable], batch_size: int = 16384) -> dict[str, Any]:
    """The metrics of the rows of ``tables`` together (chunks of one split, streamed: only one
    chunk is held at a time, plus what the exact AUCs keep, one prediction and label per row)."""
    # imported here: torchmetrics costs `funnel predict` 0.7 s of start-up and predict needs none of it
    from funnel.training.metrics import FunnelMetrics, free_stages, truth_of

    metrics, rows = None, 0
    for table in tables:
        if metrics is None:  # the first chunk says whether the data has the synthetic truth
            # the whole split is here: no synchronisation, also when called by rank 0 of a DDP run alone
            metrics = FunnelMetrics(
                model.graph,
                with_truth=bool(table.truth),
                free=free_stages(model.graph, table.truth),
                sync_on_compute=False,
            )
        for batch, log_reach, log_cond, _ in score(model, table, batch_size):
            metrics.update(log_reach, log_cond, batch[LABELS], truth_of(batch))
        rows += len(table)
    if metrics is None:
        raise UserError("evaluate: the data has no rows to score.")
    values = metrics.compute()
    values = {k: (None if math.isnan(v) else round(v, 6)) for k, v in values.items()}
    values["rows"] = rows
    return values


def predict_table(model: FunnelModel, table: EncodedTable, batch_size: int = 16384, bf16: bool = False) -> pd.DataFrame:
    """p_<stage> (path) and p_<stage>_cond (given `after`) for every stage; for a stage
    reached through branches also p_<stage>_via_<branch>_cond and p_<stage>_via_not_<branch>_cond,
    the probability of the stage given each branch (ESM²'s y3 and y4)."""
    graph = model.graph
    branch_cols = _branch_columns(graph)
    reach, cond, branch = [], [], {c: [] for c in branch_cols}
    for _, log_reach, log_cond, logits in score(model, table, batch_size, bf16):
        reach.append(log_reach.exp())
        cond.append(log_cond.exp())
        for col, tower in branch_cols.items():
            branch[col].append(torch.sigmoid(logits[tower]))
    n_stages = len(graph.names)
    reach_np = torch.cat(reach).numpy() if reach else np.zeros((0, n_stages))
    cond_np = torch.cat(cond).numpy() if cond else np.zeros((0, n_stages))
    cols: dict[str, np.ndarray] = {}
    for j, name in enumerate(graph.names):
        cols[f"p_{name}"] = reach_np[:, j]
        cols[f"p_{name}_cond"] = cond_np[:, j]
    for col, parts in branch.items():
        cols[col] = torch.cat(parts).numpy() if parts else np.zeros(0)
    return pd.DataFrame(cols)


def _refuse_inputs(out: str | Path, inputs: list[Path], flag: str = "--out") -> None:
    """An output that would replace an input (the data, a file of the run) is refused."""
    for path in inputs:
        if path.exists() and Path(out).exists() and same_file(out, path):
            raise UserError(
                f"{flag}: {str(out)!r} is the input {str(path)!r}; writing it would destroy it "
                "while it is read. Choose another output path."
            )


def _run_files(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    return [run_dir / name for name in (CONFIG, ENCODERS, BEST, METRICS, METRICS_VALID, MANIFEST)]


def evaluate_run(
    run_dir: str | Path, data: str | Path, out: str | Path | None = None, trust_plugins: bool = False
) -> dict[str, Any]:
    if out is not None:
        if Path(out).suffix.lower() != ".json":
            raise UserError(f"--out: {str(out)!r} must be a .json file (evaluate writes the metrics as JSON).")
        _refuse_inputs(out, [resolve_path(str(data)), *_run_files(run_dir)])
    cfg, _, featurizer, model = load_run(run_dir, trust_plugins)
    batch = cfg.data.eval_batch_size
    chunk_rows = max(batch, cfg.data.chunk_rows // batch * batch)  # whole batches: the sums of one pass
    header = table_columns(data, cfg.data.csv, key="--data")
    featurizer.check_columns(pd.DataFrame(columns=header), str(data), labels=True)
    columns = featurizer.wanted_columns(header)
    chunks = prefetched(iter_table(data, cfg.data.csv, columns, chunk_rows))
    tables = (featurizer.encode(df, f"{data} (chunk {k})", labels=True) for k, df in enumerate(chunks))
    result = evaluate_tables(model, tables, batch)
    if out:
        write_text(out, json.dumps(result, indent=1))
    return result


def predict_run(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    keep: list[str] | None = None,
    chunk_rows: int = 262_144,
    bf16: bool = False,
    batch_size: int = 4096,
    trust_plugins: bool = False,
) -> Path:
    """Score ``data`` chunk by chunk (reading only the feature and ``keep`` columns) and append
    each chunk's predictions to ``out``, so memory stays flat for files larger than memory
    (three chunks at most: one being read, one scored, one written).
    ``batch_size`` rows go through each forward pass: 4096 keeps the activations in the CPU's
    caches (measured faster than 16384 in float32 and bfloat16). The towers' Linear+ReLU pairs
    run fused (funnel/fusion.py: float32 results within 1e-6 of the eager layers)."""
    output_format(out)
    _refuse_inputs(out, [resolve_path(str(data)), *_run_files(run_dir)])
    cfg, graph, featurizer, model = load_run(run_dir, trust_plugins)
    if bf16:
        dense_layers_to_bf16(model)
    keep = keep or []
    header = table_columns(data, cfg.data.csv)
    missing = [c for c in keep if c not in header]
    if missing:
        raise UserError(f"--keep: column(s) {', '.join(missing)} not in {data}.")
    clash = sorted(set(keep) & set(prediction_columns(graph)))
    if clash:
        raise UserError(
            f"--keep: column(s) {', '.join(clash)} have the names of prediction columns; "
            "rename them in the input or leave them out of --keep."
        )
    if len(set(keep)) < len(keep):
        raise UserError(f"--keep: a column is listed twice ({','.join(keep)}).")
    featurizer.check_columns(pd.DataFrame(columns=header), str(data), labels=False)
    fuse_linear_relu(model)
    wanted = list(dict.fromkeys([*featurizer.feature_columns(), *keep]))
    start, rows = time.perf_counter(), 0

    def encoded() -> Iterator[tuple[EncodedTable, pd.DataFrame]]:
        for k, df in enumerate(iter_table(data, cfg.data.csv, wanted, chunk_rows)):
            yield featurizer.encode(df, f"{data} (chunk {k})", labels=False), df[keep].reset_index(drop=True)

    # a pipeline of three: chunk k+1 is parsed and encoded in one background thread and chunk
    # k-1 written in another while chunk k goes through the model here
    with TableWriter(out, background=True) as writer:
        for table, kept in prefetched(encoded()):
            pred = predict_table(model, table, batch_size, bf16)
            writer.write(pd.concat([kept, pred], axis=1) if keep else pred)
            rows += len(pred)
    seconds = time.perf_counter() - start
    log.info("wrote %d predictions to %s in %.1fs (%.0f rows/s)", rows, out, seconds, rows / max(seconds, 1e-9))
    return Path(out)
