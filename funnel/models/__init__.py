"""Networks, towers and the funnel-model registry."""

from funnel.models import zoo  # noqa: F401  (registers the built-in models)
from funnel.models.registry import MODELS, FunnelModel, create_model, register_model
from funnel.models.towers import TOWERS, register_tower

__all__ = ["MODELS", "TOWERS", "FunnelModel", "create_model", "register_model", "register_tower"]
