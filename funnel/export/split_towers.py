"""Each tower cut into a part computed once per user and a part computed per candidate.

A tower's first layer that is linear in its input z splits exactly: when z = z_u + z_i (the user's
columns and the item's, zero elsewhere), ``W z + b = (W_u z_u + b) + W_i z_i``; the user part is
computed once per request and the item part multiplies only the item's columns. Per tower:

- ``mlp``: the first layer over ``flat``.
- ``deepfm``: the deep part's first layer, and the FM bi-interaction, whose sums split too:
  ``½[(S_u + S_i)² − Q_u − Q_i]`` with S the sum of a side's field vectors and Q of their squares.
- ``dcn``: the first cross layer's ``W x0`` and (parallel structure) the deep part's first layer;
  the element-wise products and later cross layers need the whole ``x0`` and run per candidate.
- ``field_sum``: the first layer over ``[group sums, other fields, numerics]`` (a group's sum is
  its user members' sum plus its item members').

Any other tower (``din``, a plug-in, every tower under a shared bottom) runs whole per candidate
on the user's cached embeddings (:class:`WholeTower`): exact, and the user's lookups and pooling
are still done once. Register a cut for a tower class with ``@register_split(TowerClass)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from funnel.models.inputs import TowerInput
from funnel.models.towers.dcn import DCNTower
from funnel.models.towers.deepfm import DeepFMTower
from funnel.models.towers.field_sum import FieldSumTower
from funnel.models.towers.mlp import MLPTower


@dataclass(frozen=True)
class Cut:
    """Where each side's columns sit in the whole tower input."""

    field_dims: dict[str, int]  # every field's width, in the whole ``flat``'s order
    flat: dict[str, list[int]]  # side -> positions of its ``flat`` columns in the whole ``flat``
    fields: dict[str, tuple[str, ...]]  # side -> its fields
    numeric: dict[str, tuple[int, ...]]  # side -> its columns of the whole ``numeric``


class TowerSplit(nn.Module):
    """``user(xu)`` -> the tensors cached per user; ``item(cached, xi, whole)`` -> the tower's
    (N, out_dim) output for N candidates, ``whole()`` giving the whole input when it is needed."""

    needs_whole = False  # item() calls whole(): the user's embeddings are passed to the item graph
    n_cached = 0

    def user(self, xu: TowerInput) -> list[Tensor]:
        return []

    def item(self, cached: list[Tensor], xi: TowerInput, whole: Callable[[], TowerInput]) -> Tensor:
        raise NotImplementedError


SPLITS: dict[type, Callable[[nn.Module, Cut], TowerSplit]] = {}


def register_split(tower_class: type) -> Callable:
    def decorator(build: Callable[[nn.Module, Cut], TowerSplit]) -> Callable:
        SPLITS[tower_class] = build
        return build

    return decorator


def split_tower(tower: nn.Module, cut: Cut, under_bottom: bool) -> TowerSplit:
    """The registered cut of ``tower`` (its exact class), else the whole tower per candidate
    (also when the tower has no first linear layer, e.g. ``hidden: []``, or reads a bottom)."""
    build = None if under_bottom else SPLITS.get(type(tower))
    try:
        return build(tower, cut) if build else WholeTower(tower)
    except _NoFirstLinear:
        return WholeTower(tower)


class _NoFirstLinear(Exception):
    pass


def _first_linear(layers: nn.Sequential) -> nn.Linear:
    if not len(layers) or not isinstance(layers[0], nn.Linear):
        raise _NoFirstLinear
    return layers[0]


