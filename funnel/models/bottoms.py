"""Shared bottoms: networks between the shared embeddings and the stage towers.

``funnel.bottom: {type: mmoe, experts: 4}`` in YAML. A bottom takes ``(shape, stages,
**kwargs)``, sets ``self.out_dim`` and maps a ``TowerInput`` to one ``(B, out_dim)`` vector
per stage; each stage's towers then read that vector as their ``flat`` input (the fields,
numerics and sequences stay available to towers such as DeepFM and DIN). Gated bottoms keep
the batch-mean gate weights of the last forward in ``self.gates`` (stage -> (experts,)) so
training can log them.

``norm: batch`` (default ``none``) ends each expert (and the shared bottom's MLP) with a
BatchNorm over the rows, so the gate mixes centred experts. A bottom's output is otherwise the
ReLU layer of its experts, non-negative with a large common mean, so a tower unit's
pre-activation has nearly the same sign on every row and a push that is the same on every row
switches whole units off for all rows at once (a narrow conditional tower under MMoE on
Census lost all its units on some seeds). The default fix of that is the heads' start at the
stage base rates (funnel/training/priors.py); ``norm: batch`` is a further guard.

- ``shared_bottom``: one MLP shared by every stage ("split at the last layer").
- ``mmoe`` (Ma et al. 2018): shared experts and one softmax gate per stage.
- ``ple`` (Tang et al. 2020): per-stage and shared experts in one or more extraction layers;
  each stage's gate mixes its own and the shared experts, the shared gate (all experts)
  feeds the next layer's shared input.
- ``dupn`` (Ni et al. 2018): one user vector u from the behaviour history (LSTM, then
  attention queried by the context fields; funnel/models/towers/dupn.py), shared by every
  stage: each tower reads ``[flat, u]`` as its ``flat``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from funnel.errors import ConfigError
from funnel.models.inputs import InputShape, TowerInput
from funnel.models.towers.dupn import user_model, user_vector
from funnel.models.towers.mlp import mlp_layers
from funnel.registry import Registry, argument_problems
from funnel.spec.schema import TowerSpec

BOTTOMS: Registry[type[nn.Module]] = Registry("bottom", "funnel.bottom.type")
register_bottom = BOTTOMS.register
NORMS = ("batch", "none")


class BatchCentre(nn.BatchNorm1d):
    """BatchNorm1d that normalises a one-row training batch by the running statistics (where
    BatchNorm1d raises): the last batch of an epoch may hold a single row."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def centred_mlp(
    width: int, hidden: Sequence[int], activation: str, dropout: float, norm: str
) -> tuple[nn.Sequential, int]:
    """:func:`mlp_layers`, ended by a :class:`BatchCentre` for ``norm: batch``."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    layers, out_dim = mlp_layers(width, hidden, activation, dropout)
    if norm == "batch" and len(layers):
        layers.append(BatchCentre(out_dim))
    return layers, out_dim


@register_bottom("shared_bottom")
class SharedBottom(nn.Module):
    def __init__(
        self,
        shape: InputShape,
        stages: Sequence[str],
        hidden: Sequence[int] = (256, 128),
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
    ):
        super().__init__()
        self.stages = list(stages)
        self.layers, self.out_dim = centred_mlp(shape.flat_dim, hidden, activation, dropout, norm)
        self.gates: dict[str, Tensor] = {}

    def forward(self, x: TowerInput) -> dict[str, Tensor]:
        h = self.layers(x.flat)
        return {s: h for s in self.stages}


class Experts(nn.Module):
    """``n`` MLP experts over the same input: (B, in) -> (B, n, out)."""

    def __init__(self, n: int, width: int, hidden: Sequence[int], activation: str, dropout: float, norm: str = "none"):
        super().__init__()
        if n < 1:
            raise ValueError(f"the number of experts must be >= 1, got {n}")
        if not hidden:
            raise ValueError("expert_hidden must list at least one layer size, e.g. [128, 64]")
        nets = [centred_mlp(width, hidden, activation, dropout, norm) for _ in range(n)]
        self.nets = nn.ModuleList(net for net, _ in nets)
        self.out_dim = nets[0][1]

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([net(x) for net in self.nets], 1)


def _mix(gate: nn.Linear, x: Tensor, experts: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax gate over the experts: (B, E) weights, (B, out) mixture."""
    w = torch.softmax(gate(x), -1)
    return (w.unsqueeze(-1) * experts).sum(1), w


