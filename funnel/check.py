"""`funnel check`: validate the config and the data without training."""

from __future__ import annotations

from typing import Any

import numpy as np

from funnel.data.featurizer import Featurizer
from funnel.data.labels import conflict_counts, encode_label
from funnel.data.sources import load_frames
from funnel.errors import DataError
from funnel.runs import build_graph
from funnel.spec import load_config


def check(config_path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Return a report of the data per split; raises UserError listing every problem."""
    cfg, _ = load_config(config_path, overrides)
    graph = build_graph(cfg)
    frames = load_frames(cfg)
    featurizer = Featurizer(cfg, graph)
    problems: list[str] = []
    report: dict[str, Any] = {"config": str(config_path), "stages": graph.names, "splits": {}}
    stages = {s.name: s for s in cfg.funnel.stages}
    for split, df in frames.items():
        try:
            featurizer.check_columns(df, split, labels=True)
            y = np.stack([encode_label(df[stages[n].label_column], stages[n]) for n in graph.names], axis=1)
        except DataError as exc:
            problems += exc.problems
            continue
        conflicts = conflict_counts(y, graph)
        report["splits"][split] = {
            "rows": len(df),
            "positives": {n: int(y[:, j].sum()) for j, n in enumerate(graph.names)},
            "conflicts": conflicts,
        }
        if cfg.data.label_conflicts == "error" and sum(conflicts.values()):
            problems.append(
                f"{split}: {sum(conflicts.values())} label conflicts under data.label_conflicts: error "
                f"({conflicts}); set it to drop or zero."
            )
    if not problems:
        try:  # encoders fit and every split encodes (types, missing values, log1p domain)
            featurizer.fit(frames["train"])
            for split, df in frames.items():
                featurizer.encode(df, split, labels=cfg.data.label_conflicts != "error")
        except DataError as exc:
            problems += exc.problems
    if problems:
        raise DataError(problems)
    report["features"] = {
        f.name: (featurizer.cat[f.name].cardinality if f.kind == "categorical" else f.kind) for f in cfg.features
    }
    return report
