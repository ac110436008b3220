"""The tools report a missing input file as one line on stderr with exit code 2 (no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _data_config_naming_missing_metadata(tmp_path: Path) -> str:
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump({"metadata_paths": [str(tmp_path / "gone" / "data.txt")]}))
    return str(path)


CASES = {
    "cache_features: data config": (["tools/cache_features.py", "--data-config", "{tmp}/nope.yaml", "--out",
                                     "{tmp}/cache"], "nope.yaml"),
    "cache_features: metadata": (["tools/cache_features.py", "--data-config", "{data}", "--out", "{tmp}/cache"],
                                 "metadata file not found: {tmp}/gone/data.txt"),
    "convert_metadata": (["tools/convert_metadata.py", "{tmp}/nope.txt", "--to", "parquet", "--out",
                          "{tmp}/m.parquet"], "nope.txt"),
    "tune_parallel": (["tools/tune_parallel.py", "--model-config", "{tmp}/nope.yaml", "--shape", "9x32x32",
                       "--global-batch-size", "8"], "--model-config: file not found: {tmp}/nope.yaml"),
    "submit": (["tools/submit.py", "{tmp}/nope.yaml", "--target", "slurm"], "not found: {tmp}/nope.yaml"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_missing_file_is_one_line_and_exit_2(case: str, tmp_path: Path) -> None:
    words, expected = CASES[case]
    values = {"tmp": str(tmp_path), "data": _data_config_naming_missing_metadata(tmp_path)}
    argv = [w.format(**values) for w in words]
    proc = subprocess.run([sys.executable, "-W", "ignore", *argv], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and expected.format(**values) in proc.stderr, proc.stderr