@register_bottom("mmoe")
class MMoE(nn.Module):
    def __init__(
        self,
        shape: InputShape,
        stages: Sequence[str],
        experts: int = 4,
        expert_hidden: Sequence[int] = (128, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
    ):
        super().__init__()
        self.stages = list(stages)
        self.experts = Experts(experts, shape.flat_dim, expert_hidden, activation, dropout, norm)
        self.gate = nn.ModuleDict({_key(s): nn.Linear(shape.flat_dim, experts) for s in self.stages})
        self.out_dim = self.experts.out_dim
        self.gates: dict[str, Tensor] = {}

    def forward(self, x: TowerInput) -> dict[str, Tensor]:
        e = self.experts(x.flat)  # (B, E, out)
        out = {}
        for s in self.stages:
            out[s], w = _mix(self.gate[_key(s)], x.flat, e)
            self.gates[s] = w.detach().mean(0)
        return out


class _Extraction(nn.Module):
    """One PLE extraction layer (a CGC): per-stage and shared experts, one gate per stage (+ shared)."""

    def __init__(
        self,
        stages: list[str],
        width: int,
        shared: int,
        specific: int,
        hidden: Sequence[int],
        activation: str,
        dropout: float,
        last: bool,
        norm: str = "none",
    ):
        super().__init__()
        self.stages = stages
        self.shared = Experts(shared, width, hidden, activation, dropout, norm)
        self.specific = nn.ModuleDict(
            {_key(s): Experts(specific, width, hidden, activation, dropout, norm) for s in stages}
        )
        self.gate = nn.ModuleDict({_key(s): nn.Linear(width, shared + specific) for s in stages})
        self.shared_gate = None if last else nn.Linear(width, shared + specific * len(stages))
        self.out_dim = self.shared.out_dim

    def forward(
        self, inputs: dict[str, Tensor], shared_in: Tensor
    ) -> tuple[dict[str, Tensor], Tensor | None, dict[str, Tensor]]:
        shared = self.shared(shared_in)
        own = {s: self.specific[_key(s)](inputs[s]) for s in self.stages}
        out, gates = {}, {}
        for s in self.stages:
            out[s], gates[s] = _mix(self.gate[_key(s)], inputs[s], torch.cat([own[s], shared], 1))
        shared_out = None
        if self.shared_gate is not None:
            shared_out, _ = _mix(self.shared_gate, shared_in, torch.cat([*own.values(), shared], 1))
        return out, shared_out, gates


@register_bottom("ple")
class PLE(nn.Module):
    def __init__(
        self,
        shape: InputShape,
        stages: Sequence[str],
        layers: int = 1,
        shared_experts: int = 1,
        specific_experts: int = 1,
        expert_hidden: Sequence[int] = (128, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
    ):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.stages = list(stages)
        widths = [shape.flat_dim] + [int(expert_hidden[-1])] * layers if expert_hidden else [shape.flat_dim]
        self.layers = nn.ModuleList(
            _Extraction(
                self.stages,
                widths[i],
                shared_experts,
                specific_experts,
                expert_hidden,
                activation,
                dropout,
                last=i == layers - 1,
                norm=norm,
            )
            for i in range(layers)
        )
        self.out_dim = self.layers[-1].out_dim
        self.gates: dict[str, Tensor] = {}

    def forward(self, x: TowerInput) -> dict[str, Tensor]:
        inputs, shared = {s: x.flat for s in self.stages}, x.flat
        for layer in self.layers:
            inputs, shared, gates = layer(inputs, shared)
        self.gates = {s: w.detach().mean(0) for s, w in gates.items()}  # the last layer's gates
        return inputs


@register_bottom("dupn")
class DUPNBottom(nn.Module):
    """The DUPN user vector, computed once for all stages: (B, flat_dim + lstm_hidden) per stage."""

    def __init__(
        self,
        shape: InputShape,
        stages: Sequence[str],
        sequence: str | None = None,
        query: Sequence[str] | None = None,
        lstm_hidden: int = 32,
        lstm_layers: int = 1,
        attention: int = 32,
    ):
        super().__init__()
        self.stages = list(stages)
        self.sequence, self.query_fields, self.user = user_model(
            shape, sequence, query, lstm_hidden, lstm_layers, attention
        )
        self.out_dim = shape.flat_dim + int(lstm_hidden)
        self.gates: dict[str, Tensor] = {}

    def forward(self, x: TowerInput) -> dict[str, Tensor]:
        h = torch.cat([x.flat, user_vector(self.user, self.sequence, self.query_fields, x)], 1)
        return {s: h for s in self.stages}


def _key(stage: str) -> str:
    return "m_" + stage.replace(".", "_dot_")


def bottom_problems(spec: TowerSpec | None, path: str = "funnel.bottom") -> list[str]:
    """Check a bottom spec against the registered constructor's signature."""
    if spec is None or spec.type == "none":
        return []
    if spec.type not in BOTTOMS:
        return [BOTTOMS.unknown(spec.type) + " Or `none` for no shared bottom."]
    return argument_problems(BOTTOMS.get(spec.type), spec.kwargs, 3, path, f"bottom {spec.type!r}")


def build_bottom(spec: TowerSpec | None, shape: InputShape, stages: Sequence[str]) -> nn.Module | None:
    if spec is None or spec.type == "none":
        return None
    try:
        return BOTTOMS.get(spec.type)(shape, stages, **spec.kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"funnel.bottom: {spec.type!r} rejected its arguments: {exc}") from exc
