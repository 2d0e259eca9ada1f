"""Training health: a stage that learns nothing says so while training, not after it.

After each validation epoch :class:`TrainingHealth` looks at every stage's predictions: the path
probability P(s) over all rows and the conditional probability P(s | after) on the rows whose
parent happened (the ``auc/<s>`` and ``auc_cond/<s>`` metrics). A prediction that is constant
(its range below 1e-6 of its size), or whose AUC is exactly 0.5 with both classes present, is a
bad epoch; two bad epochs in a row log one WARNING that names the stage, the model part to blame
(a tower whose ReLU units are all inactive, a head with zero weights, a bottom whose output or
gate collapsed) and a likely fix. At the end of `funnel fit` each stage gets one line:
learned, stuck or diverged (also in run.json under ``health``).

The signals cost no extra pass over the data: the AUCs are the module's logged (synchronised)
values, the range of the predictions comes from the AUC metrics' own states (min and max
all-reduced across ranks), and the diagnosis of the parts comes from forward hooks on the
first validation batch. Only global rank 0 logs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

REL_SPREAD = 1e-6  # a prediction whose (max - min) is below this fraction of max |p| is constant
GATE_COLLAPSED = 0.98  # a batch-mean gate weight above this on one expert: the gate chose one expert
LEARNED, STUCK, DIVERGED, UNCHECKED = "learned", "stuck", "diverged", "unchecked"


@dataclass
class StageState:
    streak: int = 0  # consecutive bad validation epochs up to the last one
    since: int | None = None  # the epoch the current streak began
    warned: bool = False  # the current streak was reported
    finite: bool = True  # the last epoch's predictions and loss were finite
    reason: str = ""  # what was wrong in the last bad epoch
    auc_cond: float = math.nan  # the last epoch's val/auc_cond/<s>


class TrainingHealth(pl.Callback):
    """Warn when a stage's validation predictions are constant or at chance for ``patience``
    epochs in a row, and summarise every stage at the end (:meth:`finish`)."""

    def __init__(self, names: list[str], patience: int = 2):
        self.names = list(names)
        self.patience = patience
        self.stages = {n: StageState() for n in self.names}
        self.epochs = 0  # validation epochs judged
        self._spread: dict[str, tuple[float, float, bool]] = {}  # view -> (min, max, all finite)
        self._probe: dict[str, Any] = {}  # part -> what the hooks saw on the first validation batch
        self._hooks: list[Any] = []

    # ---- the epoch's signals -------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._probe = {}
        self._hooks = _probe_hooks(_net_of(pl_module), self._probe)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._remove_hooks()  # the first batch is enough to diagnose the parts

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the module computes and resets its metrics: the range of every prediction."""
        self._remove_hooks()
        if trainer.sanity_checking:
            return
        metrics = getattr(getattr(pl_module, "val_metrics", None), "metrics", None)
        if metrics is None:
            return
        views = [f"{kind}/{s}" for s in self.names for kind in ("auc", "auc_cond")]
        keys = [v.replace("/", "__") for v in views]
        preds = [getattr(metrics[k], "preds", None) if k in metrics else None for k in keys]
        # (V, 3): max, -min, any non-finite; one all-reduce for all the views
        stats = torch.stack([_range(p or [], pl_module.device) for p in preds])
        if trainer.world_size > 1:
            stats = trainer.strategy.reduce(stats, reduce_op="max")
        self._spread = {
            v: (-float(lo), float(hi), not bool(bad)) for v, (hi, lo, bad) in zip(views, stats.tolist(), strict=True)
        }

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the module logged the epoch's (synchronised) metrics: judge every stage."""
        if trainer.sanity_checking or not self._spread:
            return
        values = {k: _float(v) for k, v in trainer.callback_metrics.items()}
        loss_finite = math.isfinite(values.get("val/loss", 0.0))
        self.epochs += 1
        for s in self.names:
            state = self.stages[s]
            state.auc_cond = values.get(f"val/auc_cond/{s}", math.nan)
            problems = [p for kind in ("auc_cond", "auc") if (p := self._problem(kind, s, values))]
            spreads = [self._spread.get(f"{k}/{s}", (0.0, 0.0, True)) for k in ("auc", "auc_cond")]
            state.finite = loss_finite and all(finite for _, _, finite in spreads)
            if not problems:
                state.streak, state.since, state.warned, state.reason = 0, None, False, ""
                continue
            state.streak += 1
            state.since = trainer.current_epoch if state.since is None else state.since
            state.reason = problems[0]
            if state.streak >= self.patience and not state.warned:
                state.warned = True
                if trainer.is_global_zero:
                    self._warn(s, pl_module, state)
        self._spread = {}

    def _problem(self, kind: str, s: str, values: dict[str, float]) -> str:
        """Why the view ``kind/<s>`` is bad this epoch ('' when it is not)."""
        what = "conditional prediction" if kind == "auc_cond" else "path prediction"
        lo, hi, _ = self._spread.get(f"{kind}/{s}", (math.nan, math.nan, True))
        if math.isfinite(lo) and math.isfinite(hi) and hi - lo <= REL_SPREAD * max(abs(hi), abs(lo), 1e-30):
            return f"its {what} is the constant {hi:.6g} on every validation row"
        if values.get(f"val/{kind}/{s}") == 0.5:  # NaN (one class only) is never 0.5
            return f"its {what} has val/{kind}/{s} = 0.5 exactly (no ranking at all)"
        return ""

    def _warn(self, s: str, pl_module: pl.LightningModule, state: StageState) -> None:
        part, detail, fix = _diagnose(_net_of(pl_module), s, self._probe)
        log.warning(
            "stage %r is not learning: %s for %d validation epochs (since epoch %s). Model part: %s%s. Likely fix: %s",
            s,
            state.reason,
            state.streak,
            state.since,
            part,
            f" ({detail})" if detail else "",
            fix,
        )

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ---- the end -------------------------------------------------------------------------

    def summary(self, diverged: bool = False) -> dict[str, str]:
        """learned / stuck / diverged (unchecked without a validation epoch) per stage."""
        out = {}
        for s, state in self.stages.items():
            if diverged or not state.finite:
                out[s] = DIVERGED
            elif not self.epochs:
                out[s] = UNCHECKED
            else:
                out[s] = STUCK if state.streak else LEARNED
        return out

    def finish(self, trainer: pl.Trainer | None = None, diverged: bool = False) -> dict[str, str]:
        """Log one health line per stage (on global rank 0) and return :meth:`summary`."""
        result = self.summary(diverged)
        if trainer is None or trainer.is_global_zero:
            for s, status in result.items():
                log.info("%s", summary_line(s, status, self.stages[s], self.epochs))
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "stages": {s: asdict(st) for s, st in self.stages.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = state_dict.get("epochs", 0)
        for s, st in state_dict.get("stages", {}).items():
            if s in self.stages:
                self.stages[s] = StageState(**st)


def summary_line(stage: str, status: str, state: StageState, epochs: int) -> str:
    """``health: stage 'married' stuck (...)``: the line `funnel fit` ends with, per stage."""
    if status == LEARNED:
        why = f"val/auc_cond/{stage} {state.auc_cond:.4f}" if math.isfinite(state.auc_cond) else "varied predictions"
    elif status == STUCK:
        why = f"{state.reason}, {state.streak} of {epochs} validation epoch(s)"
    elif status == DIVERGED:
        why = "the loss or the predictions became non-finite, or the divergence guard stopped training"
    else:
        why = "no validation epoch ran"
    return f"health: stage {stage!r} {status} ({why})"


# ---- signals and diagnosis ------------------------------------------------------------------


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _range(preds: list[Tensor], device: torch.device) -> Tensor:
    """(max, -min, any non-finite) of this rank's predictions; -inf where it has none."""
    hi, lo, bad = -math.inf, math.inf, 0.0
    parts = [p for p in preds if p.numel()]
    if parts:
        finite = [p[torch.isfinite(p)] for p in parts]
        bad = float(sum(int(f.numel() != p.numel()) for f, p in zip(finite, parts, strict=True)) > 0)
        finite = [f for f in finite if f.numel()]
        if finite:
            hi = float(torch.stack([f.max() for f in finite]).max())
            lo = float(torch.stack([f.min() for f in finite]).min())
    return torch.tensor([hi, -lo, bad], dtype=torch.float64, device=device)


def _net_of(pl_module: pl.LightningModule) -> nn.Module | None:
    """The built-in FunnelNet (towers, heads, bottom) of the module's model, if it has one."""
    model = getattr(pl_module, "model", None)
    net = getattr(model, "net", model)
    return net if hasattr(net, "stage_towers") and hasattr(net, "towers") else None


_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.PReLU)


