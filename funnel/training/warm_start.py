"""Warm start (``init_from: RUN_DIR``): a new run that begins from another run's model.

The daily-retraining habit of ranking teams: today's run starts from yesterday's best
checkpoint and encoders, on today's data.

- Vocabularies grow: the encoders are fitted on the new train split as usual, then every
  vocabulary is the old one followed by the new values that pass ``min_count`` and were not in
  it. An id seen before keeps its value → row mapping (matched by value), and its embedding
  row; a new value gets a fresh row (the model's ordinary initialisation); a value absent from
  the new data keeps its row. Hashed features keep their buckets.
- Numeric statistics stay the first run's (so the model sees the same scale), unless
  ``warm_start.refit_numerics: true``.
- Every other weight is copied as it is.
- The optimiser starts afresh, unless ``warm_start.init_optimizer: true``: then it starts from
  the old run's optimiser state (of checkpoints/last.ckpt: its last epoch's moments), moments
  and step counts matched by parameter name, a grown table's new rows with zero moments; the
  learning rate and weight decay are the new config's, and another ``optim.name`` or
  ``optim.sparse_embeddings`` is refused (funnel/training/carry_optimizer.py).

Before any training step the new model therefore scores rows of known values exactly as the
old one did (tests/test_warm_start.py). Runs whose stages, model, towers or features differ
are refused with the difference named.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from funnel.data.featurizer import Featurizer
from funnel.errors import UserError
from funnel.models.embedding import SharedEmbeddings
from funnel.models.registry import FunnelModel, create_model
from funnel.spec.schema import Config

log = logging.getLogger(__name__)


@dataclasses.dataclass
class WarmSource:
    run_dir: Path
    config: Config
    featurizer: Featurizer
    model: FunnelModel


def load_source(cfg: Config) -> WarmSource:
    """The run ``cfg.init_from`` names, checked against ``cfg``. The plugins it needs must be
    among this config's (already imported): a run directory's own list is never imported."""
    from funnel.runs import CONFIG, load_run
    from funnel.spec.loader import read_yaml

    run_dir = Path(cfg.init_from)
    if (run_dir / CONFIG).is_file():
        needed = [str(m) for m in read_yaml(run_dir / CONFIG).get("plugins") or []]
        missing = [m for m in needed if m not in cfg.plugins]
        if missing:
            raise UserError(
                f"init_from: {run_dir} was trained with the plugin module(s) {', '.join(missing)}; "
                "list them under `plugins:` of this config."
            )
    try:
        old_cfg, _, featurizer, model = load_run(run_dir, trust_plugins=True)
    except UserError as exc:
        raise UserError(f"init_from: {exc}") from None
    problems = compatibility_problems(old_cfg, cfg)
    if problems:
        raise UserError(
            [f"init_from: {run_dir} cannot start this run: {p}" for p in problems]
            + ["Warm start needs the same stages, model, towers and features; train this config from scratch instead."]
        )
    return WarmSource(run_dir, old_cfg, featurizer, model)


def compatibility_problems(old: Config, new: Config) -> list[str]:
    """What differs between two configs in ways that change the model's parameters."""
    problems = []

    def stages(cfg: Config) -> list[tuple[Any, ...]]:
        return [(s.name, s.after, s.via, s.group, s.tower) for s in cfg.funnel.stages]

    if stages(old) != stages(new):
        problems.append(f"its stages are {stages(old)}, this config's {stages(new)}")
    for key in ("model", "embed_dim", "tower", "bottom", "bias_tower"):
        a, b = getattr(old.funnel, key), getattr(new.funnel, key)
        if a != b:
            problems.append(f"funnel.{key} is {a} there, {b} here")
    old_f = {f.name: f for f in old.features}
    new_f = {f.name: f for f in new.features}
    if list(old_f) != list(new_f):
        problems.append(f"its features are {list(old_f)}, this config's {list(new_f)}")
    for name in old_f.keys() & new_f.keys():
        a, b = old_f[name], new_f[name]
        for key in ("kind", "share_with", "embed_dim", "hash_buckets", "max_len", "pooling", "weights"):
            if getattr(a, key) != getattr(b, key):
                problems.append(f"feature {name!r} has {key} {getattr(a, key)!r} there, {getattr(b, key)!r} here")
    return problems


def transfer(model: FunnelModel, source: WarmSource) -> None:
    """Copy the old model's weights into ``model``: embedding tables row by row (each table's
    old rows; its new rows keep their fresh initialisation), everything else as it is."""
    old = source.model
    old_modules = dict(old.named_modules())
    done: set[str] = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(module, SharedEmbeddings):
                before = old_modules[name]
                for table in module.table_names:
                    rows = before.table_weight(table)
                    module.table_weight(table)[: rows.shape[0]].copy_(rows)
                done.update(f"{prefix}{k}" for k in module.state_dict())
            elif isinstance(module, nn.Embedding) and f"{prefix}weight" not in done:
                rows = old_modules[name].weight
                module.weight[: rows.shape[0]].copy_(rows)
                done.add(f"{prefix}weight")
        old_state = old.state_dict()
        for key, value in model.state_dict().items():
            if key in done:
                continue
            if key not in old_state or old_state[key].shape != value.shape:
                shape = None if key not in old_state else tuple(old_state[key].shape)
                raise UserError(
                    f"init_from: {source.run_dir}: parameter {key} has shape {shape} there and {tuple(value.shape)} "
                    "here (a numeric feature gained a missing-value flag?). Set warm_start.refit_numerics: false, "
                    "or train from scratch."
                )
            value.copy_(old_state[key])


def build_model(cfg: Config, graph: Any, featurizer: Featurizer, source: WarmSource) -> FunnelModel:
    model = create_model(graph, cfg.funnel, featurizer.layout())
    transfer(model, source)
    log.info("init_from: started from %s", source.run_dir)
    return model
