"""manifest.json of an exported artefact: what a serving system needs to feed and read the graph."""

from __future__ import annotations

from typing import Any

import funnel
from funnel.data.featurizer import Featurizer
from funnel.data.kinds import kind_of
from funnel.data.table import CAT, NUM
from funnel.export.graph import GraphInput
from funnel.spec import Config

MANIFEST_VERSION = 1


def numeric_columns(featurizer: Featurizer) -> list[dict[str, Any]]:
    """One entry per column of ``num``, in order: the feature and what the column holds."""
    cols: list[dict[str, Any]] = []
    for f in featurizer.features:
        if kind_of(f).block != NUM:
            continue
        enc = featurizer.encoders[f.name]
        flag = bool(getattr(enc, "flag", False))
        values = enc.width - int(flag)
        for i in range(values):
            cols.append({"feature": f.name, "holds": "value" if values == 1 else f"value[{i}]"})
        if flag:  # 1 where the value was missing (it is then the train mean)
            cols.append({"feature": f.name, "holds": "missing_flag"})
    return cols


def _columns(item: GraphInput, featurizer: Featurizer) -> Any:
    if item.name == "cat":
        return [f.name for f in featurizer.layout().fields_in(CAT)]
    if item.name == "num":
        return numeric_columns(featurizer)
    return None


def build_manifest(
    cfg: Config,
    featurizer: Featurizer,
    stages: list[str],
    inputs: list[GraphInput],
    outputs: list[str],
    fmt: str,
    file: str,
) -> dict[str, Any]:
    """The manifest: versions, stages in graph order, each input's dtype, shape and feature order,
    and the outputs (the columns of `funnel predict`, in its order)."""
    features = {f.name: f for f in featurizer.layout().fields}
    described = []
    for item in inputs:
        entry: dict[str, Any] = {"name": item.name, "dtype": item.dtype, "shape": list(item.shape)}
        columns = _columns(item, featurizer)
        if columns is not None:
            entry["columns"] = columns
        else:  # a sequence or multi-hot input: one feature's ids (or offsets, weights)
            name = item.name.split("__")[1]
            entry["feature"] = name
            entry["pooling"] = features[name].pooling
        described.append(entry)
    return {
        "manifest_version": MANIFEST_VERSION,
        "funnel_version": funnel.__version__,
        "format": fmt,
        "file": file,
        "model": cfg.funnel.model.type,
        "tower": cfg.funnel.tower.type,
        "stages": stages,
        "encoders": "encoders.json",
        "inputs": described,
        "outputs": [{"name": name, "dtype": "float32", "shape": ["batch"]} for name in outputs],
    }
