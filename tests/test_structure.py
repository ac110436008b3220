"""Package boundaries: generic parallel code knows no model (a model's own parallel plan lives beside it)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_video"


def _imported_modules(source: str, module: str) -> set[str]:
    """Every module an `import` or `from ... import` names in `source` (module and lazy imports alike),
    relative imports resolved against `module`, the dotted name of the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[:-node.level]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return names


def _model_imports(source: str, module: str) -> set[str]:
    return {name for name in _imported_modules(source, module)
            if name == "megatron_video.models" or name.startswith("megatron_video.models.")}


def test_the_import_scan_sees_every_form():
    """The scan below would catch each way a module can reach the models package."""
    here = "megatron_video.parallel.x"
    for source in ("import megatron_video.models.suv_mmdit.config\n",
                   "from megatron_video.models.suv_mmdit import SUVConfig\n",
                   "from megatron_video import models\n",
                   "from ..models.attention import attention\n",
                   "def f():\n    from megatron_video.models import registry\n"):
        assert _model_imports(source, here), source
    assert not _model_imports("from megatron_video.parallel.ulysses import seq_to_heads\nimport torch\n", here)


def test_parallel_imports_no_model():
    """megatron_video/parallel/ is generic: none of its modules imports megatron_video.models."""
    files = sorted((PACKAGE / "parallel").rglob("*.py"))
    assert len(files) >= 5
    offenders = {}
    for path in files:
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found = _model_imports(path.read_text(), module)
        if found:
            offenders[str(path.relative_to(PACKAGE.parent))] = sorted(found)
    assert not offenders, offenders
