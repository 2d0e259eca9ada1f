"""A run directory: resolved config, encoders, best checkpoint and metrics.

    runs/<config stem>/<timestamp>/
        config.yaml        the resolved config (defaults filled in); reloads as-is
        encoders.json      fitted feature encoders
        checkpoints/best.ckpt
        metrics.json       metrics of the best checkpoint (test split, else valid)
        metrics_valid.json the same on the valid split, when metrics.json is the test split
        logs/metrics.csv   per-epoch training / validation logs
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from funnel.data.featurizer import Featurizer
from funnel.errors import UserError
from funnel.graph import FunnelGraph
from funnel.models.registry import FunnelModel, create_model
from funnel.spec import Config, load_config
from funnel.spec.schema import FEATURE_OPTIONS, FeatureSpec, TowerSpec, TrainerSpec

CONFIG = "config.yaml"
ENCODERS = "encoders.json"
BEST = "checkpoints/best.ckpt"
METRICS = "metrics.json"
METRICS_VALID = "metrics_valid.json"


def run_dir_path(cfg: Config, config_path: str | Path) -> Path:
    """Where this run will write; refuses a non-empty folder so no earlier run is overwritten."""
    if cfg.run_dir:
        path = Path(cfg.run_dir)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(
                f"run_dir: {str(path)!r} already exists and is not empty; funnel never overwrites a run. "
                "Choose a new run_dir, or leave it out for runs/<config stem>/<timestamp>."
            )
        return path
    path = Path("runs") / Path(config_path).stem / time.strftime("%Y%m%d-%H%M%S")
    while path.exists():  # two runs in the same second
        path = path.with_name(path.name + "-1")
    return path


def config_to_raw(cfg: Config) -> dict[str, Any]:
    """The YAML form of a config, with every default written out."""

    def conv(obj: Any) -> Any:
        if isinstance(obj, TowerSpec):
            return {"type": obj.type, **{k: conv(v) for k, v in obj.params}}
        if isinstance(obj, TrainerSpec):
            own = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != "lightning"}
            return {**own, **{k: conv(v) for k, v in obj.lightning}}
        if isinstance(obj, FeatureSpec):  # only its kind's options: the others are rejected on reload
            keep = {"name", "kind", "column", *FEATURE_OPTIONS[obj.kind]}
            return {f.name: conv(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                    if f.name in keep and getattr(obj, f.name) is not None}
        if dataclasses.is_dataclass(obj):
            # a null that is also the default is left out: it says nothing, and `synthetic: null` is ambiguous
            return {f.name: conv(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                    if not (getattr(obj, f.name) is None and f.default is None)}
        if isinstance(obj, (tuple, list)):
            return [conv(v) for v in obj]
        return obj

    return conv(cfg)


def save_config(cfg: Config, run_dir: Path) -> None:
    (run_dir / CONFIG).write_text(yaml.safe_dump(config_to_raw(cfg), sort_keys=False))


def build_graph(cfg: Config) -> FunnelGraph:
    return FunnelGraph.from_stages(cfg.funnel.stages)


def load_run(run_dir: str | Path) -> tuple[Config, FunnelGraph, Featurizer, FunnelModel]:
    """Rebuild the model of a run from its config, encoders and best checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"{str(run_dir)!r} is not a funnel run directory (no {CONFIG}). Pass the folder `funnel fit` printed.")
    cfg, _ = load_config(run_dir / CONFIG)
    graph = build_graph(cfg)
    featurizer = Featurizer.load(run_dir / ENCODERS, cfg, graph)
    ckpt = run_dir / BEST
    if not ckpt.is_file():
        raise UserError(f"{run_dir}: no checkpoint at {BEST}. Did `funnel fit` finish? Train again to create it.")
    try:  # memory-mapped: only the model's weights are read, not the optimiser state beside them
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a corrupt or foreign file: say so instead of a traceback
        raise UserError(f"{ckpt}: cannot be loaded as a checkpoint ({exc}).") from None
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise UserError(f"{ckpt}: is not a funnel checkpoint (no state_dict). Train again with `funnel fit`.")
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    model = _model_with(weights, lambda: create_model(graph, cfg.funnel, featurizer.layout()), ckpt)
    model.eval()
    return cfg, graph, featurizer, model


def _model_with(weights: dict[str, torch.Tensor], build: Any, ckpt: Path) -> FunnelModel:
    """The model holding ``weights``. It is built on the meta device first, so that its large
    embedding tables are not randomly initialised only to be overwritten; a model with state
    outside its state dict (a non-persistent buffer) is built again the ordinary way."""
    with torch.device("meta"):
        model = build()
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as exc:  # a tensor of another shape: the encoders or config were changed
        raise UserError(f"{ckpt}: does not match the run's encoders and config ({str(exc).splitlines()[-1].strip()}).") from None
    if missing or unexpected:
        raise UserError(f"{ckpt}: does not match the run's config (missing {missing[:3]}, unexpected {unexpected[:3]}).")
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = build()
        model.load_state_dict(weights)
    return model
