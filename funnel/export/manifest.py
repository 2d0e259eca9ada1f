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


def _columns(item: GraphInput, featurizer: Featurizer, features: set[str] | None) -> Any:
    """The feature of each column of ``cat`` or ``num`` (of ``features`` only, when given)."""
    if item.name == "cat":
        return [f.name for f in featurizer.layout().fields_in(CAT) if features is None or f.name in features]
    if item.name == "num":
        return [c for c in numeric_columns(featurizer) if features is None or c["feature"] in features]
    return None


def describe_inputs(
    inputs: list[GraphInput], featurizer: Featurizer, features: set[str] | None = None
) -> list[dict[str, Any]]:
    """Each input's name, dtype and shape, and the feature(s) it holds; ``features``: a split
    graph's side (its ``cat`` and ``num`` hold that side's columns only)."""
    fields = {f.name: f for f in featurizer.layout().fields}
    described = []
    for item in inputs:
        entry: dict[str, Any] = {"name": item.name, "dtype": item.dtype, "shape": list(item.shape)}
        columns = _columns(item, featurizer, features)
        if item.name.startswith("user__"):  # the item graph's user state
            entry["from"] = "the user graph's output of this name"
        elif columns is not None:
            entry["columns"] = columns
        else:  # a sequence or multi-hot input: one feature's ids (or offsets, weights)
            name = item.name.split("__")[1]
            entry["feature"] = name
            entry["pooling"] = fields[name].pooling
        described.append(entry)
    return described


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
    return {
        "manifest_version": MANIFEST_VERSION,
        "funnel_version": funnel.__version__,
        "format": fmt,
        "file": file,
        "model": cfg.funnel.model.type,
        "tower": cfg.funnel.tower.type,
        "stages": stages,
        "encoders": "encoders.json",
        "inputs": describe_inputs(inputs, featurizer),
        "outputs": [{"name": name, "dtype": "float32", "shape": ["batch"]} for name in outputs],
    }


def split_manifest(
    whole: dict[str, Any],
    featurizer: Featurizer,
    sides: dict[str, list[str]],
    graphs: dict[str, tuple[str, list[GraphInput], list[tuple[str, str, list]]]],
) -> dict[str, Any]:
    """The manifest of a split export: ``whole``'s versions, stages and outputs, the features of
    each side, and per graph (user, item) its file, inputs and outputs (name, dtype, shape)."""
    out = {k: v for k, v in whole.items() if k not in ("file", "inputs")}
    out["split"] = sides
    out["graphs"] = {
        name: {
            "file": file,
            "inputs": describe_inputs(inputs, featurizer, set(sides[name])),
            "outputs": [{"name": n, "dtype": d, "shape": s} for n, d, s in outputs],
        }
        for name, (file, inputs, outputs) in graphs.items()
    }
    return out
