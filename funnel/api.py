"""The Python API: train, load and score runs from Python, with the CLI's behaviour.

    import funnel

    run = funnel.fit("configs/esmm.yaml", ["trainer.max_epochs=1"])   # or a config mapping
    scores = run.predict(frame)            # the columns of `funnel predict`, one row per input row
    metrics = run.evaluate(frame)          # the metrics of `funnel evaluate`
    run = funnel.load_run("runs/esmm/20261201-120000")
    run.export("exported/esmm", format="onnx")   # or "torchscript"; see `funnel export`

Errors of the input raise ``funnel.errors.UserError`` (the CLI turns them into exit code 2).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from funnel.errors import UserError
from funnel.graph import FunnelGraph
from funnel.spec import Config, config_from_dict, load_config
from funnel.spec.loader import apply_override


@dataclass
class Run:
    """A trained run: its directory, resolved config, encoders and the best checkpoint's model."""

    path: Path
    config: Config
    graph: FunnelGraph
    featurizer: Any  # funnel.data.featurizer.Featurizer
    model: Any  # a FunnelModel in eval mode

    @property
    def stages(self) -> list[str]:
        return list(self.graph.names)

    @property
    def metrics(self) -> dict[str, Any]:
        """metrics.json: the best checkpoint's metrics on the test split (else valid)."""
        return json.loads((self.path / "metrics.json").read_text())

    def predict(self, df: pd.DataFrame, batch_size: int = 4096, bf16: bool = False) -> pd.DataFrame:
        """``p_<stage>`` and ``p_<stage>_cond`` for every stage (and the branch columns), one row
        per row of ``df`` in its order: the columns `funnel predict` writes. Labels are not needed."""
        from funnel.inference import predict_table

        table = self.featurizer.encode(_frame(df), "predict", labels=False)
        out = predict_table(self.model, table, batch_size, bf16)
        out.index = df.index
        return out

    def evaluate(self, df: pd.DataFrame, batch_size: int | None = None) -> dict[str, Any]:
        """The metrics `funnel evaluate` computes, on the labelled rows of ``df``."""
        from funnel.inference import evaluate_table

        table = self.featurizer.encode(_frame(df), "evaluate", labels=True)
        return evaluate_table(self.model, table, batch_size or self.config.data.eval_batch_size)

    def export(
        self,
        out: str | Path,
        format: str = "onnx",  # noqa: A002  (the CLI's --format)
        split: list[str] | None = None,
    ) -> Path:
        """Write the model as ONNX or TorchScript with its encoders and manifest (`funnel export`);
        ``split``: the user side's features, for a user graph and an item graph (``--split``)."""
        from funnel.export import export_run

        return export_run(self.path, format, out, trust_plugins=bool(self.config.plugins), split=split)


def _frame(df: Any) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise UserError(f"expected a pandas DataFrame of feature columns, got {type(df).__name__}.")
    return df.reset_index(drop=True)


def load_run(run_dir: str | Path, trust_plugins: bool = False) -> Run:
    """The run in ``run_dir`` (its plugins are imported only with ``trust_plugins``, as on the CLI)."""
    from funnel.runs import load_run as load_parts

    cfg, graph, featurizer, model = load_parts(run_dir, trust_plugins)
    return Run(Path(run_dir), cfg, graph, featurizer, model)


def fit(config: str | Path | dict[str, Any] | Config, overrides: list[str] | tuple[str, ...] = ()) -> Run:
    """Train like `funnel fit` and return the finished run. ``config``: a YAML path, a mapping
    of the YAML's sections, or a ``Config``; ``overrides``: ``key.sub=value`` strings."""
    from funnel.training.fit import fit_config

    if isinstance(config, Config):
        if overrides:
            raise UserError("fit: overrides apply to a YAML path or a mapping, not to a Config object.")
        cfg, source = config, "config.yaml"
    elif isinstance(config, dict):
        raw = copy.deepcopy(config)
        for item in overrides:
            apply_override(raw, item)
        cfg, source = config_from_dict(raw), "config.yaml"
    else:
        cfg, _ = load_config(config, overrides)
        source = config
    run_dir = fit_config(cfg, source)
    return load_run(run_dir, trust_plugins=bool(cfg.plugins))  # the caller's own config chose them
