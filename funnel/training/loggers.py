"""``trainer.logger``: Lightning's own loggers, by name, beside the CSV log funnel always writes.

    csv          RUN/logs/metrics.csv: always written, whatever trainer.logger says (funnel report
                 and `fit --resume` read it)
    tensorboard  RUN/logs/tensorboard/events.out.tfevents.*  (pip install 'funnel[tensorboard]')
    mlflow       an MLflow run in $MLFLOW_TRACKING_URI, else in the file store RUN/logs/mlruns
                 (pip install 'funnel[mlflow]')

``trainer.logger`` takes one name, a list of them, true (csv) or false (no logger but the CSV
log). The spec layer checks the names; :func:`logger_problems` checks, before any data is read,
that the packages they need are installed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger, Logger

from funnel.spec import Config

# the modules a logger needs: any one of them will do (Lightning's TensorBoardLogger takes either)
NEEDS = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",)}


def logger_names(cfg: Config) -> tuple[str, ...]:
    """The loggers of a run: csv first (Lightning's ``trainer.log_dir`` is the first one's), then
    the others ``trainer.logger`` names."""
    asked = cfg.trainer.kwargs.get("logger", ())
    if isinstance(asked, bool):  # a Config built in Python rather than read from YAML
        asked = ("csv",) if asked else ()
    return ("csv", *(name for name in asked if name != "csv"))


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def logger_problems(cfg: Config) -> list[str]:
    """A problem for every logger whose package is missing, with the command that installs it."""
    return [
        f"trainer.logger: {name} needs the {NEEDS[name][0]} package, which is not installed; "
        f"pip install 'funnel[{name}]' (or pip install {NEEDS[name][0]}), or leave {name} out of trainer.logger."
        for name in logger_names(cfg)
        if name in NEEDS and not any(_installed(m) for m in NEEDS[name])
    ]


def build_loggers(cfg: Config, run_dir: Path) -> list[Logger]:
    """The Lightning loggers of a run writing into ``run_dir`` (checked by :func:`logger_problems`)."""
    loggers: list[Logger] = []
    for name in logger_names(cfg):
        if name == "csv":
            loggers.append(CSVLogger(run_dir, name="logs", version=""))
        elif name == "tensorboard":
            from pytorch_lightning.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(run_dir / "logs", name="tensorboard", version="", default_hp_metric=False))
        elif name == "mlflow":
            from pytorch_lightning.loggers import MLFlowLogger

            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"file:{(run_dir / 'logs' / 'mlruns').resolve()}"
            loggers.append(MLFlowLogger(experiment_name="funnel", run_name=run_dir.name, tracking_uri=uri))
        else:  # the spec layer accepts only the names above
            raise AssertionError(name)
    return loggers
