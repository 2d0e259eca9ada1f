"""The bad-input corpus: every command, fed broken configs, data, run directories, checkpoints,
output paths, plug-ins and busy folders, must exit 2 with a message that names the culprit,
print no traceback, and leave every file that existed before exactly as it was (and make none).

Each case builds its inputs in its own folder and returns the command line and the words its
message must contain. The fitted run and the data it reads are shared and checked too.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.test_cli import run_cli


@dataclass
class Ctx:
    tmp: Path  # this case's own folder
    data: Path  # the tiny synthetic CSVs (shared, read-only)
    run: Path  # a fitted run (shared, read-only)
    base_cfg: dict

    def cfg(self) -> dict:
        cfg = copy.deepcopy(self.base_cfg)
        cfg["run_dir"] = str(self.tmp / "run")
        return cfg

    def write(self, content: dict | str, name: str = "config.yaml") -> str:
        path = self.tmp / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
        return str(path)

    def frame(self, split: str = "train") -> pd.DataFrame:
        return pd.read_csv(self.data / f"{split}.csv")

    def csv(self, df: pd.DataFrame, name: str) -> str:
        df.to_csv(self.tmp / name, index=False)
        return str(self.tmp / name)

    def copy_run(self) -> Path:
        dst = self.tmp / "copied_run"
        shutil.copytree(self.run, dst)
        return dst

    def with_train(self, df: pd.DataFrame, **data) -> dict:
        cfg = self.cfg()
        cfg["data"]["train"] = self.csv(df, "train_bad.csv")
        cfg["data"].update(data)
        return cfg


Case = Callable[[Ctx], tuple[list[str], list[str]]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        assert name not in CASES, name
        CASES[name] = fn
        return fn

    return register


# ---- configs: each is fed to fit, check and compare ------------------------------------------------------
def _set(path: str, value) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        node = cfg
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(keys[-1])] = value
        else:
            node[keys[-1]] = value

    return mutate


def _drop(path: str) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        node = cfg
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]

    return mutate


CONFIG_ERRORS: dict[str, tuple[Callable[[dict], None], list[str]]] = {
    "unknown_top_key": (_set("optimiser", {"lr": 0.1}), ["optimiser", "unknown key", "optim"]),
    "unknown_funnel_key": (_set("funnel.embed_dims", 4), ["funnel.embed_dims", "embed_dim"]),
    "unknown_model": (_set("funnel.model", "esmmm"), ["esmmm", "esmm"]),
    "stage_after_unknown": (_set("funnel.stages.1.after", "clik"), ["clik", "click"]),
    "stage_cycle": (_set("funnel.stages.0.after", "conversion"), ["conversion", "click"]),
    "duplicate_stage": (_set("funnel.stages.1.name", "click"), ["click"]),
    "embed_dim_zero": (_set("funnel.embed_dim", 0), ["embed_dim", "0"]),
    "embed_dim_text": (_set("funnel.embed_dim", "four"), ["funnel.embed_dim", "four"]),
    "negative_lr": (_set("optim.lr", -0.1), ["optim.lr", "-0.1"]),
    "optimiser_name": (_set("optim.name", "adamx"), ["optim.name", "adamx", "adam"]),
    "lr_schedule": (_set("optim.schedule", "cosin"), ["optim.schedule", "cosin", "cosine"]),
    "min_lr_ratio": (_set("optim.min_lr_ratio", 2.0), ["optim.min_lr_ratio", "2.0", "[0, 1]"]),
    "warmup_negative": (_set("optim.warmup_steps", -1), ["optim.warmup_steps", "-1"]),
    "ema_decay_one": (_set("optim.ema_decay", 1.0), ["optim.ema_decay", "1.0", "[0, 1)"]),
    "ema_warmup_text": (_set("optim.ema_warmup", "often"), ["optim.ema_warmup", "often"]),
    "schedule_without_end": (
        lambda c: (_set("optim.schedule", "cosine")(c), _set("trainer.max_epochs", -1)(c)),
        ["optim.schedule", "cosine", "trainer.max_steps", "schedule: constant"],
    ),
    "sparse_embeddings_maybe": (_set("optim.sparse_embeddings", "maybe"), ["optim.sparse_embeddings", "maybe"]),
    "sparse_min_rows_negative": (_set("optim.sparse_min_rows", -5), ["optim.sparse_min_rows", "-5"]),
    "max_epochs_text": (_set("trainer.max_epochs", "abc"), ["trainer.max_epochs", "'abc'", "integer"]),
    "max_epochs_fraction": (_set("trainer.max_epochs", 1.5), ["trainer.max_epochs", "1.5", "integer"]),
    "max_epochs_negative": (_set("trainer.max_epochs", -5), ["max_epochs", "-5"]),
    "precision": (_set("trainer.precision", "bf17"), ["trainer.precision", "bf17", "bf16-mixed"]),
    "strategy": (_set("trainer.strategy", "dpp"), ["trainer.strategy: 'dpp'"]),
    "accelerator": (_set("trainer.accelerator", "tpu"), ["trainer.accelerator: 'tpu'"]),
    "val_check_fraction": (_set("trainer.val_check_interval", 5.0), ["trainer.val_check_interval", "5.0", "(0, 1]"]),
    "val_check_batches": (_set("trainer.val_check_interval", 1000), ["trainer.val_check_interval", "1000", "10"]),
    "accumulate_zero": (_set("trainer.accumulate_grad_batches", 0), ["trainer.accumulate_grad_batches", "0"]),
    "callbacks": (_set("trainer.callbacks", ["x"]), ["trainer.callbacks"]),
    "logger_text": (_set("trainer.logger", "tensorbord"), ["trainer.logger", "tensorbord", "tensorboard"]),
    "ckpt_path": (_set("trainer.ckpt_path", "last.ckpt"), ["trainer.ckpt_path", "--resume"]),
    "monitor": (_set("trainer.monitor", "val/auc/convrsion"), ["val/auc/convrsion", "val/auc/conversion"]),
    "monitor_loss_max": (_set("trainer.monitor", "val/loss"), ["val/loss", "lower-is-better", "trainer.mode: min"]),
    "monitor_auc_min": (
        lambda c: c["trainer"].update({"monitor": "val/auc/click", "mode": "min"}),
        ["val/auc/click", "higher-is-better", "trainer.mode: max"],
    ),
    "trainer_unknown": (_set("trainer.max_epoch", 2), ["trainer.max_epoch", "max_epochs"]),
    "early_stopping_text": (_set("trainer.early_stopping", "two"), ["trainer.early_stopping", "two"]),
    "batch_size_zero": (_set("data.batch_size", 0), ["batch_size", "0"]),
    "valid_split": (_set("data.valid_split", 1.5), ["valid_split", "1.5"]),
    "train_missing": (_set("data.train", "/nonexistent/train.csv"), ["/nonexistent/train.csv", "does not exist"]),
    "label_conflicts": (_set("data.label_conflicts", "ignore"), ["data.label_conflicts", "ignore"]),
    "no_features": (_set("features", []), ["features", "at least one"]),
    "feature_kind": (_set("features.0.kind", "categoric"), ["features[0].kind", "categoric", "categorical"]),
    "feature_option_of_other_kind": (_set("features.4.min_count", 2), ["features[4].min_count", "numeric"]),
    "share_with_unknown": (_set("features.1.share_with", "user"), ["share_with", "user", "user_id"]),
    "numeric_transform": (_set("features.4.transform", "quantiles"), ["features[4].transform", "quantile"]),
    "bottom_dupn_argument": (_set("funnel.bottom", {"type": "dupn", "hidden": [8]}), ["dupn", "hidden"]),
    "label_as_feature": (lambda c: c["features"].append({"name": "click", "kind": "numeric"}), ["click", "label"]),
    "tower_type": (_set("funnel.tower.type", "mlpp"), ["mlpp", "mlp"]),
    "tower_argument": (_set("funnel.tower.hiden", [8]), ["hiden", "hidden"]),
    "bottom_type": (_set("funnel.bottom", {"type": "mmoee"}), ["mmoee", "mmoe"]),
    "plugin_missing": (_set("plugins", ["no_such_plugin_module"]), ["plugins", "no_such_plugin_module"]),
    "csv_no_names": (_set("data.csv", {"header": False}), ["data.csv.names"]),
    "seed_text": (_set("seed", "zero"), ["seed", "zero"]),
    "stages_missing": (_drop("funnel.stages"), ["funnel.stages", "required"]),
    "stage_weight": (_set("funnel.stages.1.weight", -1), ["weight", "-1"]),
    "oversample_not_base": (_set("funnel.oversample", 2.0), ["funnel.model.oversample", "'esmm'"]),
    "model_argument": (_set("funnel.model", {"type": "base", "oversampel": 2}), ["oversampel", "oversample"]),
    "model_argument_type": (_set("funnel.model", {"type": "aitm", "compose": "sum"}), ["compose", "'sum'", "direct"]),
    "model_argument_value": (_set("funnel.model", {"type": "base", "oversample": 0.5}), ["oversample", "0.5"]),
    "model_groups": (
        lambda c: c["funnel"].update(
            model="division",
            stages=[
                {"name": "click"},
                {"name": "conversion", "after": "click", "group": "g"},
                {"name": "other", "label": "click", "after": "click", "group": "g"},
            ],
        ),
        ["group", "division"],
    ),
    "model_bottom": (
        lambda c: c["funnel"].update(model={"type": "esmm", "share_embeddings": False}, bottom={"type": "mmoe"}),
        ["funnel.bottom", "share_embeddings"],
    ),
}

for _name, (_mutate, _words) in CONFIG_ERRORS.items():
    for _command in ("fit", "check", "compare"):

        def _config_case(ctx: Ctx, mutate=_mutate, words=_words, command=_command):
            cfg = ctx.cfg()
            mutate(cfg)
            model = cfg["funnel"].get("model", "esmm")
            model = model.get("type", "esmm") if isinstance(model, dict) else model
            extra = (
                ["--models", str(model), "--seeds", "1", "--out", str(ctx.tmp / "cmp")] if command == "compare" else []
            )
            return [command, ctx.write(cfg), *extra], words

        case(f"{_command}-config-{_name}")(_config_case)

for _name in ("max_epochs_text", "precision", "val_check_fraction"):

    def _print_config_case(ctx: Ctx, mutate=CONFIG_ERRORS[_name][0], words=CONFIG_ERRORS[_name][1]):
        cfg = ctx.cfg()
        mutate(cfg)
        return ["fit", ctx.write(cfg), "--print-config"], words

    case(f"print-config-{_name}")(_print_config_case)


# ---- config files and overrides ----------------------------------------------------------------------------
@case("fit-config-file-missing")
def _(ctx):
    return ["fit", str(ctx.tmp / "nope.yaml")], ["nope.yaml", "does not exist"]


@case("check-config-not-yaml")
def _(ctx):
    return ["check", ctx.write("funnel: [unclosed\n")], ["not valid YAML"]


@case("fit-config-a-list")
def _(ctx):
    return ["fit", ctx.write("- a\n- b\n")], ["top level must be a mapping"]


OVERRIDE_ERRORS: dict[str, tuple[str, list[str]]] = {
    "without_equals": ("optim.lr", ["optim.lr", "key.sub=value"]),
    "index_out_of_range": ("funnel.stages.5.weight=2", ["funnel.stages.5", "out of range"]),
    "no_item_named": ("funnel.stages.conversoin.weight=2", ["conversoin", "conversion"]),
    "type": ("trainer.max_epochs=abc", ["trainer.max_epochs", "abc"]),
    "not_a_mapping": ("seed.value=3", ["seed", "not a mapping"]),
}

for _name, (_override, _words) in OVERRIDE_ERRORS.items():
    for _argv in (["fit"], ["check"], ["fit", "--print-config"]):

        def _override_case(ctx: Ctx, override=_override, words=_words, argv=_argv):
            return [argv[0], ctx.write(ctx.cfg()), *argv[1:], override], words

        case(f"{'-'.join(_argv).replace('--', '')}-override-{_name}")(_override_case)


# ---- plug-ins -----------------------------------------------------------------------------------------------
def _plugin(ctx: Ctx, source: str, monkeypatch_path: list[str]) -> dict:
    name = f"corpus_plugin_{hashlib.md5(source.encode()).hexdigest()[:8]}"
    (ctx.tmp / f"{name}.py").write_text(source)
    monkeypatch_path.append(str(ctx.tmp))
    cfg = ctx.cfg()
    cfg["plugins"] = [name]
    return cfg


@case("fit-plugin-syntax-error")
def _(ctx):
    cfg = _plugin(ctx, "def broken(:\n", ctx.sys_path)
    return ["fit", ctx.write(cfg)], ["plugins", "syntax error", "line 1"]


@case("check-plugin-raises-at-import")
def _(ctx):
    cfg = _plugin(ctx, "raise RuntimeError('no licence key')\n", ctx.sys_path)
    return ["check", ctx.write(cfg)], ["plugins", "RuntimeError", "no licence key"]


@case("compare-plugin-raises-at-import")
def _(ctx):
    cfg = _plugin(ctx, "import nonexistent_dependency_xyz\n", ctx.sys_path)
    return ["compare", ctx.write(cfg), "--seeds", "1"], ["plugins", "nonexistent_dependency_xyz"]


# ---- data: each is fed to fit, check and prepare ---------------------------------------------------------
def _data_case(make: Callable[[Ctx], tuple[dict, list[str]]]) -> Callable[[str], None]:
    def register(name: str) -> None:
        for command in ("fit", "check", "prepare"):

            def run(ctx: Ctx, command=command):
                cfg, words = make(ctx)
                if command == "prepare":  # it writes the cache (the session's, outside the case folder)
                    cfg["data"]["cache"] = True
                return [command, ctx.write(cfg)], words

            case(f"{command}-data-{name}")(run)

    return register


_data_case(lambda c: (c.with_train(c.frame().drop(columns=["price"])), ["price", "missing"]))("column_missing")
_data_case(lambda c: (c.with_train(c.frame().assign(price=["cheap"] * 2400)), ["price", "cheap", "categorical"]))(
    "numeric_text"
)
_data_case(lambda c: (c.with_train(c.frame().assign(click=2)), ["click", "0/1", "positive"]))("label_not_binary")
_data_case(lambda c: (c.with_train(c.frame().assign(click=[None] + [0] * 2399)), ["click", "missing values"]))(
    "label_missing"
)
_data_case(lambda c: (c.with_train(c.frame().head(0)), ["train", "0 rows"]))("train_header_only")
_data_case(
    lambda c: (c.with_train(c.frame(), valid=c.csv(c.frame("valid").head(0), "valid0.csv")), ["valid", "0 rows"])
)("valid_header_only")
_data_case(lambda c: (c.with_train(c.frame().assign(conversion=0)), ["conversion", "positives"]))("stage_no_positives")
_data_case(lambda c: (c.with_train(c.frame().assign(click=1, conversion=1)), ["click", "negatives"]))(
    "stage_no_negatives"
)
_data_case(lambda c: (c.with_train(c.frame().assign(price=-1.0)), ["price", "log1p"]))("log1p_negative")


def _train_at(path: str) -> Callable[[Ctx], tuple[dict, list[str]]]:
    """data.train pointed at a folder or glob (made under the case folder) that holds no usable shard."""

    def make(ctx: Ctx):
        cfg = ctx.cfg()
        (ctx.tmp / "shards").mkdir(exist_ok=True)
        cfg["data"]["train"] = str(ctx.tmp / path)
        return cfg, ["data.train", "holds no data file"]

    return make


_data_case(_train_at("shards"))("train_empty_folder")
_data_case(_train_at("shards/part-*.parquet"))("train_glob_matches_nothing")


def _mixed_shards(ctx: Ctx):
    cfg = ctx.cfg()
    shards = ctx.tmp / "mixed"
    shards.mkdir(exist_ok=True)
    ctx.frame().head(10).to_csv(shards / "a.csv", index=False)
    ctx.frame().head(10).to_parquet(shards / "b.parquet", index=False)
    cfg["data"]["train"] = str(shards)
    return cfg, ["data.train", "mixes CSV and Parquet"]


_data_case(_mixed_shards)("train_mixed_formats")


def _inf_with_error_policy(ctx: Ctx):
    cfg = ctx.with_train(ctx.frame().assign(user_age=[float("inf")] + [30.0] * 2399))
    cfg["features"].append({"name": "user_age", "kind": "numeric", "missing": "error"})
    return cfg, ["user_age", "inf"]


_data_case(_inf_with_error_policy)("inf_missing_error")


def _conflicts_error(ctx: Ctx):
    df = ctx.frame()
    df.loc[df.index[:3], ["click", "conversion"]] = [0, 1]
    return ctx.with_train(df, label_conflicts="error"), ["label conflicts", "label_conflicts"]


_data_case(_conflicts_error)("label_conflicts_error")


def _random_parquet(ctx: Ctx):
    path = ctx.tmp / "garbage.parquet"
    path.write_bytes(os.urandom(2048))
    cfg = ctx.cfg()
    cfg["data"]["train"] = str(path)
    return cfg, ["garbage.parquet", "Parquet"]


_data_case(_random_parquet)("random_bytes_parquet")


def _wrong_separator(ctx: Ctx):
    cfg = ctx.with_train(ctx.frame(), csv={"sep": ";"})
    return cfg, ["user_id", "missing"]


_data_case(_wrong_separator)("wrong_separator")


def _positive_matches_nothing(ctx: Ctx):
    cfg = ctx.cfg()
    cfg["funnel"]["stages"][0]["positive"] = ["yes"]
    return cfg, ["click", "positives"]


_data_case(_positive_matches_nothing)("positive_matches_nothing")


# ---- run directories and training ---------------------------------------------------------------------------
@case("fit-run-dir-not-empty")
def _(ctx):
    (ctx.tmp / "run").mkdir()
    (ctx.tmp / "run" / "notes.txt").write_text("my notes")
    return ["fit", ctx.write(ctx.cfg())], ["run_dir", "not empty", "never overwrites"]


@case("fit-run-dir-is-a-file")
def _(ctx):
    (ctx.tmp / "run").write_text("a file")
    return ["fit", ctx.write(ctx.cfg())], ["run_dir", "is a file"]


@case("fit-run-dir-busy")
def _(ctx):
    (ctx.tmp / "run").mkdir()
    import socket

    (ctx.tmp / "run" / ".lock").write_text(f"{socket.gethostname()} {os.getppid()}\n")  # a live process
    return ["fit", ctx.write(ctx.cfg())], ["in use by another funnel process", str(os.getppid())]


@case("fit-diverges")
def _(ctx):
    cfg = ctx.cfg()
    cfg["optim"]["lr"] = 10.0
    cfg["trainer"]["max_epochs"] = 4
    return ["fit", ctx.write(cfg)], ["diverged", "optim.lr", "10"]


@case("fit-no-config")
def _(ctx):
    return ["fit"], ["config file", "--resume"]


@case("fit-resume-not-a-run")
def _(ctx):
    (ctx.tmp / "empty").mkdir()
    return ["fit", "--resume", str(ctx.tmp / "empty")], ["empty", "not a funnel run directory"]


@case("fit-resume-finished-run")
def _(ctx):
    return ["fit", "--resume", str(ctx.run)], ["finished training already", "nothing to resume"]


@case("fit-resume-with-config")
def _(ctx):
    return ["fit", ctx.write(ctx.cfg()), "--resume", str(ctx.run)], ["--resume", "takes no config"]


@case("fit-resume-with-overrides")
def _(ctx):
    return ["fit", "--resume", str(ctx.run), "optim.lr=0.1"], ["--resume", "overrides"]


# ---- fit --init-from (warm start) ---------------------------------------------------------------------------
@case("fit-init-from-not-a-run")
def _(ctx):
    (ctx.tmp / "empty").mkdir()
    return ["fit", ctx.write(ctx.cfg()), "--init-from", str(ctx.tmp / "empty")], ["init_from", "not a funnel run"]


@case("fit-init-from-incompatible-run")
def _(ctx):
    cfg = ctx.cfg()
    cfg["funnel"]["embed_dim"] = 7
    return ["fit", ctx.write(cfg), "--init-from", str(ctx.run)], ["init_from", "funnel.embed_dim", "from scratch"]


# ---- convert ------------------------------------------------------------------------------------------------
@case("convert-aliccp-raw-dir-missing")
def _(ctx):
    return ["convert", "ali-ccp", str(ctx.tmp / "nope"), str(ctx.tmp / "out")], ["RAW_DIR", "nope", "not a folder"]


@case("convert-paddlerec-input-missing")
def _(ctx):
    return ["convert", "paddlerec-esmm", str(ctx.tmp / "nope.txt"), str(ctx.tmp / "out")], ["nope.txt", "not exist"]


@case("convert-out-dir-not-empty")
def _(ctx):
    (ctx.tmp / "full").mkdir()
    (ctx.tmp / "full" / "keep.txt").write_text("earlier output")
    (ctx.tmp / "in.txt").write_text("1,0,0,101:5\n")
    return ["convert", "paddlerec-esmm", str(ctx.tmp / "in.txt"), str(ctx.tmp / "full")], ["OUT_DIR", "not empty"]


@case("convert-shard-rows-zero")
def _(ctx):
    (ctx.tmp / "in.txt").write_text("1,0,0,101:5\n")
    return ["convert", "paddlerec-esmm", str(ctx.tmp / "in.txt"), str(ctx.tmp / "out"), "--shard-rows", "0"], [
        "--shard-rows",
        ">= 1",
    ]


# ---- export -------------------------------------------------------------------------------------------------
@case("export-run-dir-missing")
def _(ctx):
    return ["export", str(ctx.tmp / "nope"), "--format", "torchscript", "--out", str(ctx.tmp / "e")], [
        "nope",
        "not a funnel run directory",
    ]


@case("export-out-not-empty")
def _(ctx):
    (ctx.tmp / "full").mkdir()
    (ctx.tmp / "full" / "keep.txt").write_text("earlier output")
    return ["export", str(ctx.run), "--format", "torchscript", "--out", str(ctx.tmp / "full")], ["--out", "not empty"]


@case("export-split-unknown-feature")
def _(ctx):
    return ["export", str(ctx.run), "--format", "torchscript", "--out", str(ctx.tmp / "e"), "--split", "user=usr"], [
        "--split",
        "'usr' is not a feature the model reads",
    ]


@case("export-split-not-user")
def _(ctx):
    out = ["export", str(ctx.run), "--format", "torchscript", "--out", str(ctx.tmp / "e"), "--split", "item_id"]
    return out, ["--split", "user=FEATURE"]


# ---- evaluate ---------------------------------------------------------------------------------------------
def _evaluate(ctx: Ctx, run: Path | None = None, data: str | None = None, *extra: str) -> list[str]:
    return ["evaluate", str(run or ctx.run), "--data", data or str(ctx.data / "test.csv"), *extra]


@case("evaluate-run-dir-missing")
def _(ctx):
    return _evaluate(ctx, ctx.tmp / "nope"), ["nope", "not a funnel run directory"]


@case("evaluate-data-missing")
def _(ctx):
    return _evaluate(ctx, None, str(ctx.tmp / "nope.csv")), ["nope.csv", "does not exist"]


@case("evaluate-label-column-missing")
def _(ctx):
    return _evaluate(ctx, None, ctx.csv(ctx.frame("test").drop(columns=["conversion"]), "t.csv")), [
        "conversion",
        "missing",
    ]


@case("evaluate-out-extension")
def _(ctx):
    return _evaluate(ctx, None, None, "--out", str(ctx.tmp / "m.txt")), ["--out", "m.txt", ".json"]


@case("evaluate-out-is-the-runs-metrics")
def _(ctx):
    run = ctx.copy_run()
    return _evaluate(ctx, run, None, "--out", str(run / "metrics.json")), ["--out", "metrics.json", "input"]


def _edit_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        cfg = yaml.safe_load(path.read_text())
        change(cfg)
        path.write_text(yaml.safe_dump(cfg))

    return edit


def _write(content: str | bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(content if isinstance(content, bytes) else content.encode())


# a copy of the fitted run with one file damaged: (file, damage, words the message must contain)
RUN_DAMAGE: dict[str, tuple[str, Callable[[Path], None], list[str]]] = {
    "encoders-malformed-json": ("encoders.json", _write("{not json"), ["encoders.json"]),
    "encoders-wrong-shape": ("encoders.json", _write('{"format": 1, "features": [{"spec": 3}]}'), ["encoders.json"]),
    "encoders-wrong-format": ("encoders.json", _write('{"format": 99, "features": []}'), ["encoders.json", "99"]),
    "encoders-missing": ("encoders.json", Path.unlink, ["encoders.json"]),
    "checkpoint-random-bytes": ("checkpoints/best.ckpt", _write(os.urandom(4096)), ["best.ckpt", "cannot be loaded"]),
    "checkpoint-truncated": (
        "checkpoints/best.ckpt",
        lambda p: p.write_bytes(p.read_bytes()[:500]),
        ["best.ckpt", "cannot be loaded"],
    ),
    "checkpoint-missing": ("checkpoints/best.ckpt", Path.unlink, ["best.ckpt", "--resume"]),
    "interrupted-run": (
        "checkpoints/best.ckpt",
        lambda p: p.rename(p.with_name("last.ckpt")),
        ["interrupted", "--resume"],
    ),
    "config-corrupt": ("config.yaml", _write("funnel: [\n"), ["config.yaml", "YAML"]),
    "config-edited-wrong": (
        "config.yaml",
        _edit_config(lambda c: c["funnel"].update(embed_dim=7)),
        ["best.ckpt", "does not match"],
    ),
    "untrusted-plugins": (
        "config.yaml",
        _edit_config(lambda c: c.update(plugins=["os"])),
        ["plugin", "os", "--trust-plugins"],
    ),
}

for _name, (_file, _damage, _words) in RUN_DAMAGE.items():
    for _command in ("evaluate", "predict"):

        def _damaged_run_case(ctx: Ctx, file=_file, damage=_damage, words=_words, command=_command):
            run = ctx.copy_run()
            damage(run / file)
            if command == "evaluate":
                return _evaluate(ctx, run), words
            return _predict(ctx, run=run), words

        case(f"{_command}-{_name}")(_damaged_run_case)


@case("evaluate-random-bytes-parquet")
def _(ctx):
    (ctx.tmp / "t.parquet").write_bytes(os.urandom(1000))
    return _evaluate(ctx, None, str(ctx.tmp / "t.parquet")), ["t.parquet", "Parquet"]


@case("evaluate-label-not-binary")
def _(ctx):
    return _evaluate(ctx, None, ctx.csv(ctx.frame("test").assign(click=3), "t.csv")), ["click", "0/1"]


# ---- predict ------------------------------------------------------------------------------------------------
def _predict(ctx: Ctx, data: str | None = None, out: str | None = None, *extra: str, run: Path | None = None):
    return [
        "predict",
        str(run or ctx.run),
        "--data",
        data or str(ctx.data / "test.csv"),
        "--out",
        out or str(ctx.tmp / "p.csv"),
        *extra,
    ]


@case("predict-out-is-the-input-csv")
def _(ctx):
    data = ctx.csv(ctx.frame("test"), "in.csv")
    return _predict(ctx, data, data), ["--out", "in.csv", "input"]


@case("predict-out-is-the-input-parquet")
def _(ctx):
    ctx.frame("test").to_parquet(ctx.tmp / "in.parquet")
    data = str(ctx.tmp / "in.parquet")
    return _predict(ctx, data, data), ["--out", "in.parquet", "input"]


@case("predict-out-is-the-input-by-another-name")
def _(ctx):
    data = ctx.csv(ctx.frame("test"), "in.csv")
    (ctx.tmp / "sub").mkdir()
    return _predict(ctx, data, str(ctx.tmp / "sub" / ".." / "in.csv")), ["--out", "input"]


@case("predict-out-unknown-extension")
def _(ctx):
    return _predict(ctx, None, str(ctx.tmp / "p.txt")), ["--out", "p.txt", ".csv", ".parquet"]


@case("predict-out-no-extension")
def _(ctx):
    return _predict(ctx, None, str(ctx.tmp / "predictions")), ["--out", "predictions", "extension"]


@case("predict-out-is-a-folder")
def _(ctx):
    (ctx.tmp / "dir.csv").mkdir()
    return _predict(ctx, None, str(ctx.tmp / "dir.csv")), ["dir.csv", "folder"]


@case("predict-keep-missing-column")
def _(ctx):
    return _predict(ctx, None, None, "--keep", "user_idd"), ["--keep", "user_idd"]


@case("predict-keep-collides-with-output-parquet")
def _(ctx):
    data = ctx.csv(ctx.frame("test").assign(p_click=0.5), "in.csv")
    return _predict(ctx, data, str(ctx.tmp / "p.parquet"), "--keep", "p_click"), ["--keep", "p_click"]


@case("predict-keep-twice")
def _(ctx):
    return _predict(ctx, None, None, "--keep", "user_id,user_id"), ["--keep", "twice"]


@case("predict-chunk-rows-zero")
def _(ctx):
    return _predict(ctx, None, None, "--chunk-rows", "0"), ["--chunk-rows", "0"]


@case("predict-batch-size-negative")
def _(ctx):
    return _predict(ctx, None, None, "--batch-size", "-4"), ["--batch-size", "-4"]


@case("predict-feature-column-missing")
def _(ctx):
    return _predict(ctx, ctx.csv(ctx.frame("test").drop(columns=["item_id"]), "in.csv")), ["item_id", "missing"]


@case("predict-bad-value-in-a-late-chunk-keeps-the-old-output")
def _(ctx):
    df = ctx.frame("test")
    df["price"] = df["price"].astype(object)
    df.loc[250, "price"] = "n/a?"
    (ctx.tmp / "p.csv").write_text("an earlier, complete output\n")
    return _predict(ctx, ctx.csv(df, "in.csv"), None, "--chunk-rows", "100"), ["price", "n/a?"]


@case("predict-not-a-run")
def _(ctx):
    return _predict(ctx, run=ctx.data), ["not a funnel run directory"]


@case("predict-data-missing")
def _(ctx):
    return _predict(ctx, str(ctx.tmp / "gone.csv")), ["gone.csv", "does not exist"]


@case("predict-data-random-parquet")
def _(ctx):
    (ctx.tmp / "in.parquet").write_bytes(os.urandom(3000))
    return _predict(ctx, str(ctx.tmp / "in.parquet")), ["in.parquet", "Parquet"]


# ---- synth and compare ----------------------------------------------------------------------------------------
@case("synth-existing-files")
def _(ctx):
    (ctx.tmp / "train.csv").write_text("mine\n")
    return ["synth", str(ctx.tmp), "--rows", "300"], ["train.csv", "never overwrites"]


@case("synth-rows-zero")
def _(ctx):
    return ["synth", str(ctx.tmp / "s"), "--rows", "0"], ["rows", "0"]


@case("synth-bias-share")
def _(ctx):
    return ["synth", str(ctx.tmp / "s"), "--bias-share", "2"], ["bias_share", "2"]


@case("compare-seeds-zero")
def _(ctx):
    return ["compare", ctx.write(ctx.cfg()), "--seeds", "0"], ["--seeds", "0"]


@case("compare-unknown-model")
def _(ctx):
    return ["compare", ctx.write(ctx.cfg()), "--models", "esmm,esmn", "--seeds", "1"], ["esmn", "esmm"]


@case("compare-out-not-empty")
def _(ctx):
    (ctx.tmp / "cmp").mkdir()
    (ctx.tmp / "cmp" / "old.md").write_text("old table")
    return (
        ["compare", ctx.write(ctx.cfg()), "--seeds", "1", "--models", "esmm", "--out", str(ctx.tmp / "cmp")],
        ["--out", "cmp", "not empty"],
    )


# ---- the test ----------------------------------------------------------------------------------------------
def _snapshot(*roots: Path) -> dict[str, str]:
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return files


# ---- tune, report, splits ----------------------------------------------------------------------------
@case("tune-unknown-key")
def _(ctx):
    cfg = ctx.cfg()
    cfg["tune"] = {"optim.lrr": {"log_uniform": [1e-4, 1e-2]}}
    return ["tune", ctx.write(cfg), "--trials", "1"], ["tune.optim.lrr"]


@case("tune-bad-range")
def _(ctx):
    cfg = ctx.cfg()
    cfg["tune"] = {"optim.lr": {"log_uniform": [1e-2, 1e-4]}}
    return ["tune", ctx.write(cfg), "--trials", "1"], ["tune.optim.lr"]


@case("report-not-a-run")
def _(ctx):
    return ["report", str(ctx.tmp), "--out", str(ctx.tmp / "r.html")], ["neither a finished run"]


@case("fit-test-split-beside-a-test-file")
def _(ctx):
    cfg = ctx.cfg()
    cfg["data"]["test_split"] = 0.2
    return ["fit", ctx.write(cfg)], ["data.test_split", "data.test"]


@case("fit-numeric-bins-below-two")
def _(ctx):
    cfg = ctx.cfg()
    cfg["features"] = [
        *cfg["features"],
        {"name": "price_bins", "column": "price", "kind": "numeric", "embedding": "bins", "bins": 1},
    ]
    return ["fit", ctx.write(cfg)], ["bins must be >= 2", "got 1"]


@case("fit-split-by-missing-column")
def _(ctx):
    cfg = ctx.cfg()
    cfg["data"] = {"train": str(ctx.data / "train.csv"), "split_by": "usr"}
    return ["fit", ctx.write(cfg)], ["data.split_by", "'usr'"]


@pytest.fixture(scope="module")
def shared(make_config, synth_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    cfg = make_config(base / "run")
    cfg["data"]["cache"] = False
    (base / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(["fit", str(base / "config.yaml")])
    assert code == 0, err
    cfg.pop("run_dir")
    return synth_dir, base / "run", cfg


def test_the_corpus_is_large():
    assert len(CASES) >= 100


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_2_with_a_message_and_changes_nothing(name, shared, tmp_path, monkeypatch):
    data, run, cfg = shared
    ctx = Ctx(tmp=tmp_path, data=data, run=run, base_cfg=cfg)
    ctx.sys_path = []
    argv, words = CASES[name](ctx)
    for folder in ctx.sys_path:
        monkeypatch.syspath_prepend(folder)
    monkeypatch.chdir(tmp_path)  # a default run_dir would land here, and be seen
    before = _snapshot(tmp_path, data, run)
    code, out, err = run_cli(argv)
    assert code == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert err.count("error:") == 1, err
    message = err[err.index("error:") :]
    for word in words:
        assert word in message, (word, message)
    assert _snapshot(tmp_path, data, run) == before, "a file was made, changed or removed"
