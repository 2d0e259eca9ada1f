"""Building a split export: the two graphs, their trace examples, their manifest, and the check
that the pair gives what the whole model gives, for one user broadcast over many candidates and
for one user row per candidate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from funnel.data.featurizer import Featurizer
from funnel.data.table import BAG, CAT, NUM, SEQ, bag_key, bag_offsets_key, bag_weights_key, seq_key
from funnel.export.graph import ExportGraph, GraphInput
from funnel.export.manifest import numeric_columns, split_manifest
from funnel.export.sides import Side, join_batches, make_sides, parse_split
from funnel.export.split import ItemGraph, SplitModel, UserGraph, funnel_net, read_state, state_inputs
from funnel.export.trace import example_inputs

CHECK_SEED = 20261201


@dataclass(frozen=True)
class Artefact:
    """One graph file to write: its module, its inputs (in order) and the batch it is traced with."""

    file: str
    module: nn.Module
    inputs: list[GraphInput]
    example: tuple[Tensor, ...]


def used_features(featurizer: Featurizer, model: nn.Module, what: str) -> list[str]:
    """The features the model's embeddings read, in feature order (a bias tower's own are not)."""
    net = funnel_net(model, what)
    emb = net.embeddings if net.shared else next(iter(net.private.values()))
    read = set(emb.shape.field_dims) | {c["feature"] for c in numeric_columns(featurizer)}
    return [f.name for f in featurizer.features if f.name in read]


def random_batch(side: Side, rows: int, generator: torch.Generator) -> dict[str, Tensor]:
    """``rows`` rows of valid random inputs of one side: ids of every table, empty and full lists."""
    tables = {t.name: t.rows for t in side.layout.tables}
    lengths = {i.key: i.shape[1] for i in side.inputs if i.key.startswith("seq")}
    out: dict[str, Tensor] = {}
    cats = side.layout.fields_in(CAT)
    if cats:
        out[CAT] = torch.stack([torch.randint(0, tables[f.table], (rows,), generator=generator) for f in cats], 1)
    if side.num_columns:
        out[NUM] = torch.randn(rows, len(side.num_columns), generator=generator)
    for f in side.layout.fields_in(SEQ):
        ids = torch.randint(0, tables[f.table], (rows, lengths[seq_key(f.name)]), generator=generator)
        out[seq_key(f.name)] = ids
    for f in side.layout.fields_in(BAG):
        sizes = torch.randint(0, 4, (rows,), generator=generator)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        nnz = int(offsets[-1])
        out[bag_key(f.name)] = torch.randint(0, tables[f.table], (nnz,), generator=generator)
        out[bag_offsets_key(f.name)] = offsets
        if f.weighted:
            out[bag_weights_key(f.name)] = torch.rand(nnz, generator=generator) + 0.5
    return out


def build_split(
    featurizer: Featurizer,
    model: nn.Module,
    whole: ExportGraph,
    split: str | list[str],
    manifest: dict[str, Any],
    seq_lengths: dict[str, int],
    suffix: str,
    what: str,
) -> tuple[list[Artefact], dict[str, Any], Callable]:
    """The user and item artefacts, the split manifest, and ``check(run) -> worst difference``
    (``run(artefact, tensors)``: an exported file's outputs) against the whole model."""
    user_names = parse_split(split) if isinstance(split, str) else list(split)
    sides = make_sides(featurizer, used_features(featurizer, model, what), user_names, seq_lengths)
    user_side, item_side = sides
    cut = SplitModel(model, sides, what).eval()
    user_graph, item_graph = UserGraph(cut).eval(), ItemGraph(cut).eval()
    user_inputs, item_side_inputs = list(user_side.inputs), list(item_side.inputs)
    user_example = example_inputs(user_inputs)
    with torch.no_grad():
        state = [t[:1] for t in user_graph(*user_example)]  # one user, broadcast to the candidates
    item_example = example_inputs(item_side_inputs)
    cut.keep_state(read_state(item_graph, (*state, *item_example), what))
    with torch.no_grad():
        state = [t[:1] for t in user_graph(*user_example)]
    item_inputs = state_inputs(user_graph, state) + item_side_inputs
    artefacts = [
        Artefact(f"user{suffix}", user_graph, user_inputs, user_example),
        Artefact(f"item{suffix}", item_graph, item_inputs, (*state, *item_example)),
    ]
    state_shapes = [(i.name, i.dtype, list(i.shape)) for i in item_inputs[: len(state)]]
    out_shapes = [(n, "float32", ["batch"]) for n in item_graph.outputs]
    manifest = split_manifest(
        manifest,
        featurizer,
        {"user": list(user_side.features), "item": list(item_side.features)},
        {
            "user": (artefacts[0].file, user_inputs, [(n, d, ["batch", *s[1:]]) for n, d, s in state_shapes]),
            "item": (artefacts[1].file, item_inputs, out_shapes),
        },
    )

    def check(run: Callable[[Artefact, tuple[Tensor, ...]], list[Tensor]]) -> float:
        gen = torch.Generator().manual_seed(CHECK_SEED)
        worst = 0.0
        for users, candidates in ((1, 5), (6, 6)):  # one user for 5 candidates; a user row per candidate
            user, items = random_batch(user_side, users, gen), random_batch(item_side, candidates, gen)
            rows = join_batches(sides, user, items)
            with torch.no_grad():
                want = whole(*(rows[k] for k in whole.keys))
            got_state = run(artefacts[0], tuple(user[i.key] for i in user_inputs))
            got = run(artefacts[1], (*got_state, *(items[i.key] for i in item_side_inputs)))
            worst = max(worst, *((g - w).abs().max().item() for g, w in zip(got, want, strict=True)))
        return worst

    return artefacts, manifest, check
