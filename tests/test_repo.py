"""Repository contracts: CI runs exactly the README's test command; scripts carry no machine paths."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("Run the tests:", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()


def test_ci_runs_the_readme_test_command():
    command = _readme_test_command()
    assert command.startswith("python -m pytest")
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines


def test_requirements_pin_the_tested_engine():
    requirements = (REPO / "requirements.txt").read_text().splitlines()
    assert "megatron-core==0.16.1" in requirements
    assert "torch==2.13.0+cpu" in requirements
