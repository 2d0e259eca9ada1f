"""The config schema: one frozen dataclass per YAML section.

Every default is the one a user gets when the key is absent; comments explain the
non-obvious ones. Semantic checks that span sections live in ``validate.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from funnel.errors import did_you_mean
from funnel.spec.convert import convert, describe, matches, type_text
from funnel.spec.tune_spec import TuneSpec
from funnel.synthetic import SyntheticSpec

FeatureKind = Literal["categorical", "numeric", "sequence", "multi_hot"]


@dataclass(frozen=True)
class CsvSpec:
    """How CSV files are read (pandas ``read_csv`` options that real datasets need)."""

    sep: str = ","
    header: bool = True  # false: the file has no header line, give ``names``
    names: tuple[str, ...] | None = None
    skipinitialspace: bool = False  # UCI files put a space after every comma
    na_values: tuple[str, ...] = ()  # extra strings read as missing, e.g. ["?"]
    comment: str | None = None  # lines starting with this character are skipped (UCI Adult's test file)


@dataclass(frozen=True)
class DataSpec:
    train: str | None = None
    valid: str | None = None
    test: str | None = None
    synthetic: SyntheticSpec | None = None  # generate the data instead of reading files
    valid_split: float = 0.1  # share of train held out for validation when `valid` is absent
    # share of train held out for the test split when `test` is absent (None: no test split;
    # metrics.json is then computed on valid, which chose the checkpoint, and says so)
    test_split: float | None = None
    # the held-out rows are chosen by this seed, never by the model's `seed`: every seed and model
    # trains on the same rows (see funnel/data/splits.py)
    split_seed: int = 0
    # hold out whole key values instead of rows (e.g. user_id: no user is in two splits)
    split_by: str | None = None
    batch_size: int = 1024
    eval_batch_size: int = 16384  # evaluation has no backward pass, so larger batches are cheap
    label_conflicts: Literal["drop", "zero", "error"] = "drop"
    csv: CsvSpec = field(default_factory=CsvSpec)
    # file data: keep the fitted encoders and encoded tensors on disk, keyed by a hash of
    # the files' bytes (not their path or mtime) and everything that shapes the encoding;
    # an entry is used only when its manifest checksums match, else it is deleted and
    # rebuilt. Folder: cache_dir, else $FUNNEL_CACHE_DIR, else ~/.cache/funnel
    cache: bool = True
    cache_dir: str | None = None
    # file data is read, fitted and encoded this many rows at a time (memory stays flat)
    chunk_rows: int = 262_144
    # the training order of each epoch: "global", one permutation of all rows (best mixing;
    # its index costs 4 bytes per row of memory); "blocks", blocks of shuffle_block_rows
    # consecutive rows in a random order, mixed shuffle_buffer_blocks at a time (memory and
    # disk reads stay local: for data far larger than RAM)
    shuffle: Literal["global", "blocks"] = "global"
    shuffle_block_rows: int = 65_536
    shuffle_buffer_blocks: int = 16

    def __post_init__(self) -> None:
        if min(self.chunk_rows, self.shuffle_block_rows, self.shuffle_buffer_blocks) <= 0:
            raise ValueError(
                "chunk_rows, shuffle_block_rows and shuffle_buffer_blocks must be positive integers, got "
                f"{self.chunk_rows}, {self.shuffle_block_rows} and {self.shuffle_buffer_blocks}"
            )
        if self.batch_size <= 0 or self.eval_batch_size <= 0:
            raise ValueError(
                "batch_size and eval_batch_size must be positive integers, "
                f"got {self.batch_size} and {self.eval_batch_size}"
            )
        if not 0.0 < self.valid_split < 1.0:
            raise ValueError(f"valid_split must lie in (0, 1), got {self.valid_split}")
        if self.test_split is not None and not 0.0 < self.test_split < 1.0:
            raise ValueError(f"test_split must lie in (0, 1), got {self.test_split}")
        if self.test_split is not None and not self.valid and self.valid_split + self.test_split >= 1.0:
            raise ValueError(
                f"valid_split + test_split = {self.valid_split + self.test_split:g} leaves no train rows; "
                "lower one of them"
            )


# Which options each feature kind accepts (besides name, kind, column).
FEATURE_OPTIONS: dict[str, frozenset[str]] = {
    "categorical": frozenset({"min_count", "hash_buckets", "share_with", "embed_dim"}),
    "numeric": frozenset({"transform", "missing", "embedding", "bins", "frequencies", "sigma", "embed_dim"}),
    "sequence": frozenset({"min_count", "share_with", "embed_dim", "sep", "max_len", "pooling"}),
    "multi_hot": frozenset(
        {"min_count", "hash_buckets", "share_with", "embed_dim", "sep", "weights", "pooling", "max_len"}
    ),
}

SEQUENCE_MAX_LEN = 20  # a sequence's max_len when none is given: it pads every row to this length


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    kind: FeatureKind
    column: str | None = None  # source column; defaults to `name`
    # categorical / sequence
    min_count: int = 1  # values seen fewer times in train map to the unknown id 0
    hash_buckets: int | None = None  # hash values into N buckets instead of a vocabulary
    # reuse the vocabulary and table of another categorical, sequence or multi_hot feature
    share_with: str | None = None
    embed_dim: int | None = None  # defaults to funnel.embed_dim
    # numeric
    # auto: log1p when the train column has no negative value and a skewness above 1, else
    # standardize (the choice is saved in encoders.json and shown by `funnel check`); quantile:
    # Φ⁻¹ of the train CDF (about N(0, 1) whatever the shape; QuantileTransformer's normal output)
    transform: Literal["auto", "standardize", "log1p", "quantile", "none"] = "auto"
    missing: Literal["fill", "error"] = "fill"  # fill: train mean plus a 0/1 missing flag
    # how the model sees the value (docs: README "Features"): none, the standardised column; bins, the
    # id of its quantile bin (edges fitted on train, missing -> id 0) embedded like a category; plr,
    # a field vector ReLU(Linear([sin, cos](2π c·x))) of the standardised value, c trainable
    # (Gorishniy et al., NeurIPS 2022). bins and plr give the feature a field of width embed_dim
    embedding: Literal["none", "bins", "plr"] = "none"
    bins: int = 32  # bins: at most this many quantile bins (tied edges merge: fewer on a lumpy column)
    frequencies: int = 16  # plr: the number of frequencies c
    sigma: float = 1.0  # plr: c starts as N(0, sigma²); larger sigma, finer detail
    # sequence / multi_hot
    sep: str = "|"  # between the ids of a string cell ("12|7|99")
    # longer lists keep their last max_len ids; the truncated rows and ids are logged and counted
    # by `funnel check`. A sequence pads to it (None: SEQUENCE_MAX_LEN); a multi_hot feature has
    # no cap unless given
    max_len: int | None = None
    # multi_hot: sum = Σ w·e, mean = Σ w·e / Σ w (w = 1 without weights; an empty list gives 0)
    pooling: Literal["mean", "sum"] = "mean"
    # multi_hot only: a column of weight lists parallel to the id lists (Ali-CCP's values, counts)
    weights: str | None = None

    @property
    def source(self) -> str:
        return self.column or self.name

    @classmethod
    def __from_raw__(cls, raw: Any, path: str, errors: list[str]) -> FeatureSpec | None:
        from funnel.spec.convert import build

        if isinstance(raw, dict) and raw.get("kind") in FEATURE_OPTIONS:
            allowed = FEATURE_OPTIONS[raw["kind"]] | {"name", "kind", "column"}
            for key in raw:
                if key not in allowed and key in FEATURE_OPTIONS_ALL:
                    errors.append(
                        f"{path}.{key}: a {raw['kind']} feature does not take `{key}`. "
                        f"Its options: {', '.join(sorted(FEATURE_OPTIONS[raw['kind']]))}."
                    )
            if raw["kind"] == "sequence" and "max_len" in raw and raw["max_len"] is None:
                errors.append(
                    f"{path}.max_len: a sequence is padded to max_len, so it needs a number (default "
                    f"{SEQUENCE_MAX_LEN}); for id lists without a cap use `kind: multi_hot`."
                )
                return None
            if raw["kind"] == "numeric":
                errors += numeric_embedding_problems(raw, path)
        return build(cls, raw, path, errors, hook=False)

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")
        if self.hash_buckets is not None and self.hash_buckets < 1:
            raise ValueError(f"hash_buckets must be >= 1, got {self.hash_buckets}")
        if self.max_len is None and self.kind == "sequence":
            object.__setattr__(self, "max_len", SEQUENCE_MAX_LEN)  # frozen: set once, here
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if self.embed_dim is not None and self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if self.bins < 2:
            raise ValueError(f"bins must be >= 2 (quantile bins of the train values), got {self.bins}")
        if self.frequencies < 1 or not self.sigma > 0:
            raise ValueError(f"frequencies must be >= 1 and sigma > 0, got {self.frequencies} and {self.sigma}")


FEATURE_OPTIONS_ALL = frozenset().union(*FEATURE_OPTIONS.values())

# the numeric options that only one `embedding` reads
NUMERIC_EMBEDDING_OPTIONS = {
    "bins": ("bins",),
    "frequencies": ("plr",),
    "sigma": ("plr",),
    "embed_dim": ("bins", "plr"),
}


def numeric_embedding_problems(raw: dict, path: str) -> list[str]:
    """A numeric feature's embedding options set (to other than their defaults, which a saved
    config lists) without the `embedding` that reads them."""
    embedding = raw.get("embedding", "none")
    defaults = {f.name: f.default for f in dataclasses.fields(FeatureSpec)}
    return [
        f"{path}.{key}: takes effect only with `embedding: {' or '.join(kinds)}` (this feature has "
        f"`embedding: {embedding}`); set the embedding or remove `{key}`."
        for key, kinds in NUMERIC_EMBEDDING_OPTIONS.items()
        if raw.get(key, defaults[key]) != defaults[key] and embedding not in kinds
    ]


def _named_from_raw(cls: type, raw: Any, path: str, errors: list[str], default: str, example: str) -> Any:
    """A plug-in spec from YAML: a name (shorthand) or ``{type: name, **arguments}``."""
    if raw is None:
        return cls()
    if isinstance(raw, str):
        return cls(type=raw)
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a name or a mapping like {example}, got {describe(raw)}.")
        return None
    raw = dict(raw)
    kind = raw.pop("type", default)
    if not isinstance(kind, str):
        errors.append(f"{path}.type: expected a name, got {describe(kind)}.")
        return None
    params = tuple(sorted((str(k), _freeze(v)) for k, v in raw.items()))
    return cls(type=kind, params=params)


@dataclass(frozen=True)
class TowerSpec:
    """A tower type from the tower registry plus its constructor arguments.

    YAML: ``tower: {type: mlp, hidden: [256, 128], dropout: 0.1}``. The arguments are
    checked against the registered class's signature in ``validate.py``.
    """

    type: str = "mlp"
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @classmethod
    def __from_raw__(cls, raw: Any, path: str, errors: list[str]) -> TowerSpec | None:
        return _named_from_raw(cls, raw, path, errors, "mlp", "{type: mlp, hidden: [64]}")


@dataclass(frozen=True)
class ModelSpec:
    """A funnel model from the model registry plus its builder's arguments.

    YAML: ``model: esmm`` or ``model: {type: base, oversample: 3}``. The arguments are
    checked against the builder's signature (names and types) in ``validate.py``.
    """

    type: str = "esmm"
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @classmethod
    def __from_raw__(cls, raw: Any, path: str, errors: list[str]) -> ModelSpec | None:
        return _named_from_raw(cls, raw, path, errors, "esmm", "{type: base, oversample: 3}")


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class StageSpec:
    name: str
    label: str | None = None  # label column; defaults to the stage name
    after: str | None = None  # parent stage; None: follows the impression
    positive: tuple[str, ...] | None = None  # label values meaning 1 (else the column must be 0/1)
    weight: float = 1.0  # static loss weight of this stage
    tower: TowerSpec | None = None  # overrides funnel.tower for this stage
    # ESM² branch: a sibling stage (same `after`) that splits the parent's rows; this stage
    # then gets one tower per branch: P = P(after)·[p(via)·y_via + (1-p(via))·y_not_via]
    via: str | None = None
    # mutually exclusive siblings (same `after`) share a group name; their conditional
    # probabilities come from one softmax with a "none of them" outcome; `via: <group>` on a
    # later sibling gives it one tower per member plus one for "none" (k-way ESM² branch)
    group: str | None = None

    @property
    def label_column(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class WeightingSpec:
    """How the per-stage losses are combined (see funnel/models/weighting.py)."""

    method: Literal["static", "uncertainty", "dwa", "gradnorm"] = "static"
    temperature: float = 2.0  # dwa only: softmax temperature T
    alpha: float = 1.5  # gradnorm only: the restoring-force exponent α

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


@dataclass(frozen=True)
class CounterfactualSpec:
    """ESCM² regularisers on conditional edges (see funnel/models/counterfactual.py)."""

    method: Literal["none", "ips", "dr"] = "none"
    weight: float = 0.1  # λ
    clip: float = 0.05  # the propensity P̂(parent) is clipped to [clip, 1]
    stages: tuple[str, ...] = ()  # regularised stages; empty: every single-tower conditional stage

    def __post_init__(self) -> None:
        if self.weight < 0 or not 0 < self.clip <= 1:
            raise ValueError(f"weight must be >= 0 and clip in (0, 1], got {self.weight} and {self.clip}")


@dataclass(frozen=True)
class BiasTowerSpec:
    """A shallow tower on bias-only features (display position, device, ...).

    In training its logit is added to ``stage``'s logit, so that the stage's own tower does
    not have to explain the bias; at evaluation and prediction it is dropped (the debiased
    probability) unless ``keep_at_inference``. The features are read by this tower only.
    """

    features: tuple[str, ...]  # categorical features, used by this tower and no other
    stage: str | None = None  # None: the first stage
    hidden: tuple[int, ...] = (16,)
    keep_at_inference: bool = False
    # in training, each bias feature's id is replaced by the unknown id with this
    # probability (the YouTube paper drops 10% of positions), so the stage tower does not
    # leave everything that correlates with position to the bias tower
    feature_dropout: float = 0.1

    def __post_init__(self) -> None:
        if not self.features:
            raise ValueError("features must list at least one bias-only feature, e.g. [position]")
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ValueError(f"feature_dropout must lie in [0, 1), got {self.feature_dropout}")


# Keys that were flat under `funnel:` before models took arguments; the loader moves them
# into `funnel.model` with a deprecation message (for one release).
FLAT_MODEL_DEFAULTS = {
    "share_embeddings": None,
    "oversample": 1.0,
    "transfer": None,
    "compose": None,
    "calibrator": 0.6,
}
FLAT_MODEL_KEYS = tuple(FLAT_MODEL_DEFAULTS)


@dataclass(frozen=True)
class FunnelSpec:
    stages: tuple[StageSpec, ...]
    # a registered model and its arguments (funnel/models/zoo.py documents each), e.g.
    # esmm | {type: esmm, share_embeddings: false} | {type: aitm, calibrator: 0.3} | {type: base, oversample: 3}
    model: ModelSpec = field(default_factory=ModelSpec)
    embed_dim: int = 8
    tower: TowerSpec = field(default_factory=TowerSpec)
    loss_weighting: WeightingSpec = field(default_factory=WeightingSpec)
    counterfactual: CounterfactualSpec = field(default_factory=CounterfactualSpec)
    # between the shared embeddings and the towers: none | shared_bottom | mmoe | ple
    # (funnel/models/bottoms.py), e.g. {type: mmoe, experts: 4}
    bottom: TowerSpec | None = None
    # YouTube-style shallow tower on bias-only features, added to one stage's logit in training
    bias_tower: BiasTowerSpec | None = None

    def __post_init__(self) -> None:
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")


@dataclass(frozen=True)
class OptimSpec:
    name: Literal["adam", "adamw", "sgd", "adagrad"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    # adam only: embedding tables get sparse gradients and lazy Adam (funnel's LazyAdam, the
    # arithmetic of torch's SparseAdam: only the rows a batch touches are updated, moments
    # included); the rest keeps Adam. Not bit-identical to dense Adam (lazy moments). auto:
    # sparse when the tables hold more than sparse_min_rows rows in all and the config allows
    # it (adam, weight_decay 0, no gradnorm, no gradient_clip_val), else dense; a dense step
    # walks every row of every table (funnel/training/sparse_choice.py)
    sparse_embeddings: bool | Literal["auto"] = "auto"
    # auto's threshold: measured, dense Adam's step time grows with the rows, sparse's does not
    sparse_min_rows: int = 1_000_000
    # the learning rate over the run's steps (funnel/training/schedule.py): constant, cosine or
    # linear decay from lr to lr * min_lr_ratio at the last step of trainer.max_epochs, after a
    # linear warm-up over warmup_steps optimiser steps
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    # an exponential moving average of the weights (funnel/training/averaging.py): 0 is off; with
    # 0 < ema_decay < 1 the average is what is validated, kept as best.ckpt and so predicted and
    # exported; tables that train sparsely keep their own rows. ema_warmup: the decay is
    # min(ema_decay, (1 + n) / (10 + n)) at step n, so that the first weights fade quickly
    ema_decay: float = 0.0
    ema_warmup: bool = True

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be 0 or more, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1] (a share of optim.lr), got {self.min_lr_ratio}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(
                f"optim.ema_decay must be in [0, 1) (0: no weight average; 0.99-0.999 are usual), got {self.ema_decay}"
            )
        if self.sparse_min_rows < 0:
            raise ValueError(f"optim.sparse_min_rows must be 0 or more (embedding rows), got {self.sparse_min_rows}")
        if self.sparse_embeddings is True and self.name != "adam":
            raise ValueError(f"sparse_embeddings works with name: adam (lazy Adam + Adam), not {self.name!r}")
        if self.sparse_embeddings is True and self.weight_decay:
            raise ValueError("sparse_embeddings cannot apply weight_decay (lazy Adam has none); set it to 0")


@dataclass(frozen=True)
class WarmStartSpec:
    """How a run with ``init_from`` takes over the other run (see funnel/training/warm_start.py)."""

    # false: the numeric features keep the first run's mean and std (the model's scale); true:
    # fitted again on the new data
    refit_numerics: bool = False
    # false: the optimiser starts afresh; true: from the other run's optimiser state (the moments
    # and step counts of its best checkpoint; a grown table's new rows get zero moments). Needs the
    # same optim.name and optim.sparse_embeddings; lr and weight_decay are this config's
    init_optimizer: bool = False


TRAINER_OWN_KEYS = ("monitor", "mode", "early_stopping", "save_top_k")
# trainer.logger: Lightning's loggers by name (funnel/training/loggers.py builds them)
LOGGERS = ("csv", "tensorboard", "mlflow")


def _logger_names(value: Any, path: str, errors: list[str]) -> tuple[str, ...] | None:
    """``trainer.logger`` as a tuple of logger names: true is (csv,), false is (). The CSV log
    (logs/metrics.csv, read by reports and --resume) is written whatever the value."""
    if isinstance(value, bool):
        return ("csv",) if value else ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        errors.append(
            f"{path}: give a logger name ({', '.join(LOGGERS)}), a list of them, true (csv) or false; "
            f"got {describe(value)}."
        )
        return None
    unknown = [v for v in items if v not in LOGGERS]
    for name in unknown:
        errors.append(f"{path}: unknown logger {name!r}; known: {', '.join(LOGGERS)}.{did_you_mean(name, LOGGERS)}")
    return None if unknown else tuple(dict.fromkeys(items))


# a cap, not a schedule: early stopping (patience 2 by default) ends most runs sooner
DEFAULT_MAX_EPOCHS = 10


@dataclass(frozen=True)
class TrainerSpec:
    """funnel's own training keys plus keyword arguments for ``lightning.Trainer``."""

    monitor: str | None = None  # default: val/auc/<last stage>
    mode: Literal["max", "min"] = "max"
    # patience in validation epochs; None: off. By default training runs up to DEFAULT_MAX_EPOCHS
    # and stops 2 epochs after the monitored metric last improved (the best epoch is kept)
    early_stopping: int | None = 2
    save_top_k: int = 1
    lightning: tuple[tuple[str, Any], ...] = (("max_epochs", DEFAULT_MAX_EPOCHS),)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.lightning)

    @property
    def clips_gradients(self) -> bool:
        """Whether Lightning clips gradients (``gradient_clip_val``): it refuses that for the
        optimisers sparse embeddings step by hand, so ``optim.sparse_embeddings: auto`` stays dense."""
        return bool(self.kwargs.get("gradient_clip_val"))

    @classmethod
    def __from_raw__(cls, raw: Any, path: str, errors: list[str]) -> TrainerSpec | None:
        import inspect

        import pytorch_lightning as pl

        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            errors.append(f"{path}: expected a mapping of Trainer arguments, got {describe(raw)}.")
            return None
        import typing

        accepted = [p for p in inspect.signature(pl.Trainer.__init__).parameters if p != "self"]
        lightning_hints = typing.get_type_hints(pl.Trainer.__init__)
        own: dict[str, Any] = {}
        passed: dict[str, Any] = {"max_epochs": DEFAULT_MAX_EPOCHS}
        for key, value in raw.items():
            if key in TRAINER_OWN_KEYS:
                own[key] = value
            elif key in ("callbacks", "plugins"):
                errors.append(f"{path}.{key}: cannot be set from YAML; funnel adds checkpointing and early stopping.")
            elif key == "logger":
                names = _logger_names(value, f"{path}.logger", errors)
                if names is not None:
                    passed[key] = names
            elif key == "strategy" and not isinstance(value, str):
                errors.append(f"{path}.strategy: give a strategy name such as ddp, got {describe(value)}.")
            elif key in accepted:
                hint = lightning_hints.get(key, Any)
                if not matches(hint, value):
                    errors.append(
                        f"{path}.{key}: {describe(value)} is not {type_text(hint)} "
                        "(the type lightning.Trainer takes for it)."
                    )
                passed[key] = value
            elif key in ("ckpt_path", "resume", "resume_from_checkpoint"):
                errors.append(
                    f"{path}.{key}: funnel continues an interrupted run with "
                    "`funnel fit --resume RUN_DIR`, not through the config."
                )
            else:
                errors.append(
                    f"{path}.{key}: not a Lightning Trainer argument nor a funnel trainer key."
                    f"{did_you_mean(key, [*accepted, *TRAINER_OWN_KEYS])}"
                )
        hints = {"monitor": str | None, "mode": Literal["max", "min"], "early_stopping": int | None, "save_top_k": int}
        kwargs = {k: convert(hints[k], v, f"{path}.{k}", errors) for k, v in own.items()}
        return cls(lightning=tuple(sorted(passed.items())), **kwargs)


@dataclass(frozen=True)
class Config:
    funnel: FunnelSpec
    data: DataSpec = field(default_factory=DataSpec)
    features: tuple[FeatureSpec, ...] = ()
    optim: OptimSpec = field(default_factory=OptimSpec)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    seed: int = 0
    run_dir: str | None = None  # default: runs/<config stem>/<timestamp>
    # warm start from another run's best checkpoint and encoders (`funnel fit --init-from RUN_DIR`):
    # vocabularies grow, known ids keep their rows, the optimiser starts afresh
    init_from: str | None = None
    warm_start: WarmStartSpec = field(default_factory=WarmStartSpec)
    plugins: tuple[str, ...] = ()  # modules imported first; they may register towers/models
    tune: TuneSpec | None = None  # the search space of `funnel tune` (funnel/spec/tune_spec.py); fit ignores it

    def stage_names(self) -> list[str]:
        return [s.name for s in self.funnel.stages]
