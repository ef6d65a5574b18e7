"""The repository's promises: README commands, CI entry (the configs: tests/test_configs.py)."""
from __future__ import annotations

import re

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", README)


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    commands = readme_commands()
    assert len(commands) >= 2
    demo, tests = commands[:2]
    assert "accelerate launch" in demo and "configs/demo/segformer_synthetic.yaml" in demo
    assert "pytest" in tests
    ci = [line for line in (REPO / ".ci/run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci[0] == tests  # then only extra test runs (the slow tests)
    assert all("pytest" in line for line in ci[1:])
    for path in re.findall(r"(?:scripts|configs)/[\w/.-]+", f"{demo} {tests}") + ["accelerate_config.yaml"]:
        assert (REPO / path).exists(), path


def test_setup_installs_torch_first_and_keeps_an_existing_one():
    setup = "\n".join(line for line in (REPO / "scripts/setup.sh").read_text().splitlines()
                      if not line.lstrip().startswith("#"))
    # torch and torchvision as a matching pair (smp and timm need torchvision); an existing torch
    # is kept and only given its torchvision
    assert 'TORCH_PAIR="${SEG_ACCEL_TORCH:-torch==2.14.1 torchvision==0.29.1}"' in setup
    assert setup.index('-c "import torch"') < setup.index("pip install -q $TORCH_PAIR") < setup.index("pip install -q -e")
    assert setup.index("import torchvision") < setup.index('pip install -q torchvision "torch==$have"')
    assert "--system-site-packages" in setup
