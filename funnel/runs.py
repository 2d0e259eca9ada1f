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
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from funnel.atomic import write_text
from funnel.data.featurizer import Featurizer
from funnel.errors import UserError
from funnel.graph import FunnelGraph
from funnel.models.registry import FunnelModel, create_model
from funnel.spec import Config, config_from_dict
from funnel.spec.loader import read_yaml
from funnel.spec.schema import FEATURE_OPTIONS, DataSpec, FeatureSpec, ModelSpec, TowerSpec, TrainerSpec

# the fields that hold paths, per spec; and the nulls left out of the YAML form
_PATH_KEYS = {Config: ("run_dir", "init_from"), DataSpec: ("train", "valid", "test", "cache_dir")}
_LEFT_OUT = {("synthetic", DataSpec)}

CONFIG = "config.yaml"
MANIFEST = "run.json"
LAST = "checkpoints/last.ckpt"
ENCODERS = "encoders.json"
BEST = "checkpoints/best.ckpt"
METRICS = "metrics.json"
METRICS_VALID = "metrics_valid.json"


def absolute(path: Any) -> Any:
    """A relative path as an absolute one (against the working directory, where it was read);
    absolute paths, ``${data_dir}``/``$VAR``/``~`` paths and nulls as they are."""
    if not isinstance(path, str) or path.startswith(("$", "~")) or Path(path).is_absolute():
        return path
    return str(Path.cwd() / path)


def config_to_raw(cfg: Config) -> dict[str, Any]:
    """The YAML form of a config, with every default written out and every path absolute, so
    that the run's config.yaml reloads from any folder."""

    def conv(obj: Any) -> Any:
        if isinstance(obj, ModelSpec) and not obj.params:
            return obj.type
        if isinstance(obj, (TowerSpec, ModelSpec)):
            return {"type": obj.type, **{k: conv(v) for k, v in obj.params}}
        if isinstance(obj, TrainerSpec):
            own = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != "lightning"}
            return {**own, **{k: conv(v) for k, v in obj.lightning}}
        if isinstance(obj, FeatureSpec):  # only its kind's options: the others are rejected on reload
            keep = {"name", "kind", "column", *FEATURE_OPTIONS[obj.kind]}
            return {
                f.name: conv(getattr(obj, f.name))
                for f in dataclasses.fields(obj)
                if f.name in keep and getattr(obj, f.name) is not None
            }
        if dataclasses.is_dataclass(obj):
            # every value is written, nulls too (`data.synthetic: null` alone is left out: it reads as
            # "no generated data" but looks like "generated with defaults")
            out = {
                f.name: conv(getattr(obj, f.name))
                for f in dataclasses.fields(obj)
                if not (getattr(obj, f.name) is None and (f.name, type(obj)) in _LEFT_OUT)
            }
            for key in _PATH_KEYS.get(type(obj), ()):
                out[key] = absolute(out.get(key))
            return out
        if isinstance(obj, (tuple, list)):
            return [conv(v) for v in obj]
        return obj

    return conv(cfg)


def save_config(cfg: Config, run_dir: Path) -> None:
    write_text(run_dir / CONFIG, yaml.safe_dump(config_to_raw(cfg), sort_keys=False))


def build_graph(cfg: Config) -> FunnelGraph:
    return FunnelGraph.from_stages(cfg.funnel.stages)


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The run's ``run.json`` (status, times, epochs), or {} for a run written before it existed."""
    try:
        data = json.loads((run_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_manifest(run_dir: Path, **fields: Any) -> None:
    """Update ``run.json`` with ``fields`` (atomically)."""
    write_text(run_dir / MANIFEST, json.dumps({**read_manifest(run_dir), **fields}, indent=1) + "\n")


def load_config_of_run(run_dir: str | Path, trust_plugins: bool = False) -> Config:
    """The resolved config of a run. Its ``plugins:`` are imported only with ``trust_plugins``:
    importing a module runs its code, and a run directory may come from anywhere."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise UserError(
            f"{str(run_dir)!r} is not a funnel run directory (no {CONFIG}). Pass the folder `funnel fit` printed."
        )
    raw = read_yaml(run_dir / CONFIG)
    plugins = raw.get("plugins") or []
    if plugins and not trust_plugins:
        raise UserError(
            f"{run_dir / CONFIG}: the run needs the plugin module(s) {', '.join(map(str, plugins))} (they register its "
            "towers or models). Importing a module runs its code, so funnel imports a run directory's plugins only "
            "when you pass --trust-plugins. Pass it if you trust this run directory."
        )
    return config_from_dict(raw)


def interrupted_hint(run_dir: Path) -> str:
    """A sentence saying how to continue an interrupted run ('' when there is nothing to resume)."""
    if (run_dir / BEST).is_file() or not (run_dir / LAST).is_file():
        return ""
    epoch = read_manifest(run_dir).get("epochs_done")
    done = f" after {epoch} epoch(s)" if epoch is not None else ""
    return f" The run was interrupted{done}; continue it with `funnel fit --resume {run_dir}`."


def load_run(run_dir: str | Path, trust_plugins: bool = False) -> tuple[Config, FunnelGraph, Featurizer, FunnelModel]:
    """Rebuild the model of a run from its config, encoders and best checkpoint."""
    run_dir = Path(run_dir)
    ckpt = run_dir / BEST
    if (run_dir / CONFIG).is_file() and not ckpt.is_file():
        hint = interrupted_hint(run_dir) or " Did `funnel fit` finish? Train again to create it."
        raise UserError(f"{run_dir}: no checkpoint at {BEST}.{hint}")
    cfg = load_config_of_run(run_dir, trust_plugins)
    graph = build_graph(cfg)
    featurizer = Featurizer.load(run_dir / ENCODERS, cfg, graph)
    try:  # memory-mapped: only the model's weights are read, not the optimiser state beside them
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001  (a corrupt or foreign file: say so instead of a traceback)
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
        raise UserError(
            f"{ckpt}: does not match the run's encoders and config ({str(exc).splitlines()[-1].strip()})."
        ) from None
    if missing or unexpected:
        raise UserError(
            f"{ckpt}: does not match the run's config (missing {missing[:3]}, unexpected {unexpected[:3]})."
        )
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = build()
        model.load_state_dict(weights)
    return model
