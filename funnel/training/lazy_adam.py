"""Lazy Adam for embedding tables with sparse gradients: the rows a batch touched are updated.

The arithmetic of ``torch.optim.SparseAdam`` (moments and weights of the touched rows only,
bias correction by the optimiser's step count), written as row gathers and row writes instead
of SparseAdam's chain of sparse-tensor constructions. Its work is proportional to the rows a
batch touched, never to the table.

At 40M rows a batch's ~70k touched rows lie scattered over 8.6 GB (the weight and two
moments), so the step is bound by memory latency, not arithmetic: nearly every row access
misses the caches and the TLB. Three things keep that traffic down (docs/performance.md,
"Close to the machine"):

- the rows are updated in chunks of ``CHUNK_ROWS``: each chunk's weight and moment rows are
  read, updated and written back while their cache lines and page-table entries are still in
  the caches, instead of three gathers over all 70k rows followed by three scatters that miss
  them again; at 40M rows this made the update about 2x faster in a bare loop;
- the weight is written with ``index_select`` + ``add_`` + ``index_copy_`` rather than
  ``index_add_``, whose per-row kernel launch took twice as long;
- the lookup's repeated ids are summed by a stable sort and ``embedding_bag(mode="sum")``
  (one vectorised pass) rather than ``index_add_`` into the unique rows, with the same sums.

The moments are computed exactly as before (``lerp_``, ``mul_`` + ``addcmul_``), chunking does
not change any value, and the state (``step``, ``exp_avg``, ``exp_avg_sq``, each moment the
table's shape) is the same as in every checkpoint funnel has written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from funnel.models import huge_pages

# Rows per chunk: large enough that the ~13 tensor ops per chunk cost little next to the row
# traffic, small enough that a chunk's rows of weight and moments (2048 x 3 x 72 B for E = 18)
# stay in the L2 cache and its pages in the TLB between read and write. 1,024-8,192 were within
# noise of each other in a bare loop at 40M rows; one pass over all rows was about 2x slower.
CHUNK_ROWS = 2048


class LazyAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if lr <= 0 or eps <= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"LazyAdam: need lr > 0, eps > 0 and betas in [0, 1), got {lr}, {eps}, {betas}.")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("LazyAdam takes sparse gradients only (nn.Embedding(..., sparse=True)).")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = huge_pages.zeros_like(p)  # FUNNEL_HUGE_PAGES=1: fewer TLB misses
                    state["exp_avg_sq"] = huge_pages.zeros_like(p)
                state["step"] += 1
                rows, g = touched_rows(p.grad)
                self._update(p, rows, g, state, group["lr"], beta1, beta2, group["eps"])
        return loss

    @staticmethod
    def _update(
        p: Tensor, rows: Tensor, g: Tensor, state: dict, lr: float, beta1: float, beta2: float, eps: float
    ) -> None:
        """Adam on ``p``'s ``rows`` (unique) with their gradient rows ``g``, chunk by chunk."""
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        step = state["step"]
        step_size = lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
        for r, gr in zip(rows.split(CHUNK_ROWS), g.split(CHUNK_ROWS), strict=True):
            m = exp_avg.index_select(0, r).lerp_(gr, 1 - beta1)  # beta1 * m + (1 - beta1) * g
            v = exp_avg_sq.index_select(0, r).mul_(beta2).addcmul_(gr, gr, value=1 - beta2)
            exp_avg.index_copy_(0, r, m)
            exp_avg_sq.index_copy_(0, r, v)
            w = p.index_select(0, r).add_(m.div_(v.sqrt_().add_(eps)), alpha=-step_size)
            p.index_copy_(0, r, w)


def touched_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """The unique rows of a sparse gradient, ascending, and their summed gradient rows: (U,), (U, E).

    An uncoalesced gradient (the lookup's (id, row) pairs) is summed without ``coalesce()`` and
    never with a pass over the table: a stable sort groups each id's rows in their original
    order and ``embedding_bag(mode="sum")`` adds each group in that order, the sums
    ``index_add_`` into the unique rows gives, bit for bit. For batch 4096 x 20 fields at 40M
    rows (70k unique of 81,920) that took 3 ms against 11 ms for ``unique`` + ``index_add_``."""
    if grad.is_coalesced():
        return grad.indices()[0], grad.values()
    ids, values = grad._indices()[0], grad._values()
    if ids.numel() == 0 or values.dim() != 2:
        rows, inverse = torch.unique(ids, return_inverse=True)
        return rows, values.new_zeros((rows.numel(), *values.shape[1:])).index_add_(0, inverse, values)
    sorted_ids, order = torch.sort(ids, stable=True)
    rows, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    return rows, F.embedding_bag(order, values, counts.cumsum(0) - counts, mode="sum")
