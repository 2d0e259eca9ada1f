"""The README's commands stay the ones CI and users actually run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ci_command() -> str:
    lines = [ln for ln in (ROOT / ".ci/run").read_text().splitlines() if ln.startswith("python3 -m venv")]
    assert len(lines) == 1, "the CI script must hold exactly one setup-and-test command"
    return lines[0]


def test_readme_test_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert _ci_command() in readme


def test_setup_commands_install_cpu_torch_before_the_package():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv .*$", readme, flags=re.MULTILINE)
    assert len(commands) == 2
    for cmd in commands:
        assert cmd.index("torch==2.13.0") < cmd.index("pip install -q -e" if "-q -e" in cmd else "pip install -e")
    assert commands[0].endswith("funnel fit configs/esmm.yaml")


def test_every_shipped_config_is_listed_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for cfg in sorted((ROOT / "configs").glob("*.yaml")):
        assert f"configs/{cfg.name}" in readme


def test_the_readme_config_walkthrough_is_a_valid_config():
    import yaml

    from funnel.data.kinds import FEATURE_KINDS
    from funnel.spec import config_from_dict

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(seed: 0.*?)```", readme, flags=re.DOTALL)
    assert block, "the README's YAML walkthrough block is missing"
    cfg = config_from_dict(yaml.safe_load(block.group(1)))
    assert [s.name for s in cfg.funnel.stages] == ["click", "conversion"]
    assert {f.kind for f in cfg.features} == set(FEATURE_KINDS)  # every kind is shown
