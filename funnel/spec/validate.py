"""Checks that span sections of a converted config (run before any data is read)."""

from __future__ import annotations

from funnel.errors import did_you_mean
from funnel.graph import FunnelGraph, branch_problems, graph_problems, group_problems
from funnel.spec.schema import Config, FeatureSpec

METRIC_PREFIXES = ("auc", "auc_cond", "logloss", "calib")
TABLE_KINDS = ("categorical", "sequence", "multi_hot")  # the feature kinds that own an embedding table


def config_problems(cfg: Config) -> list[str]:
    from funnel.models import MODELS  # registers the built-in models
    from funnel.models.bottoms import bottom_problems
    from funnel.models.towers import tower_problems

    problems: list[str] = []
    monitor = cfg.trainer.monitor or ""
    kind = monitor.split("/")[1] if monitor.count("/") else ""  # val/<kind>[/<stage>]
    if cfg.trainer.mode == "max" and kind.endswith(("loss", "mae")):
        problems.append(
            f"trainer.mode: the monitor {monitor} is lower-is-better, but the mode is max (the default), which "
            "would keep the worst checkpoint; set trainer.mode: min."
        )
    if cfg.trainer.mode == "min" and kind.startswith("auc"):
        problems.append(
            f"trainer.mode: the monitor {monitor} is higher-is-better, but the mode is min, which would keep "
            "the worst checkpoint and stop when it improves; set trainer.mode: max."
        )
    stages = [s for s in cfg.funnel.stages if s is not None]
    complete = len(stages) == len(cfg.funnel.stages)  # else a malformed stage is reported already
    graph_errors = []
    if complete:
        graph_errors = graph_problems([(s.name, s.label_column, s.after) for s in stages])
        graph_errors += group_problems([(s.name, s.after, s.group) for s in stages])
        graph_errors += branch_problems(
            [(s.name, s.after, s.via) for s in stages], {s.name: s.group for s in stages if s.group is not None}
        )
    problems += graph_errors
    f = cfg.funnel
    if f.model.type not in MODELS:
        problems.append(MODELS.unknown(f.model.type))
    else:
        problems += model_problems(cfg, stages)
    names = [s.name for s in stages]
    for k, name in enumerate(f.counterfactual.stages):
        if name not in names:
            problems.append(f"funnel.counterfactual.stages[{k}]: {name!r} is not a stage.{did_you_mean(name, names)}")
        elif stages[names.index(name)].after is None:
            problems.append(
                f"funnel.counterfactual.stages[{k}]: {name!r} follows the impression; only conditional stages "
                "(with `after`) have a propensity to correct for."
            )
    problems += tower_problems(cfg.funnel.tower, "funnel.tower")
    problems += bottom_problems(cfg.funnel.bottom)
    if cfg.optim.sparse_embeddings is True and cfg.funnel.loss_weighting.method == "gradnorm":
        problems.append(
            "optim.sparse_embeddings: gradnorm needs dense gradients of the shared tables; turn one of them off."
        )
    if cfg.optim.sparse_embeddings is True and cfg.trainer.clips_gradients:
        problems.append(
            "optim.sparse_embeddings: steps its optimisers by hand, which Lightning's "
            "gradient_clip_val does not support; remove one of them."
        )
    if cfg.optim.schedule != "constant":
        epochs, steps = cfg.trainer.kwargs.get("max_epochs"), cfg.trainer.kwargs.get("max_steps")
        if (epochs is None or epochs < 0) and (steps is None or steps < 0):
            problems.append(
                f"optim.schedule: {cfg.optim.schedule} decays over the run's last step, but trainer.max_epochs is "
                f"{epochs} (no end) and trainer.max_steps is not set; give one of them, or use schedule: constant."
            )
    problems += _bias_tower_problems(cfg, stages)
    for i, s in enumerate(stages):
        if s.tower is not None:
            problems += tower_problems(s.tower, f"funnel.stages[{i}].tower")
        if s.weight < 0:
            problems.append(f"funnel.stages[{i}].weight: loss weights must be >= 0, got {s.weight}.")

    feats = [f for f in cfg.features if f is not None]
    if not feats:
        problems.append("features: list at least one feature, e.g. [{name: user_id, kind: categorical}].")
    names = [f.name for f in feats]
    # the kinds with an embedding table (a numeric feature has none to share)
    table_names = [f.name for f in feats if f.kind in TABLE_KINDS]
    labels = {s.label_column for s in stages}
    for i, f in enumerate(feats):
        if names.count(f.name) > 1 and names.index(f.name) != i:
            problems.append(f"features[{i}].name: feature {f.name!r} is declared twice.")
        if f.source in labels:
            problems.append(
                f"features[{i}]: column {f.source!r} is a stage label; a label used as a feature leaks the answer."
            )
        problems += _weights_problems(f, i, labels)
        if f.share_with is not None:
            if f.share_with not in table_names or f.share_with == f.name:
                problems.append(
                    f"features[{i}].share_with: {f.share_with!r} is not another categorical, sequence or multi_hot "
                    f"feature.{did_you_mean(f.share_with, table_names)}"
                )
            else:
                owner = feats[names.index(f.share_with)]
                if owner.share_with is not None:
                    problems.append(
                        f"features[{i}].share_with: {f.share_with!r} itself shares {owner.share_with!r}; "
                        f"point share_with at {owner.share_with!r} directly."
                    )
            if f.hash_buckets is not None:
                problems.append(f"features[{i}]: hash_buckets and share_with exclude each other; keep one.")

    d = cfg.data
    if d.synthetic is None and d.train is None:
        problems.append("data: give `train` (a CSV/Parquet path) or `synthetic: {}` for generated data.")
    if d.synthetic is not None and (d.train or d.valid or d.test):
        problems.append("data: `synthetic` and file paths exclude each other; keep one.")
    if d.test and d.test_split is not None:
        problems.append("data.test_split: the test split is the file data.test; give one of them, not both.")
    if d.synthetic is not None and (d.test_split is not None or d.split_by is not None):
        problems.append(
            "data.test_split / data.split_by: generated data has its own splits "
            "(data.synthetic.valid_frac and test_frac); drop them."
        )
    if d.synthetic is not None and stages and complete and not graph_errors:
        # the generator's chain runs parent first, whatever order the stages are listed in
        graph = FunnelGraph.from_stages(stages)
        labels = tuple(s.label for s in graph.stages)
        st = graph.stages
        # generated branching data: (a, b, c) with b and c both after a; c may use `via: b` (ESM²)
        # or ignore the branch (plain ESMM on the same data, for comparison)
        shape = len(st) >= 3 and st[-1].after == st[-3].name and st[-2].after == st[-3].name
        via_ok = all(len(s.edges) == 1 for s in st[:-1]) and (
            len(st[-1].edges) == 1 or st[-1].edges[0].source == st[-2].name
        )
        if d.synthetic.branch and not (shape and via_ok):
            problems.append(
                "data.synthetic.branch: generated branching data has stages (a, b, c) with b `after: a` and "
                "c `after: a` (optionally `via: b`); the funnel's stages do not match."
            )
        if not d.synthetic.branch and any(len(s.edges) > 1 for s in st):
            problems.append("data.synthetic.branch: a funnel with `via` needs branching data; set it to true.")
        if tuple(d.synthetic.stages) != labels:
            problems.append(
                f"data.synthetic.stages: {list(d.synthetic.stages)} must be the funnel's label columns "
                f"{list(labels)} in order; leave it out to use them."
            )
    if d.csv.header is False and not d.csv.names:
        problems.append("data.csv.names: a file without header needs the column names listed here.")

    if stages and complete and not graph_errors:
        monitor = cfg.trainer.monitor or default_monitor(FunnelGraph.from_stages(stages))
        valid = [f"val/{m}/{s.name}" for m in METRIC_PREFIXES for s in stages] + ["val/loss", "val/auc_mean"]
        if monitor not in valid:
            problems.append(
                f"trainer.monitor: {monitor!r} is not a logged metric.{did_you_mean(monitor, valid)} "
                f"Choose from: {', '.join(valid)}."
            )
    return problems


