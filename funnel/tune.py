"""`funnel tune`: search a config's ``tune:`` space with Optuna; every trial is an ordinary run.

    funnel tune configs/esmm_tune.yaml --trials 20 --timeout 3600

Before the first trial the space is checked against the config: every key, every range end and
every choice, set alone, must give a config that `funnel fit` would accept. Each trial is the
base config with its sampled values set as ``key=value`` overrides (same seed, same data), trained
by `funnel fit`'s own code into ``<study>/trial-NNN``; so `funnel evaluate`, `predict` and
`export` work on any trial. The objective is the trial's best validation value of
``trainer.monitor`` (``trainer.mode`` says which way is better). After every validation the value
is reported to Optuna; a trial its pruner rejects stops cleanly and keeps its run directory (run.json
says ``tune.state: pruned``). The study folder gets ``trials.csv``, ``study.json`` and ``best.yaml``:
the best trial's resolved config, which `funnel fit best.yaml` trains again.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml

from funnel.atomic import write_text
from funnel.errors import ConfigError, UserError
from funnel.runs import build_graph, config_to_raw, write_manifest
from funnel.spec import Config, config_from_dict, load_config
from funnel.spec.tune_spec import ParamSpec, TuneSpec, apply_values, space_problems
from funnel.spec.validate import default_monitor

log = logging.getLogger(__name__)

INSTALL = "funnel tune needs Optuna, an optional extra: pip install 'funnel[tune]'"
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")


@dataclass
class TrialRecord:
    """One trial as the summary shows it."""

    number: int
    values: dict[str, str]  # config key -> the sampled value as YAML text (an override's right side)
    state: str = "running"  # complete | pruned | failed | interrupted
    value: float | None = None  # the best validation value of the monitor
    epochs: int = 0  # validations run (fewer than max_epochs: pruned or stopped early)
    seconds: float = 0.0
    run_dir: str | None = None
    error: str | None = None


@dataclass
class StudyResult:
    out: Path
    table: str
    best: TrialRecord | None
    interrupted: bool


class OptunaPruning(pl.Callback):
    """Reports the monitored validation metric to an Optuna trial after every validation and
    stops the run (cleanly, as early stopping does) when the trial's pruner says so."""

    def __init__(self, trial: Any):
        self.trial = trial
        self.values: list[float] = []
        self.pruned = False
        self.monitor: str | None = None
        self.mode: str | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        checkpoint = trainer.checkpoint_callback  # funnel's: it holds the monitor the run really uses
        self.monitor, self.mode = checkpoint.monitor, checkpoint.mode
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return
        self.trial.report(float(value), len(self.values))  # step: the validation's number
        self.values.append(float(value))
        if self.trial.should_prune():
            self.pruned = True
            trainer.should_stop = True

    @property
    def best(self) -> float | None:
        if not self.values:
            return None
        return max(self.values) if self.mode == "max" else min(self.values)


