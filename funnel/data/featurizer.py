"""All feature and label encoders of a run: fit on train, encode any split, save as JSON."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from funnel.atomic import write_text
from funnel.data.kinds import Encoder, kind_of, new_encoders
from funnel.data.labels import encode_label, resolve_conflicts
from funnel.data.layout import FeatureLayout
from funnel.data.table import BAG, CAT, NUM, SEQ, EncodedTable
from funnel.errors import DataError, UserError, did_you_mean
from funnel.graph import FunnelGraph
from funnel.spec.convert import build
from funnel.spec.schema import Config, FeatureSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _weights(spec: FeatureSpec) -> str | None:
    """The per-id weight column of a multi-hot feature, else None."""
    return getattr(spec, "weights", None)


class Featurizer:
    def __init__(self, cfg: Config, graph: FunnelGraph):
        self.cfg = cfg
        self.graph = graph
        self.features = list(cfg.features)
        self.encoders: dict[str, Encoder] = new_encoders(self.features)  # by feature name, see kinds.py
        self.fitted = False

    def of_kind(self, kind: str) -> dict[str, Encoder]:
        """The encoders of one feature kind, by feature name, in feature order."""
        return {f.name: self.encoders[f.name] for f in self.features if f.kind == kind}

    @property
    def cat(self) -> dict[str, Encoder]:
        """The categorical encoders (``.cardinality``, ``.vocab``), by feature name."""
        return self.of_kind("categorical")

    # ---- columns -------------------------------------------------------------------------
    def feature_columns(self) -> list[str]:
        """Every column the features read: their sources, and the weight columns of multi-hot ones."""
        return list(dict.fromkeys(c for f in self.features for c in (f.source, _weights(f)) if c))

    def wanted_columns(self, header: list[str], labels: bool = True) -> list[str]:
        """The columns of a file with ``header`` that encoding reads (those it has: a missing one
        is reported by ``check_columns``): features, labels and, when the file has all of them,
        the synthetic generator's truth columns."""
        wanted = self.feature_columns() + (self.label_columns() if labels else [])
        truth = self.truth_columns(pd.DataFrame(columns=header))
        if truth:
            wanted += [c for group in truth.values() for c in group]
            wanted += [f"cf_{c}_free" for c in self.label_columns()]
        present = set(header)
        return [c for c in dict.fromkeys(wanted) if c in present]

    def label_columns(self) -> list[str]:
        return [self.cfg.funnel.stages[self._spec_index(s.name)].label_column for s in self.graph.stages]

    def _spec_index(self, name: str) -> int:
        return [s.name for s in self.cfg.funnel.stages].index(name)

    def truth_columns(self, df: pd.DataFrame) -> dict[str, list[str]] | None:
        """Ground-truth columns of the synthetic generator, when all are present."""
        labels = self.label_columns()
        cols = {
            "true_cond": [f"true_p_{c}_cond" for c in labels],
            "true_reach": [f"true_p_{c}" for c in labels],
            "cf": [f"cf_{c}" for c in labels],
        }
        if all(c in df.columns for group in cols.values() for c in group):
            return cols
        return None

    def check_columns(self, df: pd.DataFrame, where: str, labels: bool) -> None:
        wanted = self.feature_columns() + (self.label_columns() if labels else [])
        missing = [c for c in wanted if c not in df.columns]
        if missing:
            have = list(map(str, df.columns))
            problems = [
                f"{where}: column {c!r} is missing.{did_you_mean(c, have)} Columns present: "
                f"{', '.join(have[:30])}{' ...' if len(have) > 30 else ''}."
                for c in missing
            ]
            raise DataError(problems)

    # ---- fit / encode ----------------------------------------------------------------------
    def fit(self, df: pd.DataFrame) -> Featurizer:
        self.observe(df)
        return self.finalize()

    def observe(self, df: pd.DataFrame) -> None:
        """Add one chunk of the train split to the encoders' statistics (see ``finalize``): the
        streaming prepare pass fits data larger than memory chunk by chunk, with the result
        of one ``fit`` on all of it."""
        self.check_columns(df, "train", labels=True)
        for f in self.features:  # a feature with share_with fits nothing: its vocabulary is the other's
            self.encoders[f.name].observe(df[f.source])

    def finalize(self) -> Featurizer:
        for f in self.features:
            self.encoders[f.name].finalize()
        self.fitted = True
        return self

    def encode(self, df: pd.DataFrame, where: str, labels: bool = True) -> EncodedTable:
        """Encode a frame; with ``labels``, label conflicts follow data.label_conflicts."""
        self.check_columns(df, where, labels=labels)
        n = len(df)
        blocks: dict[str, dict[str, Any]] = {CAT: {}, NUM: {}, SEQ: {}, BAG: {}}  # block -> feature -> array
        for f in self.features:
            enc = self.encoders[f.name]
            if _weights(f):
                blocks[kind_of(f).block][f.name] = enc.encode(df[f.source], where, weights=df[_weights(f)])
            else:
                blocks[kind_of(f).block][f.name] = enc.encode(df[f.source], where)
        cats, nums = list(blocks[CAT].values()), list(blocks[NUM].values())
        table = EncodedTable(
            cat=torch.from_numpy(np.stack(cats, axis=1) if cats else np.zeros((n, 0), np.int64)),  # (N, C)
            num=torch.from_numpy(np.concatenate(nums, axis=1) if nums else np.zeros((n, 0), np.float32)),  # (N, K)
            seq={name: torch.from_numpy(ids) for name, ids in blocks[SEQ].items()},  # (N, L) each
            bags=dict(blocks[BAG]),  # Ragged each
            rows=torch.arange(n),
        )
        truth = self.truth_columns(df)
        if truth:
            table.truth = {
                k: torch.from_numpy(df[c].to_numpy(np.float32, copy=True)) for k, c in truth.items()
            }  # (N, S) each
            free = [f"cf_{c}_free" for c in self.label_columns()]  # position-free draws (NaN where absent)
            if any(c in df.columns for c in free):
                table.truth["free"] = torch.from_numpy(
                    np.stack(
                        [
                            df[c].to_numpy(np.float32) if c in df.columns else np.full(n, np.nan, np.float32)
                            for c in free
                        ],
                        1,
                    )
                )
        if not labels:
            return table
        stages = [self.cfg.funnel.stages[self._spec_index(s.name)] for s in self.graph.stages]
        y = np.stack([encode_label(df[s.label_column], s) for s in stages], axis=1)
        y, keep = resolve_conflicts(y, self.graph, self.cfg.data.label_conflicts, where)
        table.labels = torch.from_numpy(y)
        return table if keep.all() else table.select(torch.from_numpy(keep))

    # ---- sizes the model needs ----------------------------------------------------------------
    def layout(self) -> FeatureLayout:
        """Embedding tables, their sizes and which column of ``batch[CAT]`` / which sequence uses
        each, and the numeric width (``FeatureLayout.placeholder(cfg)``: the same before fitting)."""
        return FeatureLayout.from_encoders(self.features, self.cfg.funnel.embed_dim, self.encoders)

    # ---- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        state = {
            "format": FORMAT_VERSION,
            "features": [{"spec": asdict(f), "state": self.encoders[f.name].state()} for f in self.features],
        }
        write_text(path, json.dumps(state, indent=1))

    @classmethod
    def load(cls, path: str | Path, cfg: Config, graph: FunnelGraph) -> Featurizer:
        try:
            state = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read the encoders {str(path)!r}: {exc}. Is this a funnel run directory?") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
            found = state.get("format") if isinstance(state, dict) else None
            raise UserError(f"{path}: encoder format {found!r} is not supported (expected {FORMAT_VERSION}).")
        self = cls(cfg, graph)
        try:
            seen = set()
            for item in state["features"]:
                errors: list[str] = []
                spec = build(FeatureSpec, item["spec"], "features", errors, hook=False)  # every field is saved
                if spec is None or errors:
                    raise ValueError("; ".join(errors) or "a feature spec is malformed")
                enc = self.encoders[spec.name]
                if spec.kind != enc.spec.kind:
                    raise ValueError(f"feature {spec.name!r} is {spec.kind} there, {enc.spec.kind} here")
                enc.load_state(item["state"])  # each encoder checks its statistics
                seen.add(spec.name)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(
                f"{path}: is damaged or does not belong to this config ({type(exc).__name__}: {exc}). "
                "Use the encoders.json `funnel fit` wrote beside this config.yaml."
            ) from None
        missing = [f.name for f in self.features if f.name not in seen]
        if missing:
            raise UserError(
                f"{path}: has no encoder for feature(s) {', '.join(missing)} of the config; "
                "config.yaml and encoders.json come from different runs."
            )
        self.fitted = True
        return self
