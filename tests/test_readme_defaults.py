"""The README's config walkthrough ("A config, key by key") shows the real defaults: every value
it gives is the schema's default, except the keys listed here as examples."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import yaml

from funnel.runs import config_to_raw
from funnel.spec import config_from_dict

README = Path(__file__).resolve().parents[1] / "README.md"

# values the walkthrough gives as examples of what to write, not as defaults
EXAMPLES = {
    ("data", "train"),  # a path to give
    ("features",),  # one feature of each kind
    ("funnel", "stages"),  # a two-stage funnel
    ("trainer", "monitor"),  # the default is val/auc/<last stage>: conversion in the example's stages
}

MINIMAL = {
    "data": {"train": "train.csv"},
    "features": [{"name": "user_id", "kind": "categorical"}],
    "funnel": {"stages": [{"name": "click"}, {"name": "conversion", "after": "click"}]},
}


def walkthrough() -> dict[str, Any]:
    text = README.read_text()
    section = text[text.index("## A config, key by key") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    return yaml.safe_load(block)


def leaves(node: Any, path: tuple[str, ...] = ()):
    if isinstance(node, dict) and not (path and path[-1] in ("tower",) and "type" in node):
        for key, value in node.items():
            yield from leaves(value, (*path, key))
    else:
        yield path, node


def lookup(raw: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(raw, dict) or part not in raw:
            raise KeyError(path)
        raw = raw[part]
    return raw


def test_every_value_of_the_walkthrough_is_the_default_or_a_listed_example():
    import pytorch_lightning as pl

    resolved = config_to_raw(config_from_dict(MINIMAL))
    trainer_defaults = {
        n: p.default for n, p in inspect.signature(pl.Trainer.__init__).parameters.items() if p.default is not p.empty
    }
    shown = walkthrough()
    checked = 0
    for path, value in leaves(shown):
        if any(path[: len(e)] == e for e in EXAMPLES):
            continue
        if path[0] == "trainer" and path[1] not in resolved["trainer"]:
            if path[1] == "logger":  # funnel's own names for Lightning's loggers: csv is the default
                assert value == "csv"
            else:
                assert trainer_defaults[path[1]] == value, path
            checked += 1
            continue
        default = lookup(resolved, path)
        if path == ("funnel", "model"):  # the model's name (its arguments are filled in when resolved)
            default = default["type"] if isinstance(default, dict) else default
        if path == ("funnel", "tower"):
            assert value == default, path
        else:
            assert value == default, (path, value, default)
        checked += 1
    assert checked >= 40  # the walkthrough is most of the config