def tune(
    config: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    trials: int = 20,
    timeout: float | None = None,
    sampler: str = "tpe",
    pruner: str = "median",
    seed: int | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    report: bool = False,
) -> StudyResult:
    """Run the study; ``progress`` gets one line per trial (default: the log). ``report``: also
    write ``report.html`` into the study folder (`funnel report` of it: the trials and the best
    trials' runs side by side)."""
    optuna = _import_optuna()
    if report:  # said before hours of trials, not after
        from funnel.report import require_matplotlib

        require_matplotlib()
    progress = progress or log.info
    if trials < 1:
        raise UserError(f"--trials must be >= 1, got {trials}.")
    if timeout is not None and not timeout > 0:
        raise UserError(f"--timeout must be a positive number of seconds, got {timeout}.")
    for flag, value, allowed in (("--sampler", sampler, SAMPLERS), ("--pruner", pruner, PRUNERS)):
        if value not in allowed:
            raise UserError(f"{flag}: {value!r} is not one of {', '.join(allowed)}.")
    cfg, raw = load_config(config, overrides)
    if cfg.tune is None:
        raise ConfigError(
            f"{config}: no `tune:` block, so there is nothing to search. Add one, e.g. "
            "`tune: {optim.lr: {log_uniform: [1.0e-4, 1.0e-2]}}`, or pass it as an override: "
            "'tune.optim.lr={log_uniform: [1.0e-4, 1.0e-2]}'."
        )
    base = {k: v for k, v in raw.items() if k not in ("tune", "run_dir")}
    _check(cfg, base, cfg.tune)
    out = Path(out_dir) if out_dir else Path("runs") / Path(config).stem / f"tune-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out: {str(out)!r} already exists and is not an empty folder; choose a new one.")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = cfg.seed if seed is None else seed
    study = optuna.create_study(
        direction="maximize" if cfg.trainer.mode == "max" else "minimize",
        sampler=optuna.samplers.TPESampler(seed=seed) if sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed),
        pruner=optuna.pruners.MedianPruner() if pruner == "median" else optuna.pruners.NopPruner(),
        study_name=out.name,
    )
    monitor = cfg.trainer.monitor or default_monitor(build_graph(cfg))
    # every trial monitors the study's objective, named: fit's own switch to val/auc_mean for a
    # default monitor over few labels would give the trials another objective than the study's
    base["trainer"] = {**(base.get("trainer") or {}), "monitor": monitor}
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    records: list[TrialRecord] = []
    configs: dict[int, Config] = {}
    interrupted, start = False, time.monotonic()
    try:
        for number in range(trials):
            if number and timeout is not None and time.monotonic() - start >= timeout:  # the first always runs
                progress(f"tune: --timeout {timeout:g} s reached after {number} trial(s); no new trial started")
                break
            trial = study.ask()
            record = TrialRecord(number, {p.key: _suggest(trial, p) for p in cfg.tune.params})
            records.append(record)
            began = time.monotonic()
            try:
                configs[number] = _run_trial(trial, record, base, out, config, monitor, cfg.trainer.mode)
            except KeyboardInterrupt:
                record.state, record.error = "interrupted", "interrupted (Ctrl-C)"
                raise
            finally:
                record.seconds = time.monotonic() - began
                _tell(study, trial, record, optuna)
                progress(_progress_line(record, records, trials, monitor, cfg.trainer.mode))
    except KeyboardInterrupt:  # Ctrl-C: the study ends with the trials that finished
        interrupted = True
        done = sum(r.state == "complete" for r in records)
        progress(f"tune: interrupted; the study keeps the {done} complete trial(s)")
    except BaseException:
        if made and not any(r.run_dir for r in records):  # nothing trained: leave no empty study behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    best = _best(records, cfg.trainer.mode)
    table = _table(records, cfg.tune, monitor, best, str(config))
    _write_outputs(out, records, configs, best, config, overrides, monitor, cfg, sampler, pruner, seed, trials, timeout)
    write_text(out / "summary.md", table + "\n")
    if report and best is not None:
        from funnel.report import report as write_report

        write_report([out], out / "report.html", trust_plugins=bool(cfg.plugins))
    return StudyResult(out, table, best, interrupted)


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UserError(INSTALL) from None
    return optuna


def _check(cfg: Config, base: dict[str, Any], spec: TuneSpec) -> None:
    """What fit would reject for any range end or choice, all problems at once, before any trial."""
    from funnel.training import distributed
    from funnel.training.preflight import preflight

    problems = space_problems(base, spec)
    if not problems:  # the model must also build with every end (meta device: no data, no weights)
        for param in spec.params:
            for text in param.ends:
                try:
                    preflight(config_from_dict(apply_values(base, {param.key: text})))
                except ConfigError as exc:
                    problems += [f"tune.{param.key}: with {param.key}={text}: {p}" for p in exc.problems]
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    preflight(cfg)
    if distributed.detect(cfg).distributed:
        raise UserError(
            "funnel tune trains each trial in this one process: set trainer.devices to 1 "
            "(and no DDP strategy), or tune on one device and train the best config with DDP."
        )


def _suggest(trial: Any, param: ParamSpec) -> str:
    from funnel.spec.tune_spec import yaml_text

    if param.kind == "choice":  # Optuna's categorical values must be scalars: the YAML texts are
        return trial.suggest_categorical(param.key, list(param.choices))
    if param.kind in ("int", "log_int"):
        return yaml_text(trial.suggest_int(param.key, int(param.low), int(param.high), log=param.kind == "log_int"))
    return yaml_text(trial.suggest_float(param.key, param.low, param.high, log=param.kind == "log_uniform"))


def _run_trial(
    trial: Any, record: TrialRecord, base: dict[str, Any], out: Path, config: str | Path, monitor: str, mode: str
) -> Config | None:
    """Train one trial into its run directory and fill in ``record``; the trial's Config."""
    from funnel.training.fit import extra_callbacks, fit_config
    from funnel.training.guards import TrainingDiverged
    from funnel.training.preflight import preflight

    run_dir = out / f"trial-{record.number:03d}"
    try:
        cfg = dataclasses.replace(config_from_dict(apply_values(base, record.values)), run_dir=str(run_dir))
        preflight(cfg)
    except ConfigError as exc:  # values that pass alone but not together: this trial fails, the study goes on
        record.state, record.error = "failed", f"config rejected: {exc}"
        return None
    pruning = OptunaPruning(trial)
    try:
        with extra_callbacks(pruning):
            fit_config(cfg, config)
    except TrainingDiverged as exc:  # these values diverge: a result of the search, not an input error
        record.state, record.error = "failed", str(exc)
        return None
    finally:
        if run_dir.is_dir():
            record.run_dir = str(run_dir)
        record.epochs = len(pruning.values)
    if pruning.monitor != monitor or pruning.best is None:
        record.state = "failed"
        record.error = (
            f"no finite validation value of {monitor}"
            if pruning.monitor == monitor
            else f"the run monitored {pruning.monitor} instead of {monitor} (undefined on its valid split)"
        )
    else:
        record.state, record.value = ("pruned" if pruning.pruned else "complete"), pruning.best
    write_manifest(run_dir, tune={"study": str(out), "trial": record.number, "state": record.state})
    return cfg


