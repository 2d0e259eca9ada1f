"""ONNX: the export graph through the TorchScript-based exporter (opset 17), saved as ``model.onnx``.

Every axis named in the manifest's shapes ("batch", "batch+1", "nnz_<name>") is dynamic. Two ops
funnel's models use have no symbolic in the exporter; they are registered for the duration of an
export: ``diff`` (multi-hot mean pooling divides by the bag lengths, ``offsets.diff()``; 1-D first
differences only, what the pooling uses) as ``offsets[1:] - offsets[:-1]``, and ``expm1`` (ESM²'s
branch composition) as ``exp(x) - 1``, the same to float32 precision for the log-probabilities it
takes (the parity tests hold it to 1e-5).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from funnel.errors import UserError
from funnel.export.graph import ExportGraph, GraphInput
from funnel.export.trace import tracing

log = logging.getLogger(__name__)

FILE = "model.onnx"
OPSET = 17
_INSTALL = "ONNX export needs the optional packages onnx and onnxruntime: pip install 'funnel[export]'."


def require_onnx() -> None:
    """Refuse (before anything is written) when onnx or onnxruntime is not installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError(_INSTALL) from None


def _diff(g: Any, x: Any, n: Any, dim: Any, prepend: Any, append: Any) -> Any:
    def const(v: int) -> Any:
        return g.op("Constant", value_t=torch.tensor([v], dtype=torch.int64))

    axes = const(0)
    return g.op("Sub", g.op("Slice", x, const(1), const(2**62), axes), g.op("Slice", x, const(0), const(-1), axes))


def _expm1(g: Any, x: Any) -> Any:
    return g.op("Sub", g.op("Exp", x), g.op("Constant", value_t=torch.tensor(1.0)))


def _index_add(g: Any, x: Any, dim: Any, index: Any, source: Any, alpha: Any = None) -> Any:
    from torch.onnx import symbolic_helper

    if symbolic_helper._get_tensor_rank(x) != 1 or symbolic_helper._maybe_get_const(dim, "i") != 0:
        raise torch.onnx.errors.SymbolicValueError("index_add is exported for 1-D tensors only", x)
    return g.op("ScatterElements", x, index, source, axis_i=0, reduction_s="add")


# ops funnel's models use that the exporter has no (or, for index_add with repeated indices, no
# correct) symbolic for
_SYMBOLICS = {"aten::diff": _diff, "aten::expm1": _expm1, "aten::index_add": _index_add}


@contextlib.contextmanager
def _symbolics() -> Iterator[None]:
    for name, symbolic in _SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, symbolic, OPSET)
    try:
        yield
    finally:
        for name in _SYMBOLICS:
            torch.onnx.unregister_custom_op_symbolic(name, OPSET)


@contextlib.contextmanager
def _exporter_log_captured() -> Iterator[None]:
    """Hold back what the exporter writes to the process's stderr (on an unsupported operator it
    dumps the whole TorchScript graph there, from C++); it is logged at debug level instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode(errors="replace").strip()
            if text:
                log.debug("the ONNX exporter wrote: %s", text)


def write_onnx(
    graph: ExportGraph, inputs: list[GraphInput], example: tuple[Tensor, ...], path: Path, what: str
) -> None:
    import onnx

    dynamic = {i.name: {k: a for k, a in enumerate(i.shape) if isinstance(a, str)} for i in inputs}
    dynamic |= {name: {0: "batch"} for name in graph.outputs}
    with tracing(what), _symbolics(), _exporter_log_captured(), torch.no_grad():
        try:
            torch.onnx.export(
                graph,
                example,
                str(path),
                input_names=[i.name for i in inputs],
                output_names=graph.outputs,
                dynamic_axes=dynamic,
                opset_version=OPSET,
                dynamo=False,
            )
        except torch.onnx.errors.UnsupportedOperatorError as exc:
            raise UserError(
                f"{what} cannot be exported to ONNX: {str(exc).splitlines()[0]}. "
                "Export it with --format torchscript instead."
            ) from None
        except (RuntimeError, TypeError, ValueError) as exc:
            raise UserError(f"{what} cannot be exported to ONNX: {str(exc).splitlines()[0]}") from None
    onnx.checker.check_model(str(path))


def onnx_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its graph-rewrite notes go to stderr otherwise
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, names: list[str], tensors: tuple[Tensor, ...]) -> list[Tensor]:
    feed = {name: np.ascontiguousarray(t.numpy()) for name, t in zip(names, tensors, strict=True)}
    return [torch.from_numpy(o) for o in onnx_session(path).run(None, feed)]