def _probe_hooks(net: nn.Module | None, probe: dict[str, Any]) -> list[Any]:
    """Forward hooks that record, once per epoch, which ReLU units of each tower fire and how
    much each tower's (and the bottom's) output varies over the batch."""
    if net is None:
        return []
    hooks = []

    def record(key: str, relu: bool):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if key in probe:
                return
            if isinstance(output, dict):  # a bottom: stage -> (B, width)
                probe[key] = {s: _varying(o) for s, o in output.items() if isinstance(o, Tensor)}
            elif isinstance(output, Tensor) and output.dim() == 2:
                probe[key] = (int((output > 0).any(0).sum()), output.shape[1]) if relu else _varying(output)

        return hook

    for key, tower in net.towers.items():
        hooks.append(tower.register_forward_hook(record(f"tower:{key}", relu=False)))
        for i, act in enumerate(m for m in tower.modules() if isinstance(m, nn.ReLU)):
            hooks.append(act.register_forward_hook(record(f"relu:{key}:{i}", relu=True)))
    if getattr(net, "bottom", None) is not None:
        hooks.append(net.bottom.register_forward_hook(record("bottom", relu=False)))
    return hooks


def _varying(x: Tensor) -> tuple[int, int]:
    """(columns of ``x`` that vary over the batch, columns)."""
    x = x.detach().float()
    spread = x.amax(0) - x.amin(0)
    return int((spread > REL_SPREAD * x.abs().amax(0).clamp(min=1e-30)).sum()), x.shape[1]


