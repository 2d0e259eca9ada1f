"""``warm_start.init_optimizer: true``: a warm start's optimisers begin from the old run's state.

The state carried is that of the old run's checkpoints/last.ckpt: funnel writes best.ckpt with
the weights alone (funnel/training/checkpointing.py), so the moments are those of the old run's
last epoch, beside the weights of its best one (the same epoch when the last was the best). A
best.ckpt that does hold optimiser states (written by an older funnel) gives its own.

The state is matched to the new model by parameter name: the old optimisers' parameter ids
are named through the order in which funnel builds its optimisers
(:func:`funnel.training.module.optimizer_params`), the new ones through the model itself.
Each parameter's state tensors (Adam's ``exp_avg`` and ``exp_avg_sq``, LazyAdam's too, SGD's
momentum, Adagrad's sums) follow the weights: an embedding table's old rows go to the rows the
same ids have now, its new rows start at zero; every other tensor is copied as it is, and a
parameter whose shape changed is refused. Step counts are kept. Only the state is carried:
learning rate and weight decay are the new config's.

All of it is read and checked when the Trainer is built, before any data is trained on; the
callback loads it into the optimisers at ``on_fit_start``, on every rank (each one reads the
old run from disk). A resumed run has its own state and never gets this callback.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from funnel.errors import UserError
from funnel.models.embedding import SharedEmbeddings
from funnel.runs import BEST, LAST
from funnel.spec.schema import OptimSpec
from funnel.training.module import optimizer_params
from funnel.training.sparse_choice import sparse_tables
from funnel.training.warm_start import WarmSource

log = logging.getLogger(__name__)

# per table slice of an embedding weight: (first old row, first new row, old rows)
Rows = list[tuple[int, int, int]]


class CarryOptimizer(pl.Callback):
    """Loads the old run's optimiser state, remapped to ``model``'s parameters, at fit start."""

    def __init__(self, source: WarmSource, optim: OptimSpec, model: nn.Module, clip: bool = False):
        """``clip``: this run clips gradients (as the LightningModule's ``clip``)."""
        old_clip = source.config.trainer.clips_gradients
        old_sparse = sparse_tables(source.config.optim, source.model, old_clip)
        new_sparse = sparse_tables(optim, model, clip)
        refuse_other_optimizer(source.run_dir, source.config.optim, optim, old_sparse, new_sparse)
        self.path, saved = saved_states(Path(source.run_dir))
        old_groups = optimizer_params(source.model, source.config.optim, old_clip)
        if len(saved) != len(old_groups):
            raise UserError(
                f"warm_start.init_optimizer: {self.path} holds {len(saved)} optimiser state(s), its run's "
                f"optim settings build {len(old_groups)}; drop warm_start.init_optimizer."
            )
        self.states = carried_states(source.model, model, saved, old_groups, self.path)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None or self.states is None:  # a resume restores its own state
            return
        names = {id(p): name for name, p in pl_module.model.named_parameters()}
        for optimizer in trainer.optimizers:
            fresh = optimizer.state_dict()
            params = [p for group in optimizer.param_groups for p in group["params"]]
            ids = [i for group in fresh["param_groups"] for i in group["params"]]
            named = [(i, names[id(p)]) for i, p in zip(ids, params, strict=True)]
            state = {i: self.states[name] for i, name in named if name in self.states}
            # the new param groups: this config's lr and weight decay
            optimizer.load_state_dict({"state": state, "param_groups": fresh["param_groups"]})
        log.info("init_from: optimiser state of %d parameters from %s", len(self.states), self.path)
        self.states = None  # loaded: not kept twice


def refuse_other_optimizer(run_dir: Path, old: OptimSpec, new: OptimSpec, old_sparse: bool, new_sparse: bool) -> None:
    """``old_sparse``, ``new_sparse``: what each run's optim.sparse_embeddings resolved to."""

    def kind(o: OptimSpec, sparse: bool) -> str:
        auto = " (auto)" if o.sparse_embeddings == "auto" else ""
        return f"optim.name: {o.name}, optim.sparse_embeddings: {str(sparse).lower()}{auto}"

    if (old.name, old_sparse) != (new.name, new_sparse):
        old_kind, new_kind = kind(old, old_sparse), kind(new, new_sparse)
        raise UserError(
            f"warm_start.init_optimizer: {run_dir} was trained with {old_kind}, this config has {new_kind}; "
            "an optimiser's state carries only to the same optimiser. Drop warm_start.init_optimizer "
            "(the optimiser then starts afresh) or use the same optim settings."
        )


def saved_states(run_dir: Path) -> tuple[Path, list[dict]]:
    """The optimiser states of the best checkpoint when it has them (older runs), else of the last one."""
    for name in (BEST, LAST):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  (a corrupt or foreign file: say so instead of a traceback)
            raise UserError(f"warm_start.init_optimizer: {path} cannot be loaded as a checkpoint ({exc}).") from None
        states = ckpt.get("optimizer_states") if isinstance(ckpt, dict) else None
        if states:
            return path, list(states)
    raise UserError(
        f"warm_start.init_optimizer: neither {run_dir / BEST} nor {run_dir / LAST} holds an optimiser state; "
        "drop warm_start.init_optimizer (the optimiser then starts afresh)."
    )


def carried_states(
    old: nn.Module, new: nn.Module, saved: list[dict], old_groups: list[list[nn.Parameter]], path: Path
) -> dict[str, dict[str, Any]]:
    """Each new parameter's name → its optimiser state, taken from the old run's ``saved``."""
    old_names = {id(p): name for name, p in old.named_parameters()}
    by_name: dict[str, tuple[dict, torch.Size]] = {}
    for state_dict, params in zip(saved, old_groups, strict=True):
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        if len(ids) != len(params):
            raise UserError(
                f"warm_start.init_optimizer: {path} has optimiser state for {len(ids)} parameters, its model "
                f"{len(params)}; drop warm_start.init_optimizer."
            )
        for i, p in zip(ids, params, strict=True):
            if i in state_dict["state"]:
                by_name[old_names[id(p)]] = (state_dict["state"][i], p.shape)
    rows = table_rows(old, new)
    out = {}
    for name, param in new.named_parameters():
        if name not in by_name:
            continue  # no state there (never stepped): it starts afresh
        entry, old_shape = by_name[name]
        if name not in rows and old_shape != param.shape:
            raise UserError(
                f"warm_start.init_optimizer: parameter {name} has shape {tuple(old_shape)} in {path} and "
                f"{tuple(param.shape)} here; drop warm_start.init_optimizer."
            )
        out[name] = {key: _carried(value, old_shape, param, rows.get(name)) for key, value in entry.items()}
    return out


def _carried(value: Any, old_shape: torch.Size, param: Tensor, rows: Rows | None) -> Any:
    if not isinstance(value, Tensor) or value.shape != old_shape:
        return value  # a step count
    if rows is None:
        return value
    grown = value.new_zeros(param.shape)  # the new ids' rows: zero moments
    for first_old, first_new, n in rows:
        grown[first_new : first_new + n] = value[first_old : first_old + n]
    return grown


def table_rows(old: nn.Module, new: nn.Module) -> dict[str, Rows]:
    """Embedding weights by name → where each table's old rows are, there and here (the rows
    :func:`funnel.training.warm_start.transfer` copies)."""
    old_modules = dict(old.named_modules())
    rows: dict[str, Rows] = {}
    for name, module in new.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, SharedEmbeddings):
            before = old_modules[name]
            for table, (key, first, _) in module.slots.items():
                _, old_first, old_rows = before.slots[table]
                rows.setdefault(f"{prefix}fused.{key}.weight", []).append((old_first, first, old_rows))
        elif isinstance(module, nn.Embedding) and f"{prefix}weight" not in rows:
            rows[f"{prefix}weight"] = [(0, 0, old_modules[name].weight.shape[0])]
    return rows
