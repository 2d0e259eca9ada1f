"""Whether the embedding tables train with sparse row-wise updates: the one place that decides.

``optim.sparse_embeddings: true | false`` is taken as written (``true`` was validated with the
config). ``auto`` (the default) picks sparse updates when the tables hold more than
``optim.sparse_min_rows`` rows in all and the config allows them; otherwise dense Adam. The
reason: a dense step writes a gradient of every row and walks every row of the moments and the
weights, so its time grows with the tables; a sparse step touches the rows a batch looked up,
at most batch x fields of them (measured in docs/performance.md, "Large tables").

Every reader of the choice calls :func:`sparse_tables`: the LightningModule (its optimisers and
whether it steps them by hand), :func:`funnel.training.module.optimizer_params` (the parameter
groups a warm start maps its optimiser state through) and the warm start's same-optimiser check.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from funnel.spec.schema import OptimSpec


@dataclass(frozen=True)
class SparseChoice:
    sparse: bool
    rows: int  # embedding rows of the model's tables, all of them
    why: str  # in words, for the log

    def message(self) -> str:
        kind = "sparse row-wise Adam" if self.sparse else "dense optimiser"
        return f"embedding tables: {self.rows:,} rows: {kind} ({self.why})"


def table_rows(model: nn.Module) -> int:
    return sum(m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding))


def _gradnorm(model: nn.Module) -> bool:
    # the weighting's class, not its config: a model built by hand has no config to ask
    return type(getattr(model, "weighting", None)).__name__ == "GradNormWeighting"


def choose(optim: OptimSpec, model: nn.Module, clip: bool = False) -> SparseChoice:
    """``clip``: the trainer clips gradients (``trainer.gradient_clip_val``), which Lightning
    refuses for optimisers stepped by hand."""
    rows = table_rows(model)
    if optim.sparse_embeddings != "auto":
        return SparseChoice(
            bool(optim.sparse_embeddings), rows, f"optim.sparse_embeddings: {str(optim.sparse_embeddings).lower()}"
        )
    blockers = [
        text
        for text, blocked in (
            (f"optim.name is {optim.name}, not adam", optim.name != "adam"),
            ("optim.weight_decay is not 0", bool(optim.weight_decay)),
            ("loss_weighting gradnorm needs dense table gradients", _gradnorm(model)),
            ("trainer.gradient_clip_val is set", clip),
        )
        if blocked
    ]
    if rows <= optim.sparse_min_rows:
        return SparseChoice(
            False, rows, f"optim.sparse_embeddings: auto, at most optim.sparse_min_rows={optim.sparse_min_rows:,}"
        )
    if blockers:
        return SparseChoice(False, rows, f"optim.sparse_embeddings: auto, but {'; '.join(blockers)}")
    return SparseChoice(
        True, rows, f"optim.sparse_embeddings: auto, above optim.sparse_min_rows={optim.sparse_min_rows:,}"
    )


def sparse_tables(optim: OptimSpec, model: nn.Module, clip: bool = False) -> bool:
    """Whether ``model``'s embedding tables get sparse gradients and LazyAdam under ``optim``."""
    return choose(optim, model, clip).sparse
