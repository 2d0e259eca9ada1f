"""The report's figures, drawn with matplotlib's Agg backend into PNG bytes (no display needed).

matplotlib is an optional extra (``funnel[report]``): :func:`require_matplotlib` says how to
install it, and this module is imported only after that check.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from funnel.report.bins import Bins
from funnel.report.gather import RunData, StageScores, funnel_counts

DPI = 100
SIZE = (5.6, 3.6)  # inches: 560 x 360 pixels at DPI
OBSERVED, PREDICTED, TRUTH, TRAIN, VALID = "#4c72b0", "#dd8452", "#55a868", "#4c72b0", "#c44e52"


def _figure(ncols: int = 1) -> tuple[Figure, list[Axes]]:
    """A figure of ``ncols`` axes. Figures are made without pyplot: no global state, no GUI
    backend, nothing to close; savefig renders with Agg."""
    fig = Figure(figsize=SIZE, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _epoch_series(curves: pd.DataFrame, column: str) -> pd.Series | None:
    """``column`` per epoch (its last value in each epoch), or None when it was never logged."""
    if column not in curves.columns or "epoch" not in curves.columns:
        return None
    values = curves[["epoch", column]].dropna()
    if values.empty:
        return None
    return values.groupby("epoch")[column].last()


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _epochs_axis(ax: Axes) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def training_loss(run: RunData) -> bytes:
    """The total loss: per training step, and per epoch for train and valid."""
    fig, (steps, epochs) = _figure(2)
    c = run.curves
    if "train/loss" in c.columns and "step" in c.columns and c["train/loss"].notna().any():
        rows = c[["step", "train/loss"]].dropna()
        marker = "o-" if len(rows) < 30 else "-"  # a few logged steps must still show
        steps.plot(rows["step"], rows["train/loss"], marker, color=TRAIN, lw=0.8, ms=3)
        steps.set_xlabel("step")
    else:
        _empty(steps, "no step losses logged")
    steps.set_title("train loss per step", fontsize=10)
    drawn = False
    for column, label, color in (("train/loss_epoch", "train", TRAIN), ("val/loss", "valid", VALID)):
        s = _epoch_series(c, column)
        if s is not None:
            epochs.plot(s.index, s.values, "o-", color=color, label=label, ms=3)
            drawn = True
    if drawn:
        _epochs_axis(epochs)
        epochs.legend(fontsize=8)
    else:
        _empty(epochs, "no epoch losses logged")
    epochs.set_title("loss per epoch", fontsize=10)
    return png(fig)


def stage_curves(run: RunData, stage: str) -> bytes:
    """The stage's loss (train and valid) and validation AUCs, per epoch."""
    fig, (loss, auc) = _figure(2)
    c = run.curves
    drawn = False
    for column, label, color in (
        (f"train/loss/{stage}", "train loss", TRAIN),
        (f"val/logloss/{stage}", "valid logloss", VALID),
    ):
        s = _epoch_series(c, column)
        if s is not None:
            loss.plot(s.index, s.values, "o-", color=color, label=label, ms=3)
            drawn = True
    if drawn:
        loss.legend(fontsize=8)
        _epochs_axis(loss)
    else:
        _empty(loss, "no losses logged")
    loss.set_title(f"{stage}: loss", fontsize=10)
    drawn = False
    for key, style in (("auc", "o-"), ("auc_cond", "s-"), ("auc_cond_es", "^-")):
        s = _epoch_series(c, f"val/{key}/{stage}")
        if s is not None and s.notna().any():
            line = auc.plot(s.index, s.values, style, label=key, ms=3)[0]
            oracle = _epoch_series(c, f"val/oracle_{key}/{stage}")
            if oracle is not None and oracle.notna().any():
                auc.plot(oracle.index, oracle.values, "--", color=line.get_color(), lw=0.8, label=f"oracle_{key}")
            drawn = True
    if drawn:
        auc.legend(fontsize=7, loc="best")
        _epochs_axis(auc)
    else:
        _empty(auc, "no AUCs logged")
    auc.set_title(f"{stage}: validation AUC", fontsize=10)
    return png(fig)


