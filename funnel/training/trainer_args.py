"""The Lightning Trainer arguments of a config, checked before any data is read.

The spec layer checks each argument's type against ``lightning.Trainer``'s signature. Here the
Trainer itself is built once with them (it rejects an unknown precision, strategy or an
accelerator this machine lacks), and the values Lightning only checks inside ``fit()`` are
checked by hand, so that `funnel check` and `fit` refuse them before the data is read; so is a
``trainer.logger`` whose package is missing (funnel/training/loggers.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

from funnel.errors import ConfigError
from funnel.spec.schema import Config

# Lightning's own loggers (pytorch_lightning sets itself to INFO on import): its banners ("GPU
# available", "`Trainer.fit` stopped") and its litlogger / litmodels tips are rank_zero_info
# messages of their children (pytorch_lightning.utilities.rank_zero, ...)
LIGHTNING_LOGGERS = (
    "pytorch_lightning",
    "lightning.pytorch",
    "lightning_fabric",
    "lightning.fabric",
    "lightning_utilities",
)


@contextlib.contextmanager
def lightning_level(level: int) -> Iterator[None]:
    """Lightning's loggers at ``level`` in this block (their own levels again after it)."""
    import pytorch_lightning  # noqa: F401  (importing it sets its loggers to INFO: first, then ours)

    loggers = [logging.getLogger(n) for n in LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels, strict=True):
            lg.setLevel(old)


def quiet_lightning() -> contextlib.AbstractContextManager[None]:
    """Lightning's errors only: the probe Trainer must not print its "GPU available" banner."""
    return lightning_level(logging.ERROR)


def _value_problems(kwargs: dict[str, Any]) -> list[str]:
    """Values of the right type that Lightning accepts when built and rejects in ``fit()``."""
    problems = []
    vci = kwargs.get("val_check_interval")
    if isinstance(vci, float) and not 0.0 < vci <= 1.0:
        problems.append(
            f"trainer.val_check_interval: {vci} as a fraction of an epoch must lie in (0, 1]; "
            "give an integer to validate every N training batches."
        )
    if isinstance(vci, int) and not isinstance(vci, bool) and vci < 1:
        problems.append(f"trainer.val_check_interval: {vci} batches must be >= 1.")
    at_least = {
        "accumulate_grad_batches": 1,
        "check_val_every_n_epoch": 1,
        "log_every_n_steps": 0,
        "gradient_clip_val": 0,
    }
    for key, low in at_least.items():
        value = kwargs.get(key)
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and (value < low or not math.isfinite(value))
        ):
            problems.append(f"trainer.{key}: {value} must be >= {low}.")
    return problems


def trainer_problems(cfg: Config) -> list[str]:
    """Every problem with the Trainer arguments that needs no data."""
    import pytorch_lightning as pl
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from funnel.training.loggers import logger_problems

    given = dict(cfg.trainer.kwargs)
    problems = _value_problems(given) + logger_problems(cfg)
    fixed = {"logger": False, "enable_checkpointing": False, "callbacks": None, "enable_model_summary": False}
    rejected = (MisconfigurationException, ValueError, TypeError, RuntimeError, ImportError)

    def rejection(kwargs: dict[str, Any]) -> Exception | None:
        try:
            with quiet_lightning():
                pl.Trainer(**{**kwargs, **fixed})
        except rejected as exc:
            return exc
        return None

    exc = rejection(given)
    if exc is not None:
        # name the argument(s) without which Lightning accepts the rest
        culprits = [
            k for k in given if k not in fixed and rejection({j: v for j, v in given.items() if j != k}) is None
        ]
        where = ", ".join(f"trainer.{k}: {given[k]!r}" for k in culprits) or f"the arguments {given}"
        problems.append(f"{where}: Lightning rejects it ({str(exc).strip()})")
    return problems


def train_batches(cfg: Config, rows: int, world_size: int = 1) -> int:
    """Training batches per epoch that Lightning will run on each rank (limit_train_batches
    applied); under DDP each of ``world_size`` ranks takes rows // world_size of the rows."""
    batches = math.ceil(rows // world_size / cfg.data.batch_size)
    limit = cfg.trainer.kwargs.get("limit_train_batches")
    if isinstance(limit, float):
        return int(batches * limit)
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(batches, limit)
    return batches


def trainer_data_problems(cfg: Config, train_rows: int, world_size: int = 1) -> list[str]:
    """Problems that depend on the size of the training split (and the ranks that share it)."""
    kwargs = cfg.trainer.kwargs
    vci = kwargs.get("val_check_interval")
    batches = train_batches(cfg, train_rows, world_size)
    if (
        isinstance(vci, int)
        and not isinstance(vci, bool)
        and kwargs.get("check_val_every_n_epoch", 1) is not None
        and vci > batches
    ):
        ranks = f" over {world_size} ranks" if world_size > 1 else ""
        return [
            (
                f"trainer.val_check_interval: {vci} is more than the {batches} training batches of an epoch "
                f"({train_rows} rows{ranks}, data.batch_size {cfg.data.batch_size}); give at most {batches}, or a "
                "fraction such as 0.5."
            )
        ]
    return []


def raise_trainer_data_problems(cfg: Config, train_rows: int, world_size: int = 1) -> None:
    """Raise the problems of :func:`trainer_data_problems` (the rest runs in preflight)."""
    problems = trainer_data_problems(cfg, train_rows, world_size)
    if problems:
        raise ConfigError(problems)
