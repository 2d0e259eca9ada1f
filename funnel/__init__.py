"""funnel: sequential-funnel multi-task models (ESMM, BASE, ...) from one YAML spec.

``funnel.fit(config, overrides)`` trains and returns a ``Run``; ``funnel.load_run(path)`` loads
one (see funnel/api.py). They are imported on first use, so ``import funnel`` stays light.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Run", "fit", "load_run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from funnel import api

        return getattr(api, name)
    raise AttributeError(f"module 'funnel' has no attribute {name!r}")
