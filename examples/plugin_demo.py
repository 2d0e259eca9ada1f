"""Run an example plug-in module (a tower or a model) as a script: `funnel fit` on the embedded
synthetic funnel (configs/esmm.yaml) with the module listed under `plugins:`."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType


def fit_with_plugin(module: ModuleType, name: str, overrides: list[str]) -> int:
    """``funnel fit configs/esmm.yaml plugins=[name] *overrides`` with ``module`` as ``name``."""
    from funnel.cli import main as cli

    # the script is also the plugin module: make `import name` find it instead of running
    # (and registering) it a second time
    sys.modules.setdefault(name, module)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    config = Path(__file__).resolve().parents[1] / "configs/esmm.yaml"
    return cli(["fit", str(config), f"plugins=[{name}]", "trainer.max_epochs=2", *overrides])
