"""TorchScript: the export graph traced with ``torch.jit.trace`` and saved as ``model.pt``.

Tracing (not scripting) works for every model: their forward passes take dicts, dataclasses and
custom autograd functions that ``torch.jit.script`` does not compile, and trace records the
tensor operations they run. Load with ``torch.jit.load(path)`` and call with the inputs in the
manifest's order; the outputs come back as a tuple in its order.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from funnel.errors import UserError
from funnel.export.graph import ExportGraph
from funnel.export.trace import tracing

FILE = "model.pt"


def write_torchscript(graph: ExportGraph, example: tuple[Tensor, ...], path: Path, what: str) -> None:
    with tracing(what), torch.no_grad():
        try:
            # check_trace runs the trace again and compares graphs; the fused lookups' constant
            # offsets make two traces differ in node order, so the outputs are checked instead
            # (see verify in funnel/export/__init__.py)
            traced = torch.jit.trace(graph, example, check_trace=False)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise UserError(f"{what} cannot be traced to TorchScript: {str(exc).splitlines()[0]}") from None
    traced.save(str(path))


def run_torchscript(path: Path, tensors: tuple[Tensor, ...]) -> list[Tensor]:
    with warnings.catch_warnings():
        # torch 2.9+ deprecates TorchScript; loading the file is what this format is for
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning)
        module = torch.jit.load(str(path))
    with torch.no_grad():
        return list(module(*tensors))
