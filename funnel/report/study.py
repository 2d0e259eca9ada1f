"""The report of a `funnel tune` study: the trials (their objective by trial, a table of every
trial's values) above the ordinary report of its best trials, side by side.

    funnel tune configs/esmm_tune.yaml --trials 20 --report   # -> STUDY/report.html
    funnel report runs/esmm_tune/tune-20261201-120000          # the same page for a study folder
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from funnel.errors import UserError

STUDY = "study.json"
TOP = 3  # the best trials shown side by side


def is_study(path: Path) -> bool:
    return (path / STUDY).is_file()


def read_study(folder: Path) -> dict[str, Any]:
    try:
        study = json.loads((folder / STUDY).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"report: {folder / STUDY} cannot be read ({exc}); is this a `funnel tune` folder?") from None
    if not isinstance(study, dict) or not isinstance(study.get("trials"), list):
        raise UserError(f"report: {folder / STUDY} has no list of trials; is this a `funnel tune` folder?")
    return study


def ranked(study: dict[str, Any]) -> list[dict[str, Any]]:
    """The trials with a finite value and a run directory, best first (by the study's mode): the
    complete trials, then the pruned ones (their value is of fewer epochs), as the study ranks them."""
    done = [
        t
        for t in study["trials"]
        if isinstance(t.get("value"), int | float) and math.isfinite(t["value"]) and t.get("run_dir")
    ]
    sign = -1 if study.get("mode", "max") == "max" else 1
    return sorted(done, key=lambda t: (t.get("state") != "complete", sign * t["value"]))


def best_runs(study: dict[str, Any], folder: Path, top: int = TOP) -> list[tuple[str, Path]]:
    """(name, run directory) of the ``top`` best trials whose run is complete, best first."""
    from funnel.report.gather import is_run

    out = []
    best = (study.get("best") or {}).get("number")
    for t in ranked(study):
        run = Path(t["run_dir"])
        run = run if run.is_absolute() or run.is_dir() else folder / run.name
        if is_run(run):
            out.append((f"trial {t['number']}" + (" (best)" if t["number"] == best else ""), run))
        if len(out) == top:
            break
    if not out:
        raise UserError(f"report: the study in {folder} has no finished trial with a run to report.")
    return out


def section(study: dict[str, Any]) -> str:
    """The study's part of the page: what was searched, the objective by trial, every trial."""
    from funnel.report import plots
    from funnel.report.html import _img, _table, fmt

    keys = [p["key"] for p in study.get("space", [])]
    monitor, mode = study.get("monitor", "?"), study.get("mode", "max")
    best = study.get("best") or {}
    rows = []
    for t in study["trials"]:
        values = t.get("values") or {}
        cells = [str(t.get("number")), html.escape(str(t.get("state")))]
        cells += [fmt(t.get("value")), str(t.get("epochs", "")), fmt(t.get("seconds"))]
        rows.append(cells + [html.escape(json.dumps(values.get(k))) for k in keys])
    head = ["trial", "state", monitor, "epochs", "seconds", *keys]
    lead = (
        f"<p><code>{html.escape(str(study.get('config')))}</code>: {len(study['trials'])} trial(s), "
        f"objective {html.escape(monitor)} ({'higher' if mode == 'max' else 'lower'} is better, the best "
        f"validation value of each trial), sampler {html.escape(str(study.get('sampler')))}, pruner "
        f"{html.escape(str(study.get('pruner')))}."
        + (
            f" Best: trial {best.get('number')}, {fmt(best.get('value'))}; "
            f"<code>funnel fit {html.escape(str(best.get('config')))}</code> trains it again."
            if best
            else ""
        )
        + "</p>"
    )
    return (
        '<section id="study"><h2>Tuning study</h2>'
        + lead
        + _img(plots.study_values(study["trials"], monitor, mode), "objective by trial")
        + _table(head, rows, "trials")
        + "<p>Below: the best trials' runs side by side.</p></section>"
    )
