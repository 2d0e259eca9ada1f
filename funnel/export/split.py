"""Split serving: a run's model as a user graph, run once per request, and an item graph that
scores a batch of candidates with the user's cached state.

user graph
    inputs: the user side's encoded inputs (``cat``, ``num``, ``seq__<name>``, ``bag__<name>__*``
    of the user features, see sides.py), one row per user.
    outputs: the user state: per tower, the user part of its first layer (``user__<tower>__<i>``);
    where a tower needs the whole input (dcn, din, plug-ins, towers under a shared bottom) also
    the user's embeddings (``user__<unit>__flat``, and ``user__<unit>__seq__<name>`` /
    ``__mask__<name>`` for the user's sequences).
item graph
    inputs: the user state (one row, broadcast to every candidate, or one row per candidate),
    then the item side's encoded inputs, one row per candidate.
    outputs: the columns of `funnel predict` for each candidate, as the unsplit graph gives them.

A unit is one set of embedding tables: the shared embeddings (``shared``), or with private
tables (base, esmm_ns) each tower's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from funnel.data.table import CAT, NUM
from funnel.errors import UserError
from funnel.export.graph import GraphInput, output_columns
from funnel.export.sides import Side, side_embeddings
from funnel.export.sides import flat_positions as positions_of
from funnel.export.split_towers import Cut, TowerSplit, split_tower
from funnel.inference import _branch_columns, prediction_columns
from funnel.models.embedding import SharedEmbeddings
from funnel.models.inputs import TowerInput, module_key
from funnel.models.net import FunnelNet

SHARED = "shared"


def funnel_net(model: nn.Module, what: str) -> FunnelNet:
    """The model's FunnelNet, or a UserError saying why it cannot be split."""
    net = getattr(model, "net", None)
    if not isinstance(net, FunnelNet):
        raise UserError(
            f"{what} cannot be split: split serving cuts the towers of a FunnelNet (every built-in model), and "
            "this model is not one. Export it without --split."
        )
    if net.bias is not None and net.bias.active(False):
        raise UserError(
            f"{what} cannot be split: its position-bias tower is kept at inference (keep_at_inference) and reads "
            "each candidate's display position, which the split graphs do not take. Export it without --split."
        )
    return net


class Unit(nn.Module):
    """One set of tables, cut into the user's and the item's, and how to put a whole input back
    together from the two."""

    def __init__(self, name: str, full: SharedEmbeddings, sides: list[Side], towers: dict[str, TowerSplit]):
        super().__init__()
        user, item = sides
        self.name = name
        self.user_emb = side_embeddings(full, user)
        self.item_emb = side_embeddings(full, item)
        self.towers = nn.ModuleDict(towers)
        self.needs_whole = any(t.needs_whole for t in towers.values())
        # the whole flat from [user flat, item flat]; the whole numeric from [user numeric, item numeric]
        order = positions_of(full, user) + positions_of(full, item)
        self.register_buffer("flat_order", torch.tensor(order).argsort(), persistent=False)
        self.register_buffer(
            "num_order", torch.tensor([*user.num_columns, *item.num_columns], dtype=torch.int64).argsort(), False
        )
        self.field_names = list(full.shape.field_dims)
        at, self.user_slices = 0, {}
        for name, dim in self.user_emb.shape.field_dims.items():
            self.user_slices[name] = (at, at + dim)
            at += dim
        self.user_fields_width = at
        self.user_sequences = [name for name, _, _ in self.user_emb.seq_fields]

    def state_names(self) -> list[str]:
        """The user graph's outputs for this unit, in order."""
        names = []
        if self.needs_whole:
            names.append(f"user__{self.name}__flat")
            for s in self.user_sequences:
                names += [f"user__{self.name}__seq__{s}", f"user__{self.name}__mask__{s}"]
        for key, tower in self.towers.items():
            names += [f"user__{key}__{i}" for i in range(tower.n_cached)]
        return names

    def user_state(self, batch: dict[str, Tensor]) -> list[Tensor]:
        xu = self.user_emb(batch)
        out = []
        if self.needs_whole:
            out.append(xu.flat)
            for s in self.user_sequences:
                out += list(xu.sequences[s])
        for tower in self.towers.values():
            out += tower.user(xu)
        return out

    def whole(self, state: dict[str, Tensor], xi: TowerInput) -> TowerInput:
        """The whole tower input of every candidate: the user's embeddings beside the item's."""
        rows = xi.flat.shape[0]
        u = state[f"user__{self.name}__flat"]
        u = u.expand(rows, u.shape[1])  # one user row for every candidate (a no-op with one row each)
        flat = torch.cat([u, xi.flat], 1).index_select(1, self.flat_order)
        numeric = torch.cat([u[:, self.user_fields_width :], xi.numeric], 1).index_select(1, self.num_order)
        fields = {
            n: u[:, self.user_slices[n][0] : self.user_slices[n][1]] if n in self.user_slices else xi.fields[n]
            for n in self.field_names
        }
        sequences = dict(xi.sequences)
        for s in self.user_sequences:
            emb, mask = state.get(f"user__{self.name}__seq__{s}"), state.get(f"user__{self.name}__mask__{s}")
            if emb is not None and mask is not None:  # else no tower reads it (read_state)
                sequences[s] = (emb.expand(rows, *emb.shape[1:]), mask.expand(rows, mask.shape[1]))
        return TowerInput(flat=flat, fields=fields, numeric=numeric, sequences=sequences)


