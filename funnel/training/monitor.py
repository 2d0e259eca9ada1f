"""Which validation metric picks the best checkpoint and drives early stopping.

``trainer.monitor`` (default ``val/auc/<last stage>``) can be undefined on the validation split:
an AUC over a space with one class only. Lightning would then rank every epoch at -inf and stop
early after one epoch without a word; funnel warns once and monitors the validation loss instead.
"""

from __future__ import annotations

import logging

from funnel.data.table import EncodedTable
from funnel.graph import FunnelGraph
from funnel.spec.schema import Config
from funnel.spec.validate import default_monitor

log = logging.getLogger(__name__)
FALLBACK = ("val/loss", "min")


def choose_monitor(cfg: Config, graph: FunnelGraph, valid: EncodedTable) -> tuple[str, str]:
    """(metric, mode) to monitor: the configured one, or val/loss when it is undefined on ``valid``."""
    from funnel.data.degenerate import monitor_undefined

    monitor = cfg.trainer.monitor or default_monitor(graph)
    reason = monitor_undefined(valid, graph, monitor)
    if reason is None:
        return monitor, cfg.trainer.mode
    log.warning(
        "trainer.monitor %s is undefined on the valid split (%s): the best checkpoint and early stopping "
        "use %s (mode %s) instead. Give a valid split with both classes, or set trainer.monitor.",
        monitor,
        reason,
        *FALLBACK,
    )
    return FALLBACK
