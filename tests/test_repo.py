"""Repository contracts: two self-setting-up commands, CI runs the README's test command in a copy with nothing
beside it, the repository carries every file its tests read, no script hides a failing step's error."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".sh", ".md", ".yaml", ".yml", ".toml", ".txt", ".json"}


def _readme_command(after: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text.split(after, 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()


def _repo_text_files() -> list[Path]:
    skip = {".git", ".venv", "outputs", "runs", "__pycache__", ".ruff_cache"}
    files = []
    for path in REPO.rglob("*"):
        parts = path.relative_to(REPO).parts
        if path.is_file() and not skip & set(parts[:-1]) and parts[:2] != ("tests", "data") and \
                (path.suffix in TEXT_SUFFIXES or path.name in ("Makefile", "run")):
            files.append(path)
    return files


def test_ci_runs_the_readme_commands_in_a_bare_copy():
    test_command, quickstart = _readme_command("Run the tests:"), _readme_command("## Two commands")
    assert (test_command, quickstart) == ("make test", "make quickstart")
    makefile = (REPO / "Makefile").read_text()
    for target in ("test", "quickstart"):  # each sets itself up: depends on the venv stamp
        assert re.search(rf"^{target}: \$\(STAMP\)$", makefile, re.M), target
    assert "python -m pytest" not in makefile and "$(PY) -m pytest -q -p no:cacheprovider tests" in makefile
    ci = (REPO / ".ci" / "run").read_text()
    ci_lines = [line.strip() for line in ci.splitlines()]
    assert test_command in ci_lines and "make lint" in ci_lines
    #
    assert "git ls-files" in ci and 'cd "$CLONE"' in ci and "mktemp -d" in ci


def test_requirements_are_split():
    runtime = (REPO / "requirements.txt").read_text().splitlines()
    assert "megatron-core==0.16.1" in runtime and "tqdm>=4.66" in runtime
    assert not any(line.startswith(("pytest", "ruff", "torch==")) for line in runtime)
    dev = (REPO / "requirements-dev.txt").read_text().splitlines()
    assert {"pytest>=8.0", "pytest-timeout>=2.3", "ruff>=0.5"} <= set(dev)
    assert "torch==2.13.0+cpu" in (REPO / "requirements-cpu.txt").read_text().splitlines()
    gpu = (REPO / "requirements-gpu.txt").read_text()
    assert "transformer-engine[pytorch]>=2.9.0a0,<2.12.0" in gpu and "flash-attn>=2.4,<3" in gpu and "apex" in gpu
    npu = (REPO / "requirements-npu.txt").read_text()
    assert "torch_npu" in npu and re.search(r"MindSpeed\.git@[0-9a-f]{40}$", npu, re.M)
    # the CPU pin is used exactly where CPU runs need it
    assert "TORCH_REQUIREMENTS ?= requirements-cpu.txt" in (REPO / "Makefile").read_text()


def test_no_file_reaches_outside_the_repository():
    """A fresh clone has nothing beside it: no file may read the old shared reference folder."""
    banned = ["../" + "shared", "shared/" + "reference", "/work/" + "shared"]
    offenders = [f"{path.relative_to(REPO)}: {word}" for path in _repo_text_files()
                 for word in banned if word in path.read_text(errors="replace")]
    assert not offenders, offenders


def test_reference_data_is_in_the_repository_and_documented():
    data = REPO / "tests" / "data"
    files = [p for p in data.rglob("*") if p.is_file() and p.name != "README.md"]
    assert len(files) >= 6  # the two schemas and the two golden vectors (weights + description each)
    for path in files:  # described in tests/data/README.md or in the README of its own folder
        readmes = {data / "README.md", path.parent / "README.md"}
        described = " ".join(r.read_text() for r in readmes if r.is_file())
        assert path.name.split(".")[0] in described, f"{path.relative_to(data)} is not described in a README"
    assert sum(p.stat().st_size for p in files) < 8 * 2**20  # git carries it: keep it small


def test_design_citations_resolve():
    """Every `DESIGN §N` (or `DESIGN.md §N`) cited in code, docs or configs is a section of docs/DESIGN.md."""
    sections = set(re.findall(r"^## (\d+)\. ", (REPO / "docs" / "DESIGN.md").read_text(), re.M))
    cited = {}
    for path in _repo_text_files():
        for number in re.findall(r"DESIGN(?:\.md)? §(\d+)", path.read_text(errors="replace")):
            cited.setdefault(number, path.relative_to(REPO))
    assert cited and set(cited) <= sections, {n: str(p) for n, p in cited.items() if n not in sections}


def test_a_skip_is_a_failure(tmp_path: Path):
    """tests/no_skip.py (loaded by conftest) turns a skip into a failure."""
    (tmp_path / "test_skipping.py").write_text("import pytest\n\ndef test_x():\n    pytest.skip('no data')\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.no_skip",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed" in proc.stdout and "skipped tests fail in this repository" in proc.stdout
    assert "no data" in proc.stdout


def test_quickstart_fails_loudly(tmp_path: Path):
    """No filter hides a failing step: a trainer that fails stops the script with its code and its error."""
    script = (REPO / "examples" / "quickstart" / "run.sh").read_text()
    assert "set -euo pipefail" in script
    assert not re.search(r"\|\s*(grep|tail|head)\b|2>\s*/dev/null", script)
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\nif [[ \"$1 $2\" == \"-m torch.distributed.run\" ]]; then\n"
                    "  echo 'Traceback: the-real-error' >&2; exit 7\nfi\n")
    fake.chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "qs"), PYTHON=str(fake))
    proc = subprocess.run(["bash", str(REPO / "examples" / "quickstart" / "run.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7
    assert "the-real-error" in proc.stderr and "step 'train' failed" in proc.stderr


def test_tour_names_files_that_exist():
    """Every file or folder docs/TOUR.md names in backticks (`x.py`, `dir/`, `dir/x.py`) is in the repository, so
    the reading order cannot point at a file that was renamed or removed."""
    paths = {p.relative_to(REPO).as_posix() for p in REPO.rglob("*")
             if not {".git", ".venv", "__pycache__"} & set(p.relative_to(REPO).parts)}
    named = re.findall(r"`([\w./]+(?:\.py|\.md|/))`", (REPO / "docs" / "TOUR.md").read_text())
    assert len(named) > 30
    missing = [name for name in named
               if not any(p == name.rstrip("/") or p.endswith("/" + name.rstrip("/")) for p in paths)]
    assert not missing, missing
