"""Keeping the per-epoch logs of a run across `funnel fit --resume`.

Lightning's CSVLogger deletes an existing ``logs/metrics.csv`` when it starts. Before a resumed
run starts, the old rows are moved aside; afterwards the rows of the epochs that were trained
again are dropped from them and the rest go in front of the new rows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from funnel.atomic import write_text

LOGS = "logs"
ASIDE = ".logs-before-resume.csv"


def set_aside(run_dir: Path) -> pd.DataFrame | None:
    """Move the rows of logs/ out of Lightning's way; return them (None when there are none)."""
    frames = []
    for path in (run_dir / ASIDE, run_dir / LOGS / "metrics.csv"):
        if path.is_file() and path.stat().st_size:
            frames.append(pd.read_csv(path))
    old = pd.concat(frames, ignore_index=True) if frames else None
    if old is not None:
        write_text(run_dir / ASIDE, old.to_csv(index=False))
    shutil.rmtree(run_dir / LOGS, ignore_errors=True)
    return old


def merge(run_dir: Path, old: pd.DataFrame | None) -> None:
    """logs/metrics.csv = the old rows of the epochs not trained again + the new rows."""
    new_path = run_dir / LOGS / "metrics.csv"
    if old is None:
        return
    new = pd.read_csv(new_path) if new_path.is_file() and new_path.stat().st_size else pd.DataFrame()
    if "epoch" in new.columns and "epoch" in old.columns and len(new):
        old = old[old["epoch"] < new["epoch"].min()]
    write_text(new_path, pd.concat([old, new], ignore_index=True).to_csv(index=False))
    (run_dir / ASIDE).unlink(missing_ok=True)
