"""Read a YAML config, apply ``key.sub=value`` overrides, convert and validate it.

Layering: dataclass defaults < the YAML file < command-line overrides. Every problem
(unknown keys, wrong types, graph errors) is collected and raised as one ConfigError.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import yaml

from funnel.errors import ConfigError, did_you_mean
from funnel.spec.convert import build
from funnel.spec.resolve import with_defaults
from funnel.spec.schema import FLAT_MODEL_DEFAULTS, FLAT_MODEL_KEYS, Config
from funnel.spec.validate import config_problems

log = logging.getLogger(__name__)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist. Pass the path of a YAML file, e.g. configs/esmm.yaml."
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, features, funnel, ...).")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in ``raw``; list items are addressed by index or by their `name`."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: write it as key.sub=value, e.g. optim.lr=0.01.")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            idx = _list_index(node, part, where)
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:depth])!r} is not a mapping or list.")
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]


def _list_index(node: list[Any], part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        idx = int(part)
        if -len(node) <= idx < len(node):
            return idx
        raise ConfigError(f"override {where!r}: index {idx} is out of range (the list has {len(node)} items).")
    for i, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    names = [str(x.get("name")) for x in node if isinstance(x, dict)]
    raise ConfigError(
        f"override {where!r}: no item named {part!r}.{did_you_mean(part, names)} Items: {', '.join(names)}."
    )


def import_plugins(modules: list[str] | tuple[str, ...]) -> None:
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise ConfigError(
                f"plugins: cannot import {mod!r} ({exc}). Make it importable (pip install -e your package, "
                "or run from the folder that holds it)."
            ) from None
        except SyntaxError as exc:
            raise ConfigError(
                f"plugins: {mod!r} has a syntax error at {exc.filename}, line {exc.lineno}: {exc.msg}. Fix the module."
            ) from None
        except Exception as exc:  # noqa: BLE001  (the plugin's own code failed: the user's, not funnel's)
            raise ConfigError(
                f"plugins: importing {mod!r} failed with {type(exc).__name__}: {exc}. "
                "Fix the module (run `python -c 'import " + mod + "'` to see where)."
            ) from None


def config_from_dict(raw: dict[str, Any]) -> Config:
    plugins = raw.get("plugins") or []
    if isinstance(plugins, list):
        import_plugins([str(p) for p in plugins])
    _move_flat_model_keys(raw)
    _default_synthetic_stages(raw)
    errors: list[str] = []
    cfg = build(Config, raw, "", errors)
    if cfg is not None:
        errors += config_problems(cfg)
    if errors:
        raise ConfigError(errors)
    return with_defaults(cfg)


def _move_flat_model_keys(raw: dict[str, Any]) -> None:
    """Model-specific keys written flat under `funnel:` (the format before models took
    arguments) become the model's arguments, with a message saying how to write them now."""
    funnel = raw.get("funnel")
    if not isinstance(funnel, dict):
        return
    flat = {k: funnel.pop(k) for k in FLAT_MODEL_KEYS if k in funnel}
    # the old defaults said nothing (a run directory's config.yaml wrote every one of them out)
    flat = {k: v for k, v in flat.items() if v != FLAT_MODEL_DEFAULTS[k]}
    if not flat:
        return
    model = funnel.get("model", "esmm")
    model = {"type": model} if isinstance(model, str) else dict(model) if isinstance(model, dict) else model
    if not isinstance(model, dict):
        return  # a malformed model: its own check reports it
    for key, value in flat.items():
        model.setdefault(key, value)
    funnel["model"] = model
    args = ", ".join(f"{k}: {v}" for k, v in flat.items())
    log.warning(
        "funnel.%s: deprecated flat key(s); they are arguments of the model now. Write "
        "`funnel.model: {type: %s, %s}` (the flat form is accepted until the next release).",
        ", funnel.".join(flat),
        model.get("type", "esmm"),
        args,
    )


def _default_synthetic_stages(raw: dict[str, Any]) -> None:
    """Generated data gets one label column per funnel stage unless told otherwise."""
    data, funnel = raw.get("data"), raw.get("funnel")
    if not (isinstance(data, dict) and "synthetic" in data and isinstance(funnel, dict)):
        return
    synth = data["synthetic"]  # null means no synthetic data; {} means all defaults
    stages = funnel.get("stages")
    if isinstance(synth, dict) and "stages" not in synth and isinstance(stages, list):
        labels = [s.get("label") or s.get("name") for s in _parent_first(stages) if isinstance(s, dict)]
        if all(isinstance(x, str) for x in labels):
            data["synthetic"] = {**synth, "stages": labels}
    synth = data["synthetic"]
    if (
        isinstance(synth, dict)
        and "branch" not in synth
        and isinstance(stages, list)
        and any(isinstance(s, dict) and s.get("via") for s in stages)
    ):  # ESM² funnels get ESM² data
        data["synthetic"] = {**synth, "branch": True}


def _parent_first(stages: list[Any]) -> list[Any]:
    """Raw stage mappings in the graph's own topological order (as listed when the stages do
    not form a valid graph yet: validation reports that)."""
    from funnel.graph import FunnelGraph

    try:
        graph = FunnelGraph.build(
            [(s["name"], s.get("label") or s["name"], s.get("after"), s.get("via")) for s in stages],
            groups={s["name"]: s["group"] for s in stages if s.get("group")},
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return stages
    by_name = {s["name"]: s for s in stages}
    return [by_name[name] for name in graph.names]


# paths a config file holds: relative ones are relative to the file's folder
PATH_KEYS = (
    ("data", "train"),
    ("data", "valid"),
    ("data", "test"),
    ("data", "cache_dir"),
    ("run_dir",),
    ("init_from",),
)


def relative_to_file(raw: dict[str, Any], folder: Path) -> None:
    """Make the relative paths of a config file's mapping relative to ``folder`` (the file's);
    absolute paths and those starting with ``${data_dir}``, ``$VAR`` or ``~`` stay as written."""
    for key in PATH_KEYS:
        node: Any = raw
        for part in key[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        value = node.get(key[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not value.startswith(("$", "~")) and not Path(value).is_absolute():
            node[key[-1]] = str(folder / value)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, dict[str, Any]]:
    """Return the validated config and the resolved raw mapping (saved with every run). Relative
    paths in the file are relative to its folder; those of ``overrides`` to the working directory."""
    raw = read_yaml(path)
    relative_to_file(raw, Path(path).resolve().parent)
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw), raw
