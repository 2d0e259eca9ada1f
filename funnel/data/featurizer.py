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
from funnel.data.encoders import CategoricalEncoder, NumericEncoder, SequenceEncoder
from funnel.data.labels import encode_label, resolve_conflicts
from funnel.data.table import EncodedTable
from funnel.errors import DataError, UserError, did_you_mean
from funnel.graph import FunnelGraph
from funnel.spec.convert import build
from funnel.spec.schema import Config, FeatureSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class Featurizer:
    def __init__(self, cfg: Config, graph: FunnelGraph):
        self.cfg = cfg
        self.graph = graph
        self.features = [f for f in cfg.features]
        self.cat: dict[str, CategoricalEncoder] = {}
        self.num: dict[str, NumericEncoder] = {}
        self.seq: dict[str, SequenceEncoder] = {}
        for f in self.features:
            if f.kind == "categorical":
                self.cat[f.name] = CategoricalEncoder(f)
            elif f.kind == "numeric":
                self.num[f.name] = NumericEncoder(f)
        for f in self.features:
            if f.kind == "sequence":
                ids = self.cat[f.share_with] if f.share_with else CategoricalEncoder(f)
                self.seq[f.name] = SequenceEncoder(f, ids)
        self.fitted = False

    # ---- columns -------------------------------------------------------------------------
    def feature_columns(self) -> list[str]:
        return list(dict.fromkeys(f.source for f in self.features))

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
        self.check_columns(df, "train", labels=True)
        for f in self.features:
            if f.kind == "categorical":
                self.cat[f.name].fit(df[f.source])
        for f in self.features:
            if f.kind == "numeric":
                self.num[f.name].fit(df[f.source])
            elif f.kind == "sequence":
                self.seq[f.name].fit(df[f.source])
        self.fitted = True
        return self

    def encode(self, df: pd.DataFrame, where: str, labels: bool = True) -> EncodedTable:
        """Encode a frame; with ``labels``, label conflicts follow data.label_conflicts."""
        self.check_columns(df, where, labels=labels)
        n = len(df)
        cats = [self.cat[f.name].encode(df[f.source]) for f in self.features if f.kind == "categorical"]
        nums = [self.num[f.name].encode(df[f.source], where) for f in self.features if f.kind == "numeric"]
        table = EncodedTable(
            cat=torch.from_numpy(np.stack(cats, axis=1) if cats else np.zeros((n, 0), np.int64)),
            num=torch.from_numpy(np.concatenate(nums, axis=1) if nums else np.zeros((n, 0), np.float32)),
            seq={
                f.name: torch.from_numpy(self.seq[f.name].encode(df[f.source]))
                for f in self.features
                if f.kind == "sequence"
            },
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
        if not keep.all():
            mask = torch.from_numpy(keep)
            table = EncodedTable(
                cat=table.cat[mask],
                num=table.num[mask],
                seq={k: v[mask] for k, v in table.seq.items()},
                labels=table.labels[mask],
                truth={k: v[mask] for k, v in table.truth.items()},
                rows=table.rows[mask],
            )
        return table

    # ---- sizes the model needs ----------------------------------------------------------------
    def layout(self) -> dict[str, Any]:
        """Embedding tables, their sizes and which column of `cat` / which `seq` uses each."""
        tables: dict[str, int] = {}
        for f in self.features:
            if f.kind in ("categorical", "sequence") and not f.share_with:
                enc = self.cat[f.name] if f.kind == "categorical" else self.seq[f.name].ids
                tables[f.name] = enc.cardinality
        dim = self.cfg.funnel.embed_dim
        owner_dim = {f.name: f.embed_dim or dim for f in self.features}
        fields = []
        col = 0
        for f in self.features:
            if f.kind == "categorical":
                table = f.share_with or f.name
                fields.append(
                    {"name": f.name, "kind": "categorical", "table": table, "column": col, "dim": owner_dim[table]}
                )
                col += 1
        for f in self.features:
            if f.kind == "sequence":
                table = f.share_with or f.name
                fields.append(
                    {"name": f.name, "kind": "sequence", "table": table, "dim": owner_dim[table], "pooling": f.pooling}
                )
        num_width = sum(self.num[f.name].width for f in self.features if f.kind == "numeric")
        return {"tables": {t: (n, owner_dim[t]) for t, n in tables.items()}, "fields": fields, "numeric_dim": num_width}

    # ---- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        state = {
            "format": FORMAT_VERSION,
            "features": [{"spec": asdict(f), "state": self._encoder(f).state()} for f in self.features],
        }
        write_text(path, json.dumps(state, indent=1))

    def _encoder(self, f: FeatureSpec) -> Any:
        return {"categorical": self.cat, "numeric": self.num, "sequence": self.seq}[f.kind][f.name]

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
                enc = self._encoder(spec)
                target = enc if not isinstance(enc, SequenceEncoder) else enc.ids
                for key, value in item["state"].items():
                    if not hasattr(target, key):
                        raise ValueError(f"feature {spec.name!r} has an unknown state {key!r}")
                    setattr(target, key, value)
                seen.add(spec.name)
            _check_loaded(self)
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


def _check_loaded(featurizer: Featurizer) -> None:
    """Loaded statistics must be usable: finite numbers, and vocabularies that are lists of strings."""
    for name, enc in featurizer.num.items():
        for key in ("mean", "std"):
            value = getattr(enc, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
                raise ValueError(f"numeric feature {name!r} has {key} {value!r}, not a finite number")
    for name, enc in [*featurizer.cat.items(), *((n, s.ids) for n, s in featurizer.seq.items())]:
        if not isinstance(enc.vocab, list) or not all(isinstance(v, str) for v in enc.vocab):
            raise ValueError(f"feature {name!r} has a vocabulary that is not a list of strings")
