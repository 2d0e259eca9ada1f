"""Lazy Adam for embedding tables with sparse gradients: the rows a batch touched are updated.

The arithmetic of ``torch.optim.SparseAdam`` (moments and weights of the touched rows only,
bias correction by the optimiser's step count), written as row gathers and one
``index_add_`` per table instead of SparseAdam's chain of sparse-tensor constructions. Its
work is proportional to the rows a batch touched, never to the table: at batch 4096 its step
takes as long on 40M rows as on 0.4M (docs/performance.md, "Large tables").
On the speed issue's workload at batch 1024 it took ``optim.sparse_embeddings`` from 43,847
to 53,126 samples/s (``benchmarks/throughput.py``). In the bare loop of
``benchmarks/embedding_update.py`` it was 4% and 15% faster than SparseAdam in two runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from funnel.models import huge_pages


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
        if rows.numel() == 0:
            return
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        m = exp_avg.index_select(0, rows).lerp_(g, 1 - beta1)  # beta1 * m + (1 - beta1) * g
        v = exp_avg_sq.index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        exp_avg.index_copy_(0, rows, m)
        exp_avg_sq.index_copy_(0, rows, v)
        step = state["step"]
        step_size = lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
        p.index_add_(0, rows, m.div_(v.sqrt_().add_(eps)), alpha=-step_size)


def touched_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """The unique rows of a sparse gradient and their summed gradient rows: (U,), (U, E).

    An uncoalesced gradient (the lookup's (id, row) pairs) is summed by ``torch.unique`` and one
    ``index_add_`` into U rows rather than by ``coalesce()``: 1.6 + 8.7 ms against 13.3 ms for
    batch 4096 x 20 fields on 4M rows (52,847 unique of 81,920), and never a pass over the table."""
    if grad.is_coalesced():
        return grad.indices()[0], grad.values()
    ids, values = grad._indices()[0], grad._values()
    rows, inverse = torch.unique(ids, return_inverse=True)
    return rows, values.new_zeros((rows.numel(), *values.shape[1:])).index_add_(0, inverse, values)