def _tell(study: Any, trial: Any, record: TrialRecord, optuna: Any) -> None:
    states = optuna.trial.TrialState
    if record.state == "complete":
        study.tell(trial, record.value)
    elif record.state == "pruned":
        study.tell(trial, state=states.PRUNED)
    else:
        study.tell(trial, state=states.FAIL)


def _best(records: list[TrialRecord], mode: str) -> TrialRecord | None:
    done = [r for r in records if r.state == "complete"]
    if not done:
        return None
    pick = max if mode == "max" else min
    return pick(done, key=lambda r: r.value)


def _progress_line(record: TrialRecord, records: list[TrialRecord], trials: int, monitor: str, mode: str) -> str:
    best = _best(records, mode)
    head = f"trial {record.number + 1}/{trials} {record.state}"
    if record.value is not None:
        head += f": {monitor} = {record.value:.4f}"
    if best is not None:
        head += f" (best {best.value:.4f}, trial {best.number})"
    values = " ".join(f"{k}={v}" for k, v in record.values.items())
    tail = f"; {record.error}" if record.error else ""
    return f"{head} in {record.seconds:.1f} s; {values}{tail}"


def _shown(text: str) -> str:
    value = yaml.safe_load(text)
    shown = f"{value:.4g}" if isinstance(value, float) else text
    return shown.replace("|", "\\|")


def _table(records: list[TrialRecord], spec: TuneSpec, monitor: str, best: TrialRecord | None, config: str) -> str:
    keys = spec.keys
    lines = [
        f"{config}: {len(records)} trial(s), {monitor} (best validation value per trial)",
        "",
        "| trial | " + " | ".join(keys) + " | value | state | epochs | seconds |",
        "|---" * (len(keys) + 5) + "|",
    ]
    for r in records:
        value = "n/a" if r.value is None else f"{r.value:.4f}"
        mark = " (best)" if best is r else ""
        cells = [f"{r.number}{mark}", *(_shown(r.values[k]) for k in keys), value, r.state, str(r.epochs)]
        lines.append("| " + " | ".join([*cells, f"{r.seconds:.1f}"]) + " |")
    if best is not None:
        lines += ["", f"best: trial {best.number}, {monitor} = {best.value:.4f}, run {best.run_dir}"]
    else:
        lines += ["", "no trial completed: no best.yaml written"]
    return "\n".join(lines)


def _write_outputs(
    out: Path,
    records: list[TrialRecord],
    configs: dict[int, Config],
    best: TrialRecord | None,
    config: str | Path,
    overrides: list[str] | tuple[str, ...],
    monitor: str,
    cfg: Config,
    sampler: str,
    pruner: str,
    seed: int,
    trials: int,
    timeout: float | None,
) -> None:
    keys = cfg.tune.keys
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["trial", *keys, "value", "state", "epochs", "seconds", "run_dir", "error"])
    for r in records:
        row = [r.number, *(r.values[k] for k in keys), r.value, r.state, r.epochs, f"{r.seconds:.2f}"]
        writer.writerow([*row, r.run_dir or "", r.error or ""])
    write_text(out / "trials.csv", buf.getvalue())
    best_yaml = None
    if best is not None:
        best_yaml = out / "best.yaml"
        searched = " ".join(f"{k}={v}" for k, v in best.values.items())
        header = (
            f"# The best of {len(records)} trial(s) of `funnel tune {config}`: trial {best.number}, "
            f"{monitor} = {best.value:.6g}.\n# Searched: {searched}\n# Launch:   funnel fit {best_yaml}\n"
        )
        resolved = config_to_raw(dataclasses.replace(configs[best.number], run_dir=None))
        write_text(best_yaml, header + yaml.safe_dump(resolved, sort_keys=False))
    study = {
        "config": str(config),
        "overrides": list(overrides),
        "monitor": monitor,
        "mode": cfg.trainer.mode,
        "sampler": sampler,
        "pruner": pruner,
        "seed": seed,
        "trials_asked": trials,
        "timeout_s": timeout,
        "space": [dataclasses.asdict(p) for p in cfg.tune.params],
        "trials": [dataclasses.asdict(r) for r in records],
        "best": None if best is None else {**dataclasses.asdict(best), "config": str(best_yaml)},
    }
    write_text(out / "study.json", json.dumps(study, indent=1))
