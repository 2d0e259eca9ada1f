"""The `funnel` command line: fit, evaluate, predict, check, synth."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

from funnel.errors import UserError

log = logging.getLogger("funnel")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


QUIET_HELP = "only warnings and errors: no progress bar, no Lightning banners (also after the command)"
VERBOSE_HELP = "funnel's debug messages too (also after the command)"
CONFIG_HELP = "the YAML config file"
OVERRIDES_HELP = "override config values, e.g. optim.lr=0.01 trainer.max_epochs=5"
RUN_DIR_HELP = "a run directory, as `funnel fit` printed it"


class _Formatter(argparse.HelpFormatter):
    """Help that ends with each option's default, unless it is empty or the help text says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, "", [], argparse.SUPPRESS):
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def _parser() -> argparse.ArgumentParser:
    from funnel import __version__

    p = argparse.ArgumentParser(
        prog="funnel",
        description="Train and score sequential-funnel multi-task models (ESMM family).",
        epilog="Results go to stdout; logs and progress bars to stderr. Run `funnel COMMAND --help` for a command.",
        formatter_class=_Formatter,
    )
    p.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    p.add_argument("--version", action="version", version=f"funnel {__version__}", help="print the version and exit")
    # the same flags after the command: SUPPRESS keeps a flag given before it when absent after it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, within: argparse._SubParsersAction = sub) -> argparse.ArgumentParser:
        return within.add_parser(
            name, help=help_text, description=help_text, parents=[common], formatter_class=_Formatter
        )

    f = command("fit", "train a model from a YAML config; prints the metrics and the run directory last")
    f.add_argument("config", nargs="?", help="the YAML config (not with --resume)")
    f.add_argument("overrides", nargs="*", metavar="key.sub=value", help=OVERRIDES_HELP)
    f.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    f.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run from its checkpoints/last.ckpt, in its own directory",
    )
    f.add_argument(
        "--init-from",
        metavar="RUN_DIR",
        help="warm start from another run's best checkpoint and encoders (same as init_from=RUN_DIR)",
    )
    _trust_flag(f)

    e = command("evaluate", "metrics of a run's best checkpoint on a data file, as JSON")
    e.add_argument("run_dir", help=RUN_DIR_HELP)
    e.add_argument("--data", required=True, help="the data file (.csv, .parquet or a folder of Parquet shards)")
    e.add_argument("--out", help="also write the metrics to this .json file")
    _trust_flag(e)

    pr = command("predict", "write p_<stage> and p_<stage>_cond for every input row")
    pr.add_argument("run_dir", help=RUN_DIR_HELP)
    pr.add_argument("--data", required=True, help="the rows to score (.csv, .parquet or a folder of Parquet shards)")
    pr.add_argument("--out", required=True, help="the predictions file: .csv or .parquet")
    pr.add_argument("--keep", default="", help="comma-separated input columns to copy into the output")
    pr.add_argument(
        "--chunk-rows",
        type=int,
        default=262_144,
        help="rows read, scored and written at a time (memory stays flat for any file size)",
    )
    pr.add_argument(
        "--batch-size",
        type=int,
        default=4096,
        help="rows per forward pass (the fastest measured on CPU; larger on a GPU)",
    )
    pr.add_argument(
        "--bf16",
        action="store_true",
        help="run the towers in bfloat16 (faster on CPUs with AVX512-BF16 or AMX; ~3 significant digits)",
    )
    _trust_flag(pr)

    ex = command("export", "write a run as an ONNX or TorchScript graph with its encoders and a manifest")
    ex.add_argument("run_dir", help=RUN_DIR_HELP)
    ex.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="onnx needs funnel[export]")
    ex.add_argument(
        "--out", required=True, help="a new or empty folder: model.onnx|model.pt, encoders.json, manifest.json"
    )
    ex.add_argument(
        "--split",
        metavar="user=FEATURE,...",
        help="cut the model into a user graph (the features named, run once per request) and an item graph "
        "(every other feature, run per candidate): user.onnx|pt and item.onnx|pt",
    )
    _trust_flag(ex)

    pp = command("prepare", "fit the encoders and write the encoded data cache (streaming; fit runs it when needed)")
    pp.add_argument("config", help=CONFIG_HELP)
    pp.add_argument("overrides", nargs="*", metavar="key.sub=value", help=OVERRIDES_HELP)

    c = command("check", "validate the config and the data without training")
    c.add_argument("config", help=CONFIG_HELP)
    c.add_argument("overrides", nargs="*", metavar="key.sub=value", help=OVERRIDES_HELP)

    cmp = command("compare", "train several models x seeds on the same splits; print a mean ± std table")
    cmp.add_argument("config", help=CONFIG_HELP)
    cmp.add_argument("overrides", nargs="*", metavar="key.sub=value", help=OVERRIDES_HELP)
    cmp.add_argument("--models", default="esmm,base", help="comma-separated model names, e.g. esmm,esmm_ns,division")
    cmp.add_argument("--seeds", type=int, default=3, help="seeds per model")
    cmp.add_argument("--out", help="folder for the runs, compare.json and compare.md (default: runs/compare/...)")
    cmp.add_argument("--report", action="store_true", help="also write report.html, the models side by side")

    rp = command("report", "write a self-contained HTML report of a run (funnel[report])")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run, several runs, or a `funnel compare` folder")
    rp.add_argument("--out", help="the .html file (default RUN_DIR/report.html)")
    rp.add_argument("--rows", type=int, help="score at most this many rows of the split (default 1,000,000)")
    _trust_flag(rp)

    t = command("tune", "search the config's tune: space with Optuna (funnel[tune]); each trial is a run")
    t.add_argument("config", help=CONFIG_HELP)
    t.add_argument("overrides", nargs="*", metavar="key.sub=value", help=OVERRIDES_HELP)
    t.add_argument("--trials", type=int, default=20, help="the number of trials")
    t.add_argument("--timeout", type=float, metavar="S", help="start no new trial after S seconds")
    t.add_argument("--sampler", choices=["tpe", "random"], default="tpe", help="Optuna's sampler")
    t.add_argument("--pruner", choices=["median", "none"], default="median", help="stop trials worse than the median")
    t.add_argument("--seed", type=int, help="the sampler's seed (default: the config's seed)")
    t.add_argument("--out", help="folder for the trials, trials.csv, study.json and best.yaml")
    t.add_argument(
        "--report", action="store_true", help="also write report.html: the trials and the best trials side by side"
    )

    s = command("synth", "write the synthetic funnel (train/valid/test CSV + truth.json)")
    s.add_argument("out_dir", help="the folder to write train.csv, valid.csv, test.csv and truth.json into")
    s.add_argument("--rows", type=int, default=200_000, help="rows in all (80%% train, 10%% valid, 10%% test)")
    s.add_argument("--seed", type=int, default=0, help="the generator's seed")
    s.add_argument("--stages", nargs="+", default=["click", "conversion"], help="the stages after the impression")
    s.add_argument("--bias-share", type=float, default=None, help="share of items whose later stages run against click")
    _convert_parser(command("convert", "convert raw Ali-CCP or PaddleRec ESMM text to Parquet shards"), command)
    return p


