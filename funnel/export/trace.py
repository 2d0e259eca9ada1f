"""Tracing a run's model into a graph, with every reason it cannot be traced turned into a UserError."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from funnel.errors import UserError
from funnel.export.graph import GraphInput

# The fused embeddings cache each width's column and offset index as a torch.tensor built from
# the layout (funnel/models/embedding.py): a constant of the model, correctly baked into the trace.
_CONSTANT_INDEX = r"torch\.tensor results are registered as constants in the trace"
# F.embedding_bag checks in Python that per_sample_weights has the ids' size (a weighted multi-hot
# feature): a check of the trace batch's shapes, not a branch of the computation.
_SHAPE_CHECK = r"Converting a tensor to a Python boolean might cause the trace to be incorrect"
# torch 2.9+ deprecates torch.jit.trace and the TorchScript-based ONNX exporter that export uses;
# both are what `funnel export` is built on, and they still work as documented.
_DEPRECATED = (
    r"`torch\.jit\.trace` is deprecated",
    r"`torch\.jit\.trace_method` is deprecated",
    r"You are using the legacy TorchScript-based ONNX export",
    r"The feature will be removed\. Please remove usage of this function",
)


def example_inputs(inputs: list[GraphInput]) -> tuple[Tensor, ...]:
    """A small valid batch (3 rows, ids 0 = unknown) to trace with: 3 rows and 5 multi-hot ids,
    so that no axis of the trace is 1 or equals another by accident."""
    rows, nnz = 3, 5
    out = []
    for item in inputs:
        if item.name.endswith("__offsets"):
            out.append(torch.tensor([0, 2, 4, nnz]))
            continue
        shape = [rows if a == "batch" else nnz if isinstance(a, str) else a for a in item.shape]
        dtype = torch.int64 if item.dtype == "int64" else torch.float32
        out.append(
            torch.ones(shape, dtype=dtype) if item.name.endswith("__weights") else torch.zeros(shape, dtype=dtype)
        )
    return tuple(out)


@contextlib.contextmanager
def tracing(what: str) -> Iterator[None]:
    """Ignore the understood warnings of tracing; any other TracerWarning (Python control flow on
    a tensor's value, a tensor turned into a number) means the graph would not generalise to
    other inputs, so it is refused, naming ``what``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=_CONSTANT_INDEX, category=torch.jit.TracerWarning)
        warnings.filterwarnings(
            "ignore", message=_SHAPE_CHECK, category=torch.jit.TracerWarning, module=r"torch\.nn\.functional"
        )
        for message in _DEPRECATED:
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        yield
    unsafe = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if unsafe:
        first = str(unsafe[0].message).splitlines()[0]
        raise UserError(
            f"{what} cannot be exported: its forward depends on the values of its inputs in Python "
            f"({first} at {unsafe[0].filename}:{unsafe[0].lineno}), so a traced graph would be wrong for "
            "other inputs. Write that step with tensor operations (e.g. torch.where) to export it."
        )
    for w in caught:  # the rest are not ours to swallow
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
