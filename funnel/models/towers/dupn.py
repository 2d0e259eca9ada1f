"""DUPN-style user representation (Ni et al., KDD 2018): behaviour sequence → LSTM → attention.

The behaviour history h_1..h_L (a ``sequence`` feature, oldest first) runs through an LSTM,
giving one state s_k per valid position. An attention net scores every state against a query
q built from the other fields (the user and candidate context),

    a_k = softmax_k( wᵀ tanh(W_s s_k + W_q q + b) )   over the valid positions only,

and the user vector u = Σ_k a_k s_k joins ``flat`` as the MLP input: MLP([flat, u]).

Padding never reaches the result. Sequences arrive right-aligned (padding first, newest
last; see ``funnel/data/list_encoders.py``), so the valid items are first moved to the front
in their order (one scatter, any mask works); the LSTM then reads them before any padding,
its states at valid positions are exact, and the attention masks the rest. A row without any
history gets u = 0. No ``pack_padded_sequence``: the graph traces and exports.

The paper learns one user vector shared by all its tasks. As a tower (``funnel.tower: {type:
dupn}``) each stage has its own LSTM and attention (every stage gets one of the same shape, not
the same weights). As a bottom (``funnel.bottom: {type: dupn}``, in funnel/models/bottoms.py)
one ``UserRepresentation`` computes ``[flat, u]`` once and hands it to every stage's tower as
its ``flat``: the paper's shared user vector, at one LSTM's cost instead of one per stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from funnel.errors import did_you_mean
from funnel.models.inputs import InputShape, TowerInput
from funnel.models.towers import register_tower
from funnel.models.towers.din import history_feature
from funnel.models.towers.mlp import mlp_layers


def valid_first(keys: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keys (B, L, E), mask (B, L) -> the same with every row's valid items moved to the front
    in their order and the padding, zeroed, after them; and the matching mask."""
    m = mask.long()
    n_valid = m.sum(1, keepdim=True)  # (B, 1)
    # valid item k goes to (number of valid items before it); padding after all valid ones
    pos = torch.where(mask, m.cumsum(1) - 1, n_valid + (1 - m).cumsum(1) - 1)  # (B, L) a permutation
    moved = torch.zeros_like(keys).scatter(1, pos.unsqueeze(-1).expand_as(keys), keys * mask.unsqueeze(-1))
    return moved, torch.zeros_like(m).scatter(1, pos, m).bool()


class LSTM(nn.Module):
    """A batch-first LSTM written out step by step (the gates of ``nn.LSTM``, zero initial state):
    (B, L, E) -> (B, L, H) states. ``nn.LSTM`` traces, but its Python shape checks raise
    TracerWarnings and its ONNX conversion warns on every export, both of which ``funnel export``
    refuses; this one traces into plain matrix products, unrolled over the fixed ``max_len``."""

    def __init__(self, width: int, hidden: int, layers: int = 1):
        super().__init__()
        self.hidden = hidden
        self.inputs = nn.ModuleList(nn.Linear(width if k == 0 else hidden, 4 * hidden) for k in range(layers))
        self.recurrent = nn.ModuleList(nn.Linear(hidden, 4 * hidden, bias=False) for _ in range(layers))
        bound = hidden**-0.5  # nn.LSTM's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for inputs, recurrent in zip(self.inputs, self.recurrent, strict=True):
            gates_in = inputs(x)  # (B, L, 4H): every step's input part at once
            h = c = torch.zeros_like(gates_in[:, 0, : self.hidden])  # (B, H), batch axis traced
            states = []
            for t in range(x.shape[1]):
                i, f, g, o = (gates_in[:, t] + recurrent(h)).chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                states.append(h)
            x = torch.stack(states, 1)
        return x


class UserRepresentation(nn.Module):
    """LSTM over the valid behaviours, then attention pooling with a context query: -> (B, H)."""

    def __init__(self, width: int, query_dim: int, lstm_hidden: int, lstm_layers: int, attention: int):
        super().__init__()
        self.lstm = LSTM(width, lstm_hidden, lstm_layers)
        self.state = nn.Linear(lstm_hidden, attention)
        self.query = nn.Linear(query_dim, attention, bias=False)
        self.score = nn.Linear(attention, 1, bias=False)

    def forward(self, keys: torch.Tensor, mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        keys, mask = valid_first(keys, mask)
        states = self.lstm(keys)  # (B, L, H); exact at valid positions, which come first
        hidden = torch.tanh(self.state(states) + self.query(query).unsqueeze(1))  # (B, L, A)
        scores = self.score(hidden).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, L)
        weights = torch.softmax(scores, 1).nan_to_num(0.0)  # a row without history attends to nothing
        return (weights.unsqueeze(-1) * states).sum(1)  # (B, H)


def user_model(
    shape: InputShape,
    sequence: str | None,
    query: Sequence[str] | None,
    lstm_hidden: int,
    lstm_layers: int,
    attention: int,
) -> tuple[str, list[str], UserRepresentation]:
    """The arguments checked against the input shape: (the history feature, the query fields
    (default: every categorical and multi-hot field), the UserRepresentation over them). The
    dupn tower and the dupn bottom both build theirs here."""
    seqs = list(shape.sequence_fields)
    sequence = history_feature(
        shape, sequence, "dupn needs `sequence`: the behaviour-history feature to run the LSTM over"
    )
    others = [f for f in shape.field_dims if f not in seqs]
    query = list(others if query is None else query)
    for name in query:
        if name not in others:
            raise ValueError(
                f"query field {name!r} is not a categorical or multi-hot feature.{did_you_mean(name, others)}"
            )
    if not query:
        raise ValueError("dupn needs at least one `query` field (the user/item context the attention asks with)")
    for name, size in (("lstm_hidden", lstm_hidden), ("lstm_layers", lstm_layers), ("attention", attention)):
        if int(size) < 1:
            raise ValueError(f"{name} must be a positive int, got {size}")
    query_dim = sum(shape.field_dims[f] for f in query)
    return (
        sequence,
        query,
        UserRepresentation(shape.field_dims[sequence], query_dim, lstm_hidden, lstm_layers, attention),
    )


def user_vector(user: UserRepresentation, sequence: str, query: Sequence[str], x: TowerInput) -> torch.Tensor:
    """u (B, H) of the batch ``x``."""
    keys, mask = x.sequences[sequence]
    return user(keys, mask, torch.cat([x.fields[f] for f in query], 1))


@register_tower("dupn")
class DUPNTower(nn.Module):
    def __init__(
        self,
        shape: InputShape,
        sequence: str | None = None,
        query: Sequence[str] | None = None,
        lstm_hidden: int = 32,
        lstm_layers: int = 1,
        attention: int = 32,
        hidden: Sequence[int] = (128, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        super().__init__()
        self.sequence, self.query_fields, self.user = user_model(
            shape, sequence, query, lstm_hidden, lstm_layers, attention
        )
        self.layers, self.out_dim = mlp_layers(shape.flat_dim + lstm_hidden, hidden, activation, dropout, batch_norm)

    def user_vector(self, x: TowerInput) -> torch.Tensor:
        return user_vector(self.user, self.sequence, self.query_fields, x)  # (B, H)

    def forward(self, x: TowerInput) -> torch.Tensor:
        return self.layers(torch.cat([x.flat, self.user_vector(x)], 1))