def _complete(batch: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """The side batch with the blocks it has no column in as empty (rows, 0) tensors; ``rows``
    has one entry per row."""
    batch = dict(batch)
    if CAT not in batch:
        batch[CAT] = torch.zeros(rows.shape[0], 0, dtype=torch.int64)
    if NUM not in batch:
        batch[NUM] = torch.zeros(rows.shape[0], 0, dtype=torch.float32)
    return batch


def _row_anchor(batch: dict[str, Tensor], side: Side) -> Tensor:
    """A tensor with one entry per row of the side batch (to size the empty blocks)."""
    first = side.batch_input
    t = batch[first.key]
    return t[1:] if first.shape[0] == "batch+1" else t


class SplitModel(nn.Module):
    """The model's units, towers, heads and composition, shared by the two graphs."""

    def __init__(self, model: nn.Module, sides: list[Side], what: str):
        super().__init__()
        net = funnel_net(model, what)
        self.model = model
        self.net = net
        self.sides = sides
        user, item = sides
        full_of = {SHARED: net.embeddings} if net.shared else dict(net.private.items())
        under_bottom = net.bottom is not None
        self.units = nn.ModuleList()
        self.unit_of: dict[str, int] = {}
        for name, full in full_of.items():
            cut = Cut(
                field_dims=dict(full.shape.field_dims),
                flat={s.name: positions_of(full, s) for s in sides},
                fields={s.name: tuple(f.name for f in s.layout.fields) for s in sides},
                numeric={s.name: s.num_columns for s in sides},
            )
            keys = list(net.towers) if name == SHARED else [name]
            towers = {k: split_tower(net.towers[k], cut, under_bottom) for k in keys}
            for k in keys:
                self.unit_of[k] = len(self.units)
            self.units.append(Unit(name, full, sides, towers))
        self.all_state = [n for unit in self.units for n in unit.state_names()]
        self.state = list(self.all_state)  # what the item graph reads (see keep_state)
        self.stages = list(net.graph.names)
        self.branches = list(_branch_columns(net.graph).values())
        self.outputs = prediction_columns(net.graph)
        self.user_keys, self.item_keys = user.keys(), item.keys()

    def keep_state(self, names: set[str]) -> None:
        """Pass only ``names`` from the user graph to the item graph (a whole tower may not read
        every part of the user's input, e.g. an MLP under a bottom ignores the sequences)."""
        self.state = [n for n in self.all_state if n in names]

    def user_state(self, batch: dict[str, Tensor]) -> list[Tensor]:
        user = self.sides[0]
        batch = _complete(batch, _row_anchor(batch, user))
        every = [t for unit in self.units for t in unit.user_state(batch)]
        keep = set(self.state)
        return [t for n, t in zip(self.all_state, every, strict=True) if n in keep]

    def score(self, state: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
        item = self.sides[1]
        batch = _complete(batch, _row_anchor(batch, item))
        net = self.net
        hidden: dict[str, Tensor] = {}
        for unit in self.units:
            xi = unit.item_emb(batch)
            whole = _memo(lambda unit=unit, xi=xi: unit.whole(state, xi))
            if net.bottom is not None:  # every tower reads its stage's bottom output: whole per candidate
                x = whole()
                per_stage = net.bottom(x)
                for stage, keys in net.stage_towers.items():
                    for key in keys:
                        hidden[key] = net.towers[key](dataclasses.replace(x, flat=per_stage[stage]))
                continue
            for key, tower in unit.towers.items():
                names = [f"user__{key}__{i}" for i in range(tower.n_cached)]
                hidden[key] = tower.item([state[n] for n in names], xi, whole)
        if net.transfer is not None:  # as FunnelNet.edge_logits: parents first
            for stage in net.graph.stages:
                if stage.after is not None:
                    key = module_key(stage.name)
                    hidden[key] = net.transfer[key](hidden[module_key(stage.after)], hidden[key])
        logits = {net.edge_names[k]: net.heads[k](h).squeeze(-1) for k, h in hidden.items()}
        return output_columns(self.model, logits, self.stages, self.branches)


def _memo(make: Callable[[], TowerInput]) -> Callable[[], TowerInput]:
    """``make()`` computed on the first call and reused after (several towers read one whole input)."""
    held: list[TowerInput] = []

    def get() -> TowerInput:
        if not held:
            held.append(make())
        return held[0]

    return get


class UserGraph(nn.Module):
    """user inputs -> the user state (``outputs``)."""

    def __init__(self, split: SplitModel):
        super().__init__()
        self.split = split
        self.keys = split.user_keys

    @property
    def outputs(self) -> list[str]:
        return self.split.state

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.split.user_state(dict(zip(self.keys, tensors, strict=True))))


class ItemGraph(nn.Module):
    """the user state, then the item inputs -> the prediction columns (``outputs``)."""

    def __init__(self, split: SplitModel):
        super().__init__()
        self.split = split
        self.keys = split.item_keys
        self.outputs = split.outputs

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        n = len(self.split.state)
        state = dict(zip(self.split.state, tensors[:n], strict=True))
        batch = dict(zip(self.keys, tensors[n:], strict=True))
        return self.split.score(state, batch)


def read_state(item_graph: ItemGraph, example: tuple[Tensor, ...], what: str) -> set[str]:
    """The user-state inputs the item graph's computation reads (traced once, unused inputs have
    no uses); the others are left out of both graphs, as an ONNX export would drop them."""
    from funnel.export.trace import tracing

    with tracing(what), torch.no_grad():
        traced = torch.jit.trace(item_graph, example, check_trace=False)
    values = list(traced.graph.inputs())[1:]  # after `self`
    return {n for n, v in zip(item_graph.split.state, values, strict=False) if v.uses()}


def state_inputs(user_graph: UserGraph, example_state: list[Tensor]) -> list[GraphInput]:
    """The item graph's inputs that the user graph's outputs fill (first axis: "users")."""
    inputs = []
    for name, t in zip(user_graph.outputs, example_state, strict=True):
        dtype = "bool" if t.dtype == torch.bool else "float32"
        inputs.append(GraphInput(name, name, dtype, ("users", *t.shape[1:])))
    return inputs