class SplitLinear(nn.Module):
    """A linear layer over z as a user part (bias included) and an item part."""

    def __init__(self, linear: nn.Linear, user: list[int], item: list[int]):
        super().__init__()
        w = linear.weight.detach()
        self.user_weight = nn.Parameter(w[:, user].clone(), requires_grad=False)
        self.item_weight = nn.Parameter(w[:, item].clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def user(self, z_u: Tensor) -> Tensor:
        return nn.functional.linear(z_u, self.user_weight, self.bias)  # (U, out)

    def item(self, z_i: Tensor, cached: Tensor) -> Tensor:
        return nn.functional.linear(z_i, self.item_weight) + cached  # (N, out)


class WholeTower(TowerSplit):
    needs_whole = True

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def item(self, cached: list[Tensor], xi: TowerInput, whole: Callable[[], TowerInput]) -> Tensor:
        return self.tower(whole())


@register_split(MLPTower)
class MLPSplit(TowerSplit):
    n_cached = 1

    def __init__(self, tower: MLPTower, cut: Cut):
        super().__init__()
        self.first = SplitLinear(_first_linear(tower.layers), cut.flat["user"], cut.flat["item"])
        self.rest = tower.layers[1:]

    def user(self, xu: TowerInput) -> list[Tensor]:
        return [self.first.user(xu.flat)]

    def item(self, cached: list[Tensor], xi: TowerInput, whole: Callable[[], TowerInput]) -> Tensor:
        return self.rest(self.first.item(xi.flat, cached[0]))


@register_split(DeepFMTower)
class DeepFMSplit(TowerSplit):
    n_cached = 3

    def __init__(self, tower: DeepFMTower, cut: Cut):
        super().__init__()
        self.first = SplitLinear(_first_linear(tower.deep), cut.flat["user"], cut.flat["item"])
        self.rest = tower.deep[1:]
        self.width = tower.out_dim - [m for m in tower.deep if isinstance(m, nn.Linear)][-1].out_features
        vectors = tower.numeric_vectors
        self.vectors = nn.ParameterDict()
        for side, cols in cut.numeric.items():
            if vectors is not None and cols:
                self.vectors[side] = nn.Parameter(vectors.detach()[list(cols)].clone(), requires_grad=False)

    def _sums(self, x: TowerInput, side: str) -> tuple[Tensor, Tensor]:
        """The sum of the side's field vectors and the sum of their squares: (B, E) each."""
        vectors = list(x.fields.values())
        if side in self.vectors:
            vectors += list((x.numeric.unsqueeze(-1) * self.vectors[side]).unbind(1))
        if not vectors:  # a side with no field for the FM part adds nothing
            zero = x.flat.new_zeros(x.flat.shape[0], self.width)
            return zero, zero
        v = torch.stack(vectors, 1)  # (B, F_side, E)
        return v.sum(1), v.pow(2).sum(1)

    def user(self, xu: TowerInput) -> list[Tensor]:
        return [self.first.user(xu.flat), *self._sums(xu, "user")]

    def item(self, cached: list[Tensor], xi: TowerInput, whole: Callable[[], TowerInput]) -> Tensor:
        pre, s_u, q_u = cached
        s_i, q_i = self._sums(xi, "item")
        s = s_u + s_i
        return torch.cat([self.rest(self.first.item(xi.flat, pre)), 0.5 * (s.pow(2) - (q_u + q_i))], 1)


@register_split(DCNTower)
class DCNSplit(TowerSplit):
    needs_whole = True  # x0 ⊙ (...) needs the whole x0

    def __init__(self, tower: DCNTower, cut: Cut):
        super().__init__()
        w = tower.cross[0].w
        linear, self.after_first = (w, nn.Identity()) if isinstance(w, nn.Linear) else (w[0], w[1])
        self.first = SplitLinear(linear, cut.flat["user"], cut.flat["item"])
        self.cross_rest = tower.cross[1:]
        self.stacked = tower.stacked
        self.deep = tower.deep
        self.deep_first = (
            None if self.stacked else SplitLinear(_first_linear(tower.deep), cut.flat["user"], cut.flat["item"])
        )
        self.n_cached = 1 if self.stacked else 2

    def user(self, xu: TowerInput) -> list[Tensor]:
        out = [self.first.user(xu.flat)]
        return out if self.deep_first is None else [*out, self.deep_first.user(xu.flat)]

    def item(self, cached: list[Tensor], xi: TowerInput, whole: Callable[[], TowerInput]) -> Tensor:
        x0 = whole().flat
        h = x0 * self.after_first(self.first.item(xi.flat, cached[0])) + x0
        for layer in self.cross_rest:
            h = layer(x0, h)
        if self.deep_first is None:
            return self.deep(h)
        return torch.cat([h, self.deep[1:](self.deep_first.item(xi.flat, cached[1]))], 1)


@register_split(FieldSumTower)
class FieldSumSplit(TowerSplit):
    n_cached = 1

    def __init__(self, tower: FieldSumTower, cut: Cut):
        super().__init__()
        self.parts: dict[str, tuple[list[list[str]], list[str], bool]] = {}
        positions: dict[str, list[int]] = {}
        for side, fields in cut.fields.items():
            mine, at, pos = set(fields), 0, []
            groups, rest = [], []
            for members in tower.groups.values():  # z: the group sums, then the other fields, then numerics
                width = cut.field_dims[members[0]]
                if any(f in mine for f in members):
                    groups.append([f for f in members if f in mine])
                    pos.extend(range(at, at + width))
                at += width
            for f in tower.rest:
                if f in mine:
                    rest.append(f)
                    pos.extend(range(at, at + cut.field_dims[f]))
                at += cut.field_dims[f]
            pos.extend(at + c for c in cut.numeric[side])
            self.parts[side] = (groups, rest, bool(cut.numeric[side]))
            positions[side] = pos
        self.first = SplitLinear(_first_linear(tower.layers), positions["user"], positions["item"])
        self.rest = tower.layers[1:]

    def _z(self, x: TowerInput, side: str) -> Tensor:
        groups, rest, numeric = self.parts[side]
        sums = [torch.stack([x.fields[f] for f in members], 0).sum(0) for members in groups]
        return torch.cat([*sums, *(x.fields[f] for f in rest), *([x.numeric] if numeric else [])], 1)

    def user(self, xu: TowerInput) -> list[Tensor]:
        return [self.first.user(self._z(xu, "user"))]

    def item(self, cached: list[Tensor], xi: TowerInput, whole: Callable[[], TowerInput]) -> Tensor:
        return self.rest(self.first.item(self._z(xi, "item"), cached[0]))
