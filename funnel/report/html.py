"""One self-contained HTML page of one or more runs: every image embedded as a PNG data URI,
no script, no external asset; every text from a run is escaped.

Per stage: the metrics table (metrics.json's values, formatted as they are stored), the curves,
the reliability diagrams, the score distribution; before the stages, the funnel chart. Several
runs stand side by side: one column per run in every grid and every table.
"""

from __future__ import annotations

import base64
import html
import math
import struct
from collections.abc import Callable, Iterable
from typing import Any

from funnel.report import plots
from funnel.report.bins import Bins, reliability
from funnel.report.gather import RunData, funnel_counts

METRIC_ORDER = (
    "auc",
    "auc_cond",
    "logloss",
    "calib",
    "auc_cond_es",
    "calib_cond_es",
    "mae_cond_es",
    "auc_free",
    "oracle_auc",
    "oracle_auc_cond",
    "oracle_auc_cond_es",
    "oracle_logloss",
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ccc; margin-top: 2rem; }
h3 { font-size: 1rem; margin: 1.2rem 0 0.4rem; }
.meta { color: #555; margin-top: 0; }
.grid { display: grid; gap: 0.8rem; }
figure { margin: 0; } figcaption { font-size: 0.8rem; color: #555; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.4rem 0; }
th, td { border: 1px solid #ddd; padding: 0.2rem 0.5rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f4f4f4; }
details { font-size: 0.8rem; } summary { cursor: pointer; color: #555; }
nav a { margin-right: 0.8rem; }
"""


def fmt(value: Any) -> str:
    """A metric as metrics.json stores it: floats by their shortest round-trip form, null as n/a."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return str(value)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header chunk."""
    return struct.unpack(">II", data[16:24])


def _img(data: bytes, alt: str) -> str:
    width, height = png_size(data)
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<img src="{src}" width="{width}" height="{height}" alt="{html.escape(alt)}">'


def _grid(runs: list[RunData], cell: Callable[[RunData], str]) -> str:
    cells = "".join(f"<figure>{cell(r)}<figcaption>{html.escape(r.name)}</figcaption></figure>" for r in runs)
    return f'<div class="grid" style="grid-template-columns: repeat({len(runs)}, minmax(0, 1fr))">{cells}</div>'


def _table(head: Iterable[str], rows: Iterable[Iterable[str]], cls: str) -> str:
    """A table of already escaped cells (each a whole ``<td ...>...</td>`` or plain text)."""
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(c if c.startswith("<t") else f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _stage_metrics(runs: list[RunData], stage: str) -> str:
    """Rows: the stage's metrics; columns: every run's metrics.json (and metrics_valid.json)."""
    files = [(r, "metrics.json", r.metrics) for r in runs]
    files += [(r, "metrics_valid.json", r.metrics_valid) for r in runs if r.metrics_valid is not None]
    files.sort(key=lambda f: runs.index(f[0]))
    keys = [k for k in METRIC_ORDER if any(f"{k}/{stage}" in m for _, _, m in files)]
    keys += sorted({k.split("/")[0] for _, _, m in files for k in m if k.endswith(f"/{stage}")} - set(keys))
    head = ["metric"] + [f"{html.escape(r.name)}: {html.escape(str(m.get('split', name)))}" for r, name, m in files]
    rows = []
    for k in keys:
        key = f"{k}/{stage}"
        cells = [html.escape(k)]
        for r, name, m in files:
            attrs = f'data-run="{html.escape(r.name)}" data-file="{name}" data-metric="{html.escape(key)}"'
            cells.append(f"<td {attrs}>{html.escape(fmt(m.get(key)))}</td>")
        rows.append(cells)
    return _table(head, rows, "metrics")


def _bins_table(bins: Bins) -> str:
    head = ["scores", "rows", "mean predicted", "observed rate"] + (
        ["true probability"] if bins.truth is not None else []
    )
    rows = []
    for i in range(len(bins.count)):
        row = [
            f"{bins.lo[i]:.4g} – {bins.hi[i]:.4g}",
            f"{int(bins.count[i]):,}",
            f"{bins.predicted[i]:.4g}",
            f"{bins.observed[i]:.4g}",
        ]
        if bins.truth is not None:
            row.append(f"{bins.truth[i]:.4g}")
        rows.append(row)
    return f"<details><summary>bins</summary>{_table(head, rows, 'bins')}</details>"


def _reliability_cell(bins: Bins, title: str) -> str:
    return _img(plots.reliability(bins, title), f"reliability diagram: {title}") + _bins_table(bins)


def _panels(runs: list[RunData], panels: list[tuple[str, Callable[[RunData], str]]]) -> str:
    """Figures of one run flow two or three to a row, each under its title; several runs give
    one row per panel, a column per run, so that the runs stand side by side."""
    if len(runs) == 1:
        cells = "".join(
            f"<figure><figcaption>{html.escape(title)}</figcaption>{cell(runs[0])}</figure>" for title, cell in panels
        )
        return f'<div class="grid" style="grid-template-columns: repeat(auto-fill, minmax(480px, 1fr))">{cells}</div>'
    return "\n".join(f"<h3>{html.escape(title)}</h3>{_grid(runs, cell)}" for title, cell in panels)


def _stage_panels(runs: list[RunData], stage: str) -> list[tuple[str, Callable[[RunData], str]]]:
    after = runs[0].scores[stage].after

    def path_cell(r: RunData) -> str:
        s = r.scores[stage]
        return _reliability_cell(reliability(s.p, s.label, s.true_p), f"p_{stage}, all rows")

    def cond_cell(r: RunData) -> str:
        s = r.scores[stage]
        m = s.parent
        truth = s.true_cond[m] if s.true_cond is not None else None
        return _reliability_cell(reliability(s.p_cond[m], s.label[m], truth), f"p_{stage}_cond, {after} = 1")

    def es_cell(r: RunData) -> str:
        s = r.scores[stage]
        if s.counterfactual is None:
            return "<p>no counterfactual truth in this run's data</p>"
        bins = reliability(s.p_cond, s.counterfactual, s.true_cond)
        return _reliability_cell(bins, f"p_{stage}_cond, all rows (counterfactual)")

    panels = [
        ("Training and validation curves", lambda r: _img(plots.stage_curves(r, stage), f"{stage}: curves")),
        (f"Reliability of p_{stage} (the path) on all rows", path_cell),
    ]
    if after is not None:
        panels.append((f"Reliability of p_{stage}_cond on the rows where {after} happened", cond_cell))
        if any(r.scores[stage].counterfactual is not None for r in runs):
            title = f"Reliability of p_{stage}_cond on all rows, against the draw had every row reached {after}"
            panels.append((title + " (synthetic truth)", es_cell))
    panels.append(
        (f"Score distribution of p_{stage}", lambda r: _img(plots.histogram(r.scores[stage]), f"{stage}: scores"))
    )
    return panels


def _stage_section(runs: list[RunData], stage: str) -> str:
    after = runs[0].scores[stage].after
    return "\n".join(
        [
            f'<section class="stage" id="stage-{html.escape(stage)}" data-stage="{html.escape(stage)}">',
            f"<h2>Stage {html.escape(stage)}</h2>",
            f'<p class="meta">after: {html.escape(after or "the impression")}</p>',
            _stage_metrics(runs, stage),
            _panels(runs, _stage_panels(runs, stage)),
            "</section>",
        ]
    )


def _counts_table(runs: list[RunData]) -> str:
    stages = runs[0].stages
    head = ["stage"]
    for r in runs:
        name = html.escape(r.name)
        head += [f"{name}: observed", f"{name}: predicted"] + ([f"{name}: truth"] if r.has_truth else [])
    counts = {r.name: funnel_counts(r) for r in runs}
    rows = []
    for stage in stages:
        row = [html.escape(stage)]
        for r in runs:
            c = counts[r.name][stage]
            row += [f"{c['observed']:,.0f}", f"{c['predicted']:,.1f}"] + ([f"{c['truth']:,.1f}"] if r.has_truth else [])
        rows.append(row)
    return _table(head, rows, "counts")


def _meta(r: RunData) -> str:
    of = f" of {r.split_rows:,}" if isinstance(r.split_rows, int) and r.split_rows != r.rows else ""
    truth = "; the data has the synthetic truth" if r.has_truth else ""
    return (
        f"<li><b>{html.escape(r.name)}</b>: <code>{html.escape(str(r.path))}</code>, "
        f"scored on {r.rows:,}{of} rows of the {html.escape(r.split)} split{truth}</li>"
    )


def render(runs: list[RunData], lead: Iterable[str] = (), title: str = "funnel report") -> str:
    """The whole page; ``lead``: sections (HTML) before the runs' own, e.g. a tuning study's."""
    stages = runs[0].stages
    names = ", ".join(r.name for r in runs)
    nav = " ".join(f'<a href="#stage-{html.escape(s)}">{html.escape(s)}</a>' for s in stages)
    body = [
        f"<h1>{html.escape(title)}</h1>",
        *lead,
        f'<ul class="meta">{"".join(_meta(r) for r in runs)}</ul>',
        f"<nav>stages: {nav}</nav>",
        '<section id="funnel"><h2>Funnel and training</h2>',
        "<p>Observed: the rows that reached each stage (Σ labels); predicted: the expected count "
        "(Σ p_&lt;stage&gt;)"
        + ("; truth: Σ of the true probabilities." if any(r.has_truth for r in runs) else ".")
        + "</p>",
        _panels(
            runs,
            [
                ("Funnel", lambda r: _img(plots.funnel_chart(r), "funnel chart")),
                ("Training loss", lambda r: _img(plots.training_loss(r), "training loss")),
            ],
        ),
        _counts_table(runs),
        "</section>",
        *(_stage_section(runs, s) for s in stages),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>funnel report: {html.escape(names)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
