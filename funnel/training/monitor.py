"""Which validation metric picks the best checkpoint and drives early stopping.

``trainer.monitor`` (default ``val/auc/<last stage>``) can be undefined on the validation split:
an AUC over a space with one class only. Lightning would then rank every epoch at -inf and stop
early after one epoch without a word; funnel warns once and monitors the validation loss instead.

The default monitor is also replaced, by ``val/auc_mean`` (the mean of every stage's path AUC),
when its AUC would rank the epochs by fewer than ``MIN_LABELS`` rows of its rarer class (e.g. 50
conversions): an AUC over 50 positives has a standard error of about 0.03, so early stopping on it
keeps an epoch by chance (docs/results.md, "Defaults study"). The earlier stages' AUCs rest on
many more rows. (The validation loss was measured as the replacement and rejected: it rises with
over-confidence while the ranking still improves, and stopped the sparse synthetic funnel 2 epochs
early.) A monitor the config names is always used as given.
"""

from __future__ import annotations

import logging

from funnel.data.table import EncodedTable
from funnel.graph import FunnelGraph
from funnel.spec.schema import Config
from funnel.spec.validate import default_monitor

log = logging.getLogger(__name__)
FALLBACK = ("val/loss", "min")
FEW_LABELS = ("val/auc_mean", "max")  # the mean of the stages' path AUCs (funnel/training/module.py)
MIN_LABELS = 1000  # the default monitor's AUC needs this many rows of its rarer class on valid


def choose_monitor(cfg: Config, graph: FunnelGraph, valid: EncodedTable) -> tuple[str, str]:
    """(metric, mode) to monitor, logging why when it is not the configured one: val/loss when that
    is undefined on ``valid``, val/auc_mean when it is the default and its AUC rests on too few
    labels there."""
    monitor, mode, why, undefined = monitor_choice(cfg, graph, valid)
    if why is not None:
        (log.warning if undefined else log.info)("%s", why)
    return monitor, mode


def monitor_choice(cfg: Config, graph: FunnelGraph, valid: EncodedTable) -> tuple[str, str, str | None, bool]:
    """(metric, mode, why it is not the configured or default one, whether because undefined);
    ``funnel check`` shows the same reason."""
    from funnel.data.degenerate import monitor_minority, monitor_undefined

    monitor = cfg.trainer.monitor or default_monitor(graph)
    reason = monitor_undefined(valid, graph, monitor)
    if reason is not None:
        why = (
            f"trainer.monitor {monitor} is undefined on the valid split ({reason}): the best checkpoint and "
            f"early stopping use {FALLBACK[0]} (mode {FALLBACK[1]}) instead. Give a valid split with both "
            "classes, or set trainer.monitor."
        )
        return *FALLBACK, why, True
    rarer = monitor_minority(valid, graph, monitor) if cfg.trainer.monitor is None else None
    if rarer is not None and rarer[0] < MIN_LABELS:
        why = (
            f"the default monitor {monitor} would rank epochs by {rarer[0]} {rarer[1]} on the valid split "
            f"(fewer than {MIN_LABELS}): the best checkpoint and early stopping use {FEW_LABELS[0]} "
            f"(mode {FEW_LABELS[1]}, the mean of every stage's path AUC) instead. Set trainer.monitor to choose."
        )
        return *FEW_LABELS, why, False
    return monitor, cfg.trainer.mode, None, False