def _trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-plugins",
        action="store_true",
        help="import the plugin modules the run's config.yaml lists (this runs their code)",
    )


def _convert_parser(cv: argparse.ArgumentParser, command) -> None:
    formats = cv.add_subparsers(dest="format", required=True, metavar="FORMAT")
    a = command("ali-ccp", "the raw release: sample_skeleton_*.csv joined with common_features_*.csv", within=formats)
    a.add_argument("raw_dir", help="the folder of the unpacked sample_skeleton_*.csv and common_features_*.csv")
    a.add_argument("out_dir", help="an empty or new folder: OUT_DIR/{train,test}/part-*.parquet and convert.json")
    a.add_argument("--splits", default="train,test", help="comma-separated, of train,test")
    pe = command("paddlerec-esmm", "PaddleRec's ESMM text: sample_id,click,conversion,field:id,...", within=formats)
    pe.add_argument("inputs", nargs="+", metavar="[SPLIT=]INPUT", help="a file or folder; SPLIT: train|valid|test")
    pe.add_argument("out_dir", help="an empty or new folder: OUT_DIR/<split>/part-*.parquet and convert.json")
    for f in (a, pe):
        f.add_argument("--shard-rows", type=int, default=1_000_000, help="rows per Parquet file")
        f.add_argument(
            "--fields",
            default="default",
            help="default (the 23 documented fields), all (every field found: one extra read), or a comma list "
            "(default: default)",
        )
        f.add_argument("--skip-bad", action="store_true", help="skip malformed lines (counted in convert.json)")