def _diagnose(net: nn.Module | None, stage: str, probe: dict[str, Any]) -> tuple[str, str, str]:
    """(the model part, what is wrong with it, the likely fix) for a stage that is not learning."""
    if net is None:
        return (
            f"the model's output for stage {stage!r}",
            "",
            "check that the part predicting this stage is trained (not frozen), or lower optim.lr",
        )
    bottom = getattr(net, "bottom", None)
    for key in net.stage_towers.get(stage, []):
        name = net.edge_names.get(key, key) if hasattr(net, "edge_names") else key
        relus = sorted(k for k in probe if k.startswith(f"relu:{key}:"))
        for k in relus:
            alive, units = probe[k]
            if alive == 0:
                layer = int(k.rsplit(":", 1)[1])
                uncentred = bottom is not None and not any(isinstance(m, nn.BatchNorm1d) for m in bottom.modules())
                return (
                    f"tower {name!r}",
                    f"all {units} ReLU units of its hidden layer {layer} are inactive on a validation batch",
                    "the tower's ReLU units are all inactive: use a wider tower (hidden), activation: gelu or silu, "
                    "or a lower optim.lr" + ("; give funnel.bottom back its norm: batch" if uncentred else ""),
                )
        head = net.heads[key] if key in net.heads else None  # noqa: SIM401 (a ModuleDict has no get)
        weight = getattr(head, "weight", None)
        if isinstance(weight, Tensor) and not bool(weight.detach().abs().gt(0).any()):
            frozen = " and frozen" if not weight.requires_grad else ""
            return (
                f"the logit head of tower {name!r}",
                f"its weights are all zero{frozen}: it outputs its bias alone",
                "train the head (requires_grad, a non-zero learning rate) or initialise it with non-zero weights",
            )
        varying = probe.get(f"tower:{key}")
        bottom_seen = probe.get("bottom", {}).get(stage) if isinstance(probe.get("bottom"), dict) else None
        if bottom is not None and bottom_seen is not None and bottom_seen[0] == 0:
            return (
                f"the bottom's ({type(bottom).__name__}) output for stage {stage!r}",
                f"none of its {bottom_seen[1]} outputs varies over a validation batch{_gate_note(bottom, stage)}",
                "the bottom's experts are inactive: give the bottom activation: gelu or silu, wider expert_hidden, "
                "or a lower optim.lr",
            )
        if varying is not None and varying[0] == 0:
            return (
                f"tower {name!r}",
                f"none of its {varying[1]} outputs varies over a validation batch",
                "use a wider tower, activation: gelu or silu, or a lower optim.lr",
            )
    gate = _gate_note(bottom, stage) if bottom is not None else ""
    part = f"the towers and heads of stage {stage!r}"
    if gate:
        return (f"the bottom's gate for stage {stage!r}", gate.lstrip("; "), "lower optim.lr, or use more experts")
    return (part, "", "lower optim.lr, or check that the stage's label carries signal (`funnel check`)")


def _gate_note(bottom: nn.Module, stage: str) -> str:
    gates = getattr(bottom, "gates", None) or {}
    w = gates.get(stage)
    if not isinstance(w, Tensor) or not w.numel():
        return ""
    top = int(w.argmax())
    if float(w[top]) <= GATE_COLLAPSED:
        return ""
    return f"; its gate puts {float(w[top]):.3f} of its weight on expert {top}"
