"""`funnel export`: a run as a self-contained ONNX or TorchScript artefact.

OUT/
    model.onnx | model.pt   the graph: encoded tensors in, the prediction columns out (see graph.py)
    encoders.json           the run's fitted encoders (raw values -> the ids and numbers fed in)
    manifest.json           versions, stages, every input's name, dtype, shape and feature order, outputs

With ``--split user=FEATURE,...`` the graph is cut in two (see split.py): ``user.onnx|user.pt``,
run once per request on the user's features, and ``item.onnx|item.pt``, which scores a batch of
candidates from the user state; the manifest then describes both graphs under ``graphs``.

The artefact is written into a temporary folder beside OUT and renamed when complete, and is
checked before that: it is run on a small batch and must give the model's own outputs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from funnel.errors import UserError, did_you_mean
from funnel.export import onnx, torchscript
from funnel.export.graph import ExportGraph, GraphInput, graph_inputs
from funnel.export.manifest import build_manifest
from funnel.export.split_export import Artefact, build_split
from funnel.export.trace import example_inputs
from funnel.runs import ENCODERS, load_run

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
MANIFEST = "manifest.json"
TOLERANCE = 1e-5  # the largest difference between the artefact's outputs and the model's allowed


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {str(out)!r} is a file; give a new or empty folder for the export.")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out: {str(out)!r} is not empty; export never overwrites files. Give a new or empty folder.")


def describe_model(cfg) -> str:
    """``model 'esmm' with tower 'mlp'`` (and the bottom): what an export error names."""
    what = f"model {cfg.funnel.model.type!r} with tower {cfg.funnel.tower.type!r}"
    towers = sorted({s.tower.type for s in cfg.funnel.stages if s.tower is not None} - {cfg.funnel.tower.type})
    if towers:
        what += f" (and {', '.join(map(repr, towers))})"
    if cfg.funnel.bottom is not None:
        what += f" and bottom {cfg.funnel.bottom.type!r}"
    return what


def run_artefact(fmt: str, path: Path, inputs: list[GraphInput], tensors: tuple[torch.Tensor, ...]) -> list:
    """The outputs of an exported file on ``tensors`` (in the manifest's input order)."""
    if fmt == "onnx":
        return onnx.run_onnx(path, [i.name for i in inputs], tensors)
    return torchscript.run_torchscript(path, tensors)


def write_artefact(fmt: str, art: Artefact, folder: Path, what: str) -> None:
    if fmt == "onnx":
        onnx.write_onnx(art.module, art.inputs, art.example, folder / art.file, what)
    else:
        torchscript.write_torchscript(art.module, art.example, folder / art.file, what)


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: str | Path,
    trust_plugins: bool = False,
    split: str | list[str] | None = None,
) -> Path:
    """Export the best checkpoint of ``run_dir`` as ``fmt`` (onnx | torchscript) into the folder
    ``out``; ``split``: the user side's features (``"user=a,b"`` or a list) for a user graph and
    an item graph instead of one."""
    if fmt not in FORMATS:
        raise UserError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}.{did_you_mean(fmt, FORMATS)}")
    out = Path(out)
    _check_out(out)
    if fmt == "onnx":
        onnx.require_onnx()
    run_dir = Path(run_dir)
    cfg, graph, featurizer, model = load_run(run_dir, trust_plugins)
    layout = featurizer.layout()
    lengths = {f.name: featurizer.encoders[f.name].spec.max_len for f in cfg.features if f.kind == "sequence"}
    inputs = graph_inputs(layout, lengths)
    module = ExportGraph(model, inputs).eval()
    what = describe_model(cfg)
    example = example_inputs(inputs)
    file = onnx.FILE if fmt == "onnx" else torchscript.FILE
    manifest = build_manifest(cfg, featurizer, list(graph.names), inputs, module.outputs, fmt, file)
    if split is None:
        artefacts = [Artefact(file, module, inputs, example)]

        def verify(folder: Path) -> None:
            _verify(module, fmt, folder / file, inputs, example, what)

    else:
        suffix = Path(file).suffix
        artefacts, manifest, check = build_split(featurizer, model, module, split, manifest, lengths, suffix, what)

        def verify(folder: Path) -> None:
            worst = check(lambda art, tensors: run_artefact(fmt, folder / art.file, art.inputs, tensors))
            if not worst <= TOLERANCE:
                raise UserError(
                    f"{what}: the split {fmt} graphs give outputs {worst:.2g} away from the whole model's "
                    f"(more than {TOLERANCE:g}); it cannot be split faithfully. Export it without --split."
                )

    made = next((p for p in reversed(out.parents) if not p.exists()), None)  # removed again on failure
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for art in artefacts:
            write_artefact(fmt, art, tmp, what)
        verify(tmp)
        shutil.copyfile(run_dir / ENCODERS, tmp / ENCODERS)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.is_dir():  # empty (checked above): the complete export takes its place
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(made or tmp, ignore_errors=True)
        raise
    log.info("exported %s as %s to %s (%s)", what, fmt, out, ", ".join(a.file for a in artefacts))
    return out


def _verify(module: ExportGraph, fmt: str, path: Path, inputs: list[GraphInput], example: tuple, what: str) -> None:
    """The artefact must reproduce the model's outputs on the trace batch (a wrong trace is refused)."""
    with torch.no_grad():
        want = module(*example)
    got = run_artefact(fmt, path, inputs, example)
    worst = max(((g - w).abs().max().item() for g, w in zip(got, want, strict=True)), default=0.0)
    if not worst <= TOLERANCE:
        raise UserError(
            f"{what}: the exported {fmt} graph gives outputs {worst:.2g} away from the model's own "
            f"(more than {TOLERANCE:g}); it cannot be exported faithfully."
        )