def main(argv: list[str] | None = None) -> int:
    # a deprecation inside Lightning's own code, printed on every run; nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting overrides at the first --flag; take the ones after it too
    if extra and getattr(args, "overrides", None) is not None and not any(e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.quiet and args.verbose:
        parser.error("-q/--quiet and -v/--verbose contradict each other: give one of them")
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    funnel_log = logging.getLogger("funnel")
    funnel_level = funnel_log.level
    if args.verbose:
        funnel_log.setLevel(logging.DEBUG)
    try:
        with _quiet(args.quiet):
            return _run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # an unwritable output path, a full disk: the user can fix these
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001  (not the user's input: say so, then show where it happened)
        print(
            "funnel: internal error. This is a bug in funnel, not in your input; please report it with "
            "the command and the traceback below.",
            file=sys.stderr,
        )
        traceback.print_exc()
        return 1
    finally:
        funnel_log.setLevel(funnel_level)


@contextlib.contextmanager
def _quiet(quiet: bool) -> Iterator[None]:
    """Under -q: Lightning's loggers at WARNING (it sets them to INFO itself: its banners and tips)
    and no progress bar unless the config asks for one; as they were afterwards."""
    if not quiet:
        yield
        return
    from funnel.training.progress import quiet_progress
    from funnel.training.trainer_args import lightning_level

    with lightning_level(logging.WARNING), quiet_progress():
        yield


def _run(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        from funnel.prepare_data import prepare

        print(json.dumps(prepare(args.config, args.overrides), indent=1))
        return 0
    if args.command == "fit":
        if args.init_from:
            args.overrides = [*args.overrides, f"init_from={args.init_from}"]
        if args.resume:
            if args.config or args.overrides or args.print_config:
                raise UserError(
                    "fit --resume RUN_DIR takes no config, overrides or --print-config: the run "
                    "continues with the config saved in RUN_DIR/config.yaml."
                )
            from funnel.training.fit import resume

            return _report_run(resume(args.resume, args.trust_plugins))
        if not args.config:
            raise UserError("fit: give a config file (funnel fit configs/esmm.yaml) or --resume RUN_DIR.")
        if args.print_config:
            import yaml

            from funnel.runs import config_to_raw
            from funnel.spec import load_config
            from funnel.training.preflight import preflight

            cfg, _ = load_config(args.config, args.overrides)
            preflight(cfg)  # what fit would refuse before reading the data
            print(yaml.safe_dump(config_to_raw(cfg), sort_keys=False), end="")
            return 0
        from funnel.training.fit import fit

        return _report_run(fit(args.config, args.overrides))
    if args.command == "evaluate":
        from funnel.inference import evaluate_run

        print(json.dumps(evaluate_run(args.run_dir, args.data, args.out, args.trust_plugins), indent=1))
        return 0
    if args.command == "predict":
        from funnel.inference import predict_run

        keep = [c.strip() for c in args.keep.split(",") if c.strip()]
        for flag, value in (("--chunk-rows", args.chunk_rows), ("--batch-size", args.batch_size)):
            if value < 1:
                raise UserError(f"{flag} must be >= 1, got {value}.")
        out = predict_run(
            args.run_dir, args.data, args.out, keep, args.chunk_rows, args.bf16, args.batch_size, args.trust_plugins
        )
        print(f"predictions: {out}")
        return 0
    if args.command == "export":
        from funnel.export import export_run

        print(f"export: {export_run(args.run_dir, args.format, args.out, args.trust_plugins, args.split)}")
        return 0
    if args.command == "check":
        from funnel.check import check

        report = check(args.config, args.overrides)
        print(json.dumps(report, indent=1))
        for warning in report.get("warnings", []):
            log.warning(warning)
        print("config and data OK" if not report.get("warnings") else "config and data OK, with the warnings above")
        return 0
    if args.command == "compare":
        from funnel.compare import compare

        models = [m.strip() for m in args.models.split(",") if m.strip()]
        out, table = compare(args.config, models, args.seeds, args.overrides, args.out, report=args.report)
        print(table)
        print(f"comparison written to: {out}")
        return 0
    if args.command == "tune":
        from funnel.tune import tune

        def progress(line: str) -> None:  # on stderr even with -q: one line per trial
            print(line, file=sys.stderr, flush=True)

        options = {"sampler": args.sampler, "pruner": args.pruner, "seed": args.seed, "out_dir": args.out}
        options["report"] = args.report
        result = tune(args.config, args.overrides, args.trials, args.timeout, progress=progress, **options)
        print(result.table)
        print(f"study written to: {result.out}")
        return EXIT_INTERRUPTED if result.interrupted else 0
    if args.command == "report":
        from funnel.report import report as write_report

        print(f"report: {write_report(args.run_dirs, args.out, args.rows, args.trust_plugins)}")
        return 0
    if args.command == "synth":
        from funnel import synthetic

        kwargs = {"rows": args.rows, "seed": args.seed, "stages": tuple(args.stages)}
        if args.bias_share is not None:
            kwargs["bias_share"] = args.bias_share
        try:
            spec = synthetic.SyntheticSpec(**kwargs)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        paths = synthetic.write(Path(args.out_dir), spec)
        for p in paths.values():
            print(p)
        return 0
    if args.command == "convert":
        from funnel import convert

        options = {"fields": args.fields, "shard_rows": args.shard_rows, "skip_bad": args.skip_bad}
        if args.format == "ali-ccp":
            report = convert.convert_aliccp(args.raw_dir, args.out_dir, splits=args.splits, **options)
        else:
            report = convert.convert_paddlerec(args.inputs, args.out_dir, **options)
        print(json.dumps(convert.summary(report), indent=1))
        print(f"converted data: {args.out_dir}")
        return 0
    raise AssertionError(args.command)


def _report_run(run_dir: Path) -> int:
    from funnel.training.distributed import is_global_zero

    if not is_global_zero():  # another rank of a DDP run: rank 0 reports it
        return 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = {k: v for k, v in metrics.items() if k.startswith(("auc", "oracle_auc", "calib"))}
    note = {"note": metrics["note"]} if "note" in metrics else {}
    print(json.dumps({"split": metrics["split"], **note, **summary}, indent=1))
    print(f"run directory: {run_dir}")
    return 0
