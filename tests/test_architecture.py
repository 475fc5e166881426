"""The layout enforces itself: data flows one way between packages (import-linter contracts in
pyproject.toml), no import cycles, and no imports hidden inside functions except optional dependencies."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kvpack"
# Optional dependencies, imported where they are used so kvpack works without them.
OPTIONAL = {"matplotlib", "triton", "lmcache", "datasets", "hqq", "optimum", "vllm", "PIL", "numba"}
# kvpack modules that import an optional dependency at module level, so they are imported on demand.
OPTIONAL_MODULES = {"kvpack.integrations.lmcache.serde", "kvpack.integrations.lmcache",
                    "kvpack.integrations.vllm.cuda_read"}  # the vLLM backend's CUDA path (Triton kernels)


def function_level_imports() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                optional = any(n.split(".")[0] in OPTIONAL or n in OPTIONAL_MODULES for n in names)
                if not optional and not _guarded(tree, node):
                    found.append(f"{path.relative_to(SRC.parent)}:{node.lineno} {', '.join(names)}")
    return found


def _guarded(tree: ast.Module, node: ast.AST) -> bool:
    """Imports in a module-level `try:` (an optional dependency probed once) are allowed."""
    return any(isinstance(t, ast.Try) and any(node is n for n in ast.walk(t)) for t in tree.body)


def test_no_imports_inside_functions():
    assert function_level_imports() == []


def test_import_contracts():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(lint).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    result = subprocess.run([lint, "--config", str(SRC.parents[1] / "pyproject.toml")], capture_output=True, text=True,
                            cwd=SRC.parents[1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
