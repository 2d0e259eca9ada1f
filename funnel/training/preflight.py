"""Every rule `fit` applies to a config before it reads the data, in one call.

`funnel check`, `funnel fit` (also `--print-config` and `--resume`) and `funnel compare` call
:func:`preflight`, so that a config `check` accepts never fails in `fit` on the config:

- the Lightning Trainer arguments (funnel/training/trainer_args.py);
- the model itself, built on the meta device (no memory, no initialisation) from a
  placeholder feature layout: every error a builder, tower, bottom, transfer, weighting or
  regulariser raises about the config surfaces here;
- the environment fit reads (``FUNNEL_CHECKPOINT_BUFFERS``), so a bad value stops the run
  before its data is prepared.
"""

from __future__ import annotations

import torch

from funnel.data.layout import FeatureLayout
from funnel.errors import ConfigError, UserError
from funnel.graph import FunnelGraph
from funnel.spec.schema import Config
from funnel.training.trainer_args import trainer_problems


def model_build_problems(cfg: Config, graph: FunnelGraph | None = None) -> list[str]:
    """Problems building the configured model (on the meta device, before any data)."""
    from funnel.models.registry import create_model

    graph = graph or FunnelGraph.from_stages(cfg.funnel.stages)
    layout = FeatureLayout.placeholder(cfg, rows=2)  # exact widths and sharing; table sizes are placeholders
    try:
        with torch.device("meta"):
            create_model(graph, cfg.funnel, layout)
    except UserError as exc:
        return exc.problems
    except (ValueError, TypeError) as exc:
        return [f"funnel: model {cfg.funnel.model.type!r} cannot be built from this config: {exc}"]
    return []


def preflight(cfg: Config, graph: FunnelGraph | None = None) -> None:
    """Raise one ConfigError with every problem of the Trainer arguments and the model."""
    from funnel.training.checkpointing import buffer_mode

    problems = trainer_problems(cfg) + model_build_problems(cfg, graph)
    try:
        buffer_mode()
    except UserError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
