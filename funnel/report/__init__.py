"""`funnel report`: one self-contained HTML page of a run, or of several runs side by side.

    funnel report runs/esmm/20261201-120000                 # -> that folder's report.html
    funnel report runs/compare/esmm-20261201-120000         # a `funnel compare` folder: its models
    funnel report RUN_A RUN_B --out a-vs-b.html
    funnel report runs/esmm_tune/tune-20261201-120000       # a `funnel tune` folder: the study, its best trials

Needs matplotlib (``pip install 'funnel[report]'``). The pieces: ``gather`` reads and re-scores a
run, ``bins`` computes reliability bins, ``plots`` draws the figures, ``html`` assembles the page.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from funnel.atomic import write_text
from funnel.errors import UserError

log = logging.getLogger(__name__)

REPORT = "report.html"
INSTALL = "pip install 'funnel[report]'"


def require_matplotlib() -> None:
    """Raise a UserError saying how to install matplotlib, when it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(f"funnel report draws its figures with matplotlib, which is not installed: {INSTALL}") from None


def resolve_runs(paths: list[str | Path]) -> list[tuple[str, Path]]:
    """(name, run directory) for every path: a run, or a `funnel compare` folder (its first seed
    of every model, named by the model). Anything else is refused, naming it."""
    from funnel.report.gather import is_run

    found: list[tuple[str, Path]] = []
    for raw in paths:
        path = Path(raw)
        if is_run(path) or (path / "config.yaml").is_file():  # gather says what an unfinished run lacks
            found.append((path.name, path))
            continue
        runs = sorted(p for p in path.iterdir() if is_run(p)) if path.is_dir() else []
        if not runs:
            why = "does not exist" if not path.exists() else "is neither a finished run nor a `funnel compare` folder"
            raise UserError(
                f"{str(path)!r} {why} (a run has config.yaml and metrics.json). "
                "Pass the folder `funnel fit` or `funnel compare` printed."
            )
        first: dict[str, tuple[int, Path]] = {}
        for run in runs:  # compare names its runs <model>-seed<k>
            match = re.fullmatch(r"(.+)-seed(\d+)", run.name)
            model, seed = (match.group(1), int(match.group(2))) if match else (run.name, 0)
            if model not in first or seed < first[model][0]:
                first[model] = (seed, run)
        order = _compared_models(path)  # the order of --models, else by name
        models = sorted(first, key=lambda m: (order.index(m) if m in order else len(order), m))
        found += [(model, first[model][1]) for model in models]
    names = [n for n, _ in found]
    return [(f"{p.parent.name}/{n}" if names.count(n) > 1 else n, p) for n, p in found]


def _compared_models(folder: Path) -> list[str]:
    """The models of a `funnel compare` folder in the order they were given ([] without one)."""
    try:
        runs = json.loads((folder / "compare.json").read_text()).get("runs", {})
    except (OSError, ValueError, AttributeError):
        return []
    return list(runs) if isinstance(runs, dict) else []


def report(
    paths: list[str | Path], out: str | Path | None = None, max_rows: int | None = None, trust_plugins: bool = False
) -> Path:
    """Write the report of the runs in ``paths`` to ``out`` (default: the one folder's report.html)."""
    require_matplotlib()
    if not paths:
        raise UserError("report: give a run directory (or several, or a `funnel compare` folder).")
    if max_rows is not None and max_rows < 1:
        raise UserError(f"--rows must be >= 1, got {max_rows}.")
    if out is None:
        if len(paths) > 1:
            raise UserError("report: with several folders give --out FILE.html for the report.")
        out = Path(paths[0]) / REPORT
    if Path(out).suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--out: {str(out)!r} must be an .html file.")
    from funnel.report import html, study
    from funnel.report.gather import MAX_ROWS, gather

    lead, title = [], "funnel report"
    if len(paths) == 1 and study.is_study(Path(paths[0])):  # a `funnel tune` folder: its best trials
        found = study.read_study(Path(paths[0]))
        runs = study.best_runs(found, Path(paths[0]))
        lead, title = [study.section(found)], "funnel tune report"
    else:
        runs = resolve_runs(paths)

    data = [gather(p, name, max_rows or MAX_ROWS, trust_plugins) for name, p in runs]
    stages = data[0].stages
    for d in data[1:]:
        if d.stages != stages:
            raise UserError(
                f"report: {d.path} has the stages {', '.join(d.stages)}, {data[0].path} has {', '.join(stages)}; "
                "runs side by side need the same funnel."
            )
    path = write_text(out, html.render(data, lead, title))
    log.info("report of %d run(s) written to %s", len(data), path)
    return path
