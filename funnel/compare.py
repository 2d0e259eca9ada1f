"""`funnel compare`: several models × several seeds on the same splits, as one table.

Every run gets the same config and data (the data seed is the config's, so synthetic
splits are identical); only ``funnel.model`` and the model seed change. For every stage
the table gives mean ± std of the path AUC on all impressions, the conditional AUC on
parent-positive rows, the entire-space conditional AUC against the counterfactual truth
(when known) and the calibration.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from funnel.atomic import write_text
from funnel.errors import UserError
from funnel.spec import load_config
from funnel.training.fit import fit
from funnel.training.preflight import preflight

log = logging.getLogger(__name__)

COLUMNS = ("auc", "auc_cond", "auc_cond_es", "calib", "calib_cond_es")


def compare(
    config: str | Path,
    models: list[str],
    seeds: int,
    overrides: list[str] | tuple[str, ...] = (),
    out_dir: str | Path | None = None,
    report: bool = False,
) -> tuple[Path, str]:
    """Train every model for every seed; return the output folder and the markdown table.
    ``report``: also write ``report.html`` (`funnel report`), the models side by side."""
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}.")
    if report:  # said before hours of training, not after
        from funnel.report import require_matplotlib

        require_matplotlib()
    cfg, _ = load_config(config, overrides)  # validates the base config once, before any training

    def model_overrides(model: str) -> list[str]:
        # the config's own model keeps its arguments; another one is named plainly
        return [] if cfg.funnel.model.type == model else [f"funnel.model={model}"]

    for model in models:  # every model must accept this funnel: fail before hours of training
        preflight(load_config(config, [*overrides, *model_overrides(model)])[0])
    out = (
        Path(out_dir) if out_dir else Path("runs") / "compare" / f"{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out: {str(out)!r} already exists and is not empty; choose a new folder.")
    made = not out.exists()
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for model in models:
            for seed in range(seeds):
                log.info("compare: model %s, seed %d", model, seed)
                run = fit(
                    config,
                    [*overrides, *model_overrides(model), f"seed={seed}", f"run_dir={out / f'{model}-seed{seed}'}"],
                )
                runs.setdefault(model, []).append(json.loads((run / "metrics.json").read_text()))
    except BaseException:
        if made and not runs:  # the first run failed on the input: leave no empty comparison behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    stages = [s.name for s in cfg.funnel.stages]
    summary = summarise(runs, stages)
    split = next(iter(runs.values()))[0]["split"]
    table = markdown(
        summary, stages, f"{config}: {', '.join(models)}, {seeds} seed(s), mean ± std on the {split} split"
    )
    write_text(
        out / "compare.json",
        json.dumps({"config": str(config), "overrides": list(overrides), "summary": summary, "runs": runs}, indent=1),
    )
    write_text(out / "compare.md", table + "\n")
    if report:
        from funnel.report import report as write_report

        write_report([out], out / "report.html", trust_plugins=bool(cfg.plugins))
    return out, table


def summarise(runs: dict[str, list[dict[str, Any]]], stages: list[str]) -> dict[str, dict[str, list[float | None]]]:
    """model -> metric key -> [mean, std] (None where no run has the metric)."""
    out: dict[str, dict[str, list[float | None]]] = {}
    for model, metrics in runs.items():
        out[model] = {}
        for stage in stages:
            for col in COLUMNS:
                key = f"{col}/{stage}"
                vals = [m[key] for m in metrics if m.get(key) is not None]
                mean = statistics.mean(vals) if vals else None
                std = statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None)
                out[model][key] = [mean, std]
    return out


def markdown(summary: dict[str, dict[str, list[float | None]]], stages: list[str], title: str) -> str:
    lines = [title, ""]
    for stage in stages:
        cols = [c for c in COLUMNS if any(s[f"{c}/{stage}"][0] is not None for s in summary.values())]
        lines += [f"**{stage}**", "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for model, s in summary.items():
            cells = [
                f"{s[f'{c}/{stage}'][0]:.4f} ± {s[f'{c}/{stage}'][1]:.4f}"
                if s[f"{c}/{stage}"][0] is not None
                else "n/a"
                for c in cols
            ]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()
