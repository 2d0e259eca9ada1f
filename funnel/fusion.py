"""Inference-only rewrites of a loaded model: each Linear followed by a ReLU becomes one oneDNN call.

`funnel predict` spends most of its time in the towers' matrix products. Eager PyTorch runs a
``Linear`` then a ``ReLU`` as three passes over the activations (the bias copied into the
output, the product, the ReLU); oneDNN's fused linear (the kernel ``torch.compile`` uses on
CPUs) does it in one. Measured on the benchmark model's towers (one thread, 4096 rows):
1.4x in float32, 1.2x in bfloat16. The float32 results differ from the eager path by rounding
only (a different summation order: about 1e-7).

The kernel is a private PyTorch op, so it is used only when it exists and, on a small input,
gives what the eager layers give; otherwise the model is left as it was. The rewritten model
is for scoring under ``torch.inference_mode`` only: it has no autograd path and its state dict
differs from the checkpoint's.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


def _fused(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu", [], "")


class LinearReLU(nn.Module):
    """``relu(linear(x))`` as one oneDNN call on 2-D inputs. The input is cast to the weight's
    dtype first, as autocast would (bfloat16 weights: ``dense_layers_to_bf16``)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight.detach()  # (out, in)
        self.bias = None if linear.bias is None else linear.bias.detach()  # (out,)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.weight.dtype)
        if x.dim() != 2:  # the kernel is checked on (B, in) inputs only
            return F.relu(F.linear(x, self.weight, self.bias))
        return _fused(x.contiguous(), self.weight, self.bias)


@functools.cache
def fusion_works(dtype: torch.dtype) -> bool:
    """Whether the fused kernel exists here and agrees with the eager layers on a small input."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((64, 48), (40, 48), (40,)))
    try:
        with torch.inference_mode():
            got, want = _fused(x, w, b).float(), F.relu(F.linear(x, w, b)).float()
    except RuntimeError as exc:  # a build without the op's CPU kernel
        log.debug("fused linear unavailable (%s): eager layers", exc)
        return False
    tol = 1e-4 if dtype == torch.float32 else 0.05  # bf16: the kernel may round once less
    return got.shape == want.shape and bool(torch.allclose(got, want, atol=tol, rtol=tol))


def fuse_linear_relu(model: nn.Module) -> int:
    """Replace, in every ``nn.Sequential`` of ``model`` (in place), each ``Linear`` directly
    followed by a ``ReLU`` with one :class:`LinearReLU` (the ReLU slot becomes an Identity, so
    positions stay). Returns how many pairs were fused (0 where the kernel is unavailable)."""
    fused = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            linear, act = seq[i], seq[i + 1]
            if type(linear) is nn.Linear and type(act) is nn.ReLU and fusion_works(linear.weight.dtype):
                seq[i], seq[i + 1] = LinearReLU(linear), nn.Identity()
                fused += 1
    return fused