def _weights_problems(f: FeatureSpec, i: int, labels: set[str]) -> list[str]:
    """A multi-hot feature's weight column: neither a label (a leak) nor its own id column."""
    if f.weights is None:
        return []
    if f.weights in labels:
        return [
            f"features[{i}].weights: column {f.weights!r} is a stage label; a label used as a weight leaks the answer."
        ]
    if f.weights == f.source:
        return [
            f"features[{i}].weights: {f.weights!r} is the column of the ids themselves; name the column that "
            "holds their weights, or remove `weights`."
        ]
    return []


def default_monitor(graph: FunnelGraph) -> str:
    """The metric that picks the best checkpoint when trainer.monitor is not set: the path AUC of
    the graph's last stage (its topological order, not the order the stages are listed in)."""
    return f"val/auc/{graph.names[-1]}"


def model_problems(cfg: Config, stages: list) -> list[str]:
    """The model's arguments against its builder, and what the config asks of the model
    against the capabilities it declares (with those arguments)."""
    from funnel.models.registry import MODELS, argument_problems

    f = cfg.funnel
    problems = argument_problems(f)
    if problems:
        return problems
    name = f.model.type
    caps = MODELS.get(name).capabilities_for(f.model.kwargs)

    def able(what: str) -> str:  # the models that can, with their default arguments
        able = [m for m in MODELS.names() if getattr(MODELS.get(m).capabilities_for({}), what)]
        return ", ".join(able) or "none"

    args = f" with {dict(f.model.params)}" if f.model.params else ""
    branched = [s.name for s in stages if s.via is not None]
    if branched and not caps.branches:
        problems.append(
            f"funnel.model: {name!r}{args} supports chains only, but stage {branched[0]!r} has `via`. "
            f"Models with branches: {able('branches')} (conditional towers multiplied along the path)."
        )
    group_size = {g: sum(s.group == g for s in stages) for g in {s.group for s in stages} - {None}}
    grouped = [s.name for s in stages if group_size.get(s.group, 0) > 1]
    if grouped and not caps.groups:
        problems.append(
            f"funnel.model: stage {grouped[0]!r} is in a group of exclusive outcomes, which needs conditional "
            f"towers multiplied along the path; model {name!r}{args} cannot express it. Models with groups: "
            f"{able('groups')}; or remove `group`."
        )
    if f.bottom is not None and f.bottom.type != "none" and not caps.bottom:
        problems.append(
            f"funnel.bottom: a shared bottom needs shared embeddings, but model {name!r}{args} gives every tower "
            f"its own tables. Models with a bottom: {able('bottom')}; or set funnel.model.share_embeddings: true."
        )
    if f.loss_weighting.method == "gradnorm" and not caps.gradnorm:
        problems.append(
            f"funnel.loss_weighting: gradnorm balances gradients on the shared embeddings, but model {name!r}{args} "
            "has private tables; set funnel.model.share_embeddings: true or pick another method."
        )
    if f.counterfactual.method != "none" and f.counterfactual.method not in caps.counterfactual:
        problems.append(
            f"funnel.counterfactual: {f.counterfactual.method} imputes errors from the shared embeddings, but model "
            f"{name!r}{args} has private tables; set funnel.model.share_embeddings: true or use "
            f"{' or '.join(caps.counterfactual)}."
        )
    return problems


def _bias_tower_problems(cfg: Config, stages: list) -> list[str]:
    bias = cfg.funnel.bias_tower
    if bias is None:
        return []
    problems = []
    kinds = {f.name: f.kind for f in cfg.features if f is not None}
    for k, name in enumerate(bias.features):
        if name not in kinds:
            problems.append(
                f"funnel.bias_tower.features[{k}]: {name!r} is not a feature.{did_you_mean(name, list(kinds))} "
                "List it under `features:` as kind categorical."
            )
        elif kinds[name] != "categorical":
            problems.append(
                f"funnel.bias_tower.features[{k}]: {name!r} is {kinds[name]}; the bias tower takes "
                "categorical features (bucket a numeric position into a category)."
            )
    names = [s.name for s in stages]
    if bias.stage is not None and bias.stage not in names:
        problems.append(f"funnel.bias_tower.stage: {bias.stage!r} is not a stage.{did_you_mean(bias.stage, names)}")
    elif any(s.name == (bias.stage or names[0] if names else None) and s.via is not None for s in stages):
        problems.append(
            "funnel.bias_tower.stage: a stage reached through branches (`via`) has several towers; "
            "pick a chain stage such as the first one."
        )
    return problems
