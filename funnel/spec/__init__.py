"""YAML config → frozen dataclasses, validated before any tensor exists."""

from funnel.spec.loader import config_from_dict, load_config
from funnel.spec.schema import Config, DataSpec, FeatureSpec, FunnelSpec, OptimSpec, StageSpec, TowerSpec, TrainerSpec

__all__ = [
    "Config",
    "DataSpec",
    "FeatureSpec",
    "FunnelSpec",
    "OptimSpec",
    "StageSpec",
    "TowerSpec",
    "TrainerSpec",
    "config_from_dict",
    "load_config",
]