def reliability(bins: Bins, title: str) -> bytes:
    """Mean predicted against observed rate per bin (and the truth), with the bins' counts."""
    fig, (ax,) = _figure()
    if bins.rows == 0:
        _empty(ax, "no rows")
        ax.set_title(title, fontsize=10)
        return png(fig)
    top = float(max(bins.predicted.max(), bins.observed.max(), *(bins.truth if bins.truth is not None else [])))
    top = min(1.0, top * 1.08) or 1.0
    counts = ax.twinx()  # drawn first and behind: the counts are context, the curves the point
    width = np.maximum(bins.hi - bins.lo, top / 200)
    counts.bar(bins.lo, bins.count, width=width, align="edge", color="lightgrey", alpha=0.5, edgecolor="white")
    counts.set_ylim(0, bins.count.max() * 3)  # the bars keep to the lowest third, under the curves
    counts.set_ylabel("rows per bin", fontsize=8, color="grey")
    counts.tick_params(labelsize=7, colors="grey")
    ax.set_zorder(counts.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.plot([0, top], [0, top], ":", color="black", lw=0.8, label="ideal")
    ax.plot(bins.predicted, bins.observed, "o-", color=OBSERVED, ms=4, label="observed rate")
    if bins.truth is not None:
        ax.plot(bins.predicted, bins.truth, "s--", color=TRUTH, ms=3, label="true probability")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("rate")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"{title} ({bins.rows:,} rows)", fontsize=10)
    return png(fig)


def histogram(scores: StageScores) -> bytes:
    """p_<stage> of the negative and the positive rows (each normalised), on a log score axis."""
    fig, (ax,) = _figure()
    p = scores.p.astype(np.float64)
    positive = p[p > 0]
    if positive.size == 0:
        _empty(ax, "no scores above 0")
        return png(fig)
    lo, hi = max(float(positive.min()), 1e-7), float(positive.max())
    edges = np.geomspace(lo, hi * 1.0001, 41) if hi > lo else np.array([lo * 0.9, hi * 1.1])
    for label, color, name in ((0, OBSERVED, "label 0"), (1, PREDICTED, "label 1")):
        part = p[(scores.label > 0) == bool(label)]
        if part.size:
            ax.hist(
                np.clip(part, lo, None), bins=edges, histtype="step", density=True, color=color, lw=1.4,
                label=f"{name} ({part.size:,} rows)",
            )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel(f"p_{scores.name}")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.set_title(f"p_{scores.name}: score distribution", fontsize=10)
    return png(fig)


def funnel_chart(run: RunData) -> bytes:
    """Per stage: the rows that reached it (Σ labels) against the expected count (Σ p_<stage>)
    and, with the truth, Σ true probability."""
    fig, (ax,) = _figure()
    rows = funnel_counts(run)
    names = list(rows)
    series = [("observed", OBSERVED), ("predicted", PREDICTED)] + ([("truth", TRUTH)] if run.has_truth else [])
    height = 0.8 / len(series)
    y = np.arange(len(names))
    for k, (key, color) in enumerate(series):
        values = [rows[n][key] for n in names]
        bars = ax.barh(y + k * height, values, height=height, color=color, label=f"{key}")
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=7, padding=2)
    ax.set_yticks(y + height * (len(series) - 1) / 2, names)
    ax.invert_yaxis()  # the first stage on top, as a funnel is read
    most = max((r[k] for r in rows.values() for k, _ in series), default=1.0)
    ax.set_xlim(0, (most or 1.0) * 1.18)
    ax.set_xlabel(f"rows of {run.rows:,} scored")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"funnel: observed vs predicted counts ({run.split})", fontsize=10)
    return png(fig)


def study_values(trials: list[dict], monitor: str, mode: str) -> bytes:
    """A tuning study: each trial's best validation value by trial number (complete, pruned),
    and the best value so far as a step line."""
    fig, (ax,) = _figure()
    shown = [(t["number"], t["value"], t.get("state")) for t in trials if isinstance(t.get("value"), int | float)]
    shown = [(n, v, s) for n, v, s in shown if np.isfinite(v)]
    if not shown:
        _empty(ax, "no trial has a value")
        return png(fig)
    for state, colour, marker in (("complete", OBSERVED, "o"), ("pruned", PREDICTED, "x")):
        pts = [(n, v) for n, v, s in shown if s == state]
        if pts:
            ax.scatter(*zip(*pts, strict=True), color=colour, marker=marker, label=state, zorder=3)
    numbers = [n for n, _, _ in shown]
    values = np.array([v for _, v, _ in shown])
    best = np.maximum.accumulate(values) if mode == "max" else np.minimum.accumulate(values)
    ax.step(numbers, best, where="post", color=TRUTH, label="best so far")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(monitor)
    ax.legend(fontsize="small")
    return png(fig)
