"""`funnel check`: validate the config and the data without training."""

from __future__ import annotations

from typing import Any

import numpy as np

from funnel.data.degenerate import check_degenerate
from funnel.data.encoders import NumericEncoder
from funnel.data.featurizer import Featurizer
from funnel.data.labels import conflict_counts, encode_label
from funnel.data.sources import load_frames
from funnel.errors import DataError
from funnel.runs import build_graph
from funnel.spec import load_config
from funnel.training.monitor import monitor_choice
from funnel.training.preflight import preflight
from funnel.training.trainer_args import trainer_data_problems


def check(config_path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Return a report of the data per split; raises UserError listing every problem."""
    cfg, _ = load_config(config_path, overrides)
    preflight(cfg)  # as `fit` does, before any data is read: the Trainer arguments and the model
    graph = build_graph(cfg)
    frames = load_frames(cfg)
    featurizer = Featurizer(cfg, graph)
    problems: list[str] = []
    report: dict[str, Any] = {"config": str(config_path), "stages": graph.names, "splits": {}, "numeric": {}}
    stages = {s.name: s for s in cfg.funnel.stages}
    for split, df in frames.items():
        try:
            featurizer.check_columns(df, split, labels=True)
            y = np.stack([encode_label(df[stages[n].label_column], stages[n]) for n in graph.names], axis=1)
            gaps = {f.name: NumericEncoder(f).gaps(df[f.source]) for f in cfg.features if f.kind == "numeric"}
        except DataError as exc:
            problems += exc.problems
            continue
        conflicts = conflict_counts(y, graph)
        report["splits"][split] = {
            "rows": len(df),
            "positives": {n: int(y[:, j].sum()) for j, n in enumerate(graph.names)},
            "conflicts": conflicts,
        }
        # numeric features with missing / non-finite values (inf, or overflowing float32 after the transform)
        report["numeric"][split] = {
            "missing": {name: m for name, (m, _) in gaps.items() if m},
            "nonfinite": {name: k for name, (_, k) in gaps.items() if k},
        }
        if cfg.data.label_conflicts == "error" and sum(conflicts.values()):
            problems.append(
                f"{split}: {sum(conflicts.values())} label conflicts under data.label_conflicts: error "
                f"({conflicts}); set it to drop or zero."
            )
    if not problems:
        try:  # encoders fit, every split encodes (types, missing values, log1p domain) and can train
            featurizer.fit(frames["train"])
            # with labels: under label_conflicts: error no split reaching this point has a conflict
            tables = {split: featurizer.encode(df, split) for split, df in frames.items()}
            report["truncated"] = truncation_report(featurizer.encoders, list(frames))
            # the transform in effect per numeric feature (what `transform: auto` chose on train)
            report["transforms"] = {
                f.name: featurizer.encoders[f.name].transform for f in cfg.features if f.kind == "numeric"
            }
            check_degenerate(tables, graph, cfg)
            problems += trainer_data_problems(cfg, len(tables["train"]))
            monitor, mode, why, undefined = monitor_choice(cfg, graph, tables["valid"])
            report["monitor"] = {"metric": monitor, "mode": mode, **({"why": why} if why else {})}
            if undefined:  # a monitor that cannot work is a warning; a default's reasoned switch is not
                report["warnings"] = [why]
        except DataError as exc:
            problems += exc.problems
    if problems:
        raise DataError(problems)
    report["features"] = {
        f.name: (featurizer.encoders[f.name].cardinality if f.kind in ("categorical", "multi_hot") else f.kind)
        for f in cfg.features
    }
    return report


def truncation_report(encoders: dict[str, Any], splits: list[str]) -> dict[str, dict[str, dict[str, int]]]:
    """Per split, the features whose ``max_len`` cut rows: {"rows": rows cut, "ids": ids dropped}
    (an empty mapping: nothing was cut in that split)."""
    report: dict[str, dict[str, dict[str, int]]] = {split: {} for split in splits}
    for name, encoder in encoders.items():
        for split, (rows, ids) in getattr(encoder, "truncation", {}).items():
            report.setdefault(split, {})[name] = {"rows": rows, "ids": ids}
    return report
