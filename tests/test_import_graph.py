"""The package's import graph has no cycle, counting every import (a function-local one too: an import moved into a
function to dodge a cycle still makes one; a ``kernel_module`` call too). Read from the source with ``ast``; nothing is
imported. And ``import fastlt`` works without Triton (stand-ins of the kernel modules raise at their first use)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Dotted name -> file, as installed: ``fastlt/`` is ``fastlt``, ``kernels/`` is ``fastlt.kernels``."""
    out = {}
    for top, package in (("fastlt", "fastlt"), ("kernels", "fastlt.kernels")):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fastlt modules that module ``name`` imports (anywhere in it)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import x`: the submodule pkg.x when there is one, else pkg itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "kernel_module" and node.args
              and isinstance(node.args[0], ast.Constant)):  # fastlt._kernel_modules: an import
            targets = [node.args[0].value]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import fastlt.kernels.launch as L` and the like
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert len(graph) > 20 and graph["fastlt.functional"], "the graph reader found no imports"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_imports_and_runs_its_reference_path_without_triton():
    """``pyproject.toml`` asks for Triton on Linux only, and the reference path runs anywhere: ``import fastlt``
    (and ``fastlt --version``) must not import Triton, the losses and heads run with ``backend='torch'`` and
    ``'auto'``, and ``backend='triton'`` says what is missing. ``import fastlt`` imported the kernels (Triton) through
    the glue, the heads and class parallelism. Triton blocked in a fresh process."""
    import subprocess
    import sys

    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
import torch
import fastlt
from fastlt import functional as LF
from fastlt.cli import main
counts = [50, 20, 5, 1]
z, y = torch.randn(6, 4, requires_grad=True), torch.randint(0, 4, (6,))
for backend in ("torch", "auto"):
    for crit in (fastlt.LogitAdjustedLoss(counts, backend=backend), fastlt.GCLLoss(counts, backend=backend),
                 fastlt.LADELoss(counts, backend=backend)):
        crit(z.tanh(), y).backward()
    fastlt.LinearLossHead(3, 4, counts, backend=backend)(torch.randn(6, 3), y).backward()
try:
    fastlt.LogitAdjustedLoss(counts, backend="triton")(z, y)
except RuntimeError as exc:
    assert "needs the triton package" in str(exc), exc
else:
    raise AssertionError("backend='triton' ran without triton")
try:
    main(["--version"])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


@pytest.mark.parametrize("editable_finder", [False, True])
def test_a_source_tree_that_is_not_the_installed_package_finds_its_kernels(tmp_path, editable_finder):
    """``pip install .`` (not editable), then Python or pytest inside the checkout: the checkout's ``fastlt/``
    shadows the installed package, and ``kernels/`` beside it is ``fastlt.kernels`` only once installed, so
    ``import fastlt`` failed (No module named 'fastlt.kernels'); and a second checkout beside an editable install
    took the first one's kernels (the editable finder maps ``fastlt.kernels`` to them), silently. A copy of the
    checkout's package, kernels and pyproject.toml imports its own kernels, with the editable finder and without."""
    import shutil
    import subprocess
    import sys

    for folder in ("fastlt", "kernels"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    drop = "" if editable_finder else \
        'sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", type(f).__name__)]'
    code = f"""
import sys
{drop}
import fastlt
import fastlt.kernels.launch as launch
print(fastlt.__file__, launch.__file__)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "fastlt" / "__init__.py"), str(tmp_path / "kernels" / "launch.py")]


def test_the_kernel_stand_ins_leave_introspection_alone():
    """Without Triton a kernel module is a stand-in whose attributes raise ImportError; its private names (what
    ``inspect``, ``doctest`` and ``copy`` look up with ``hasattr``) are plainly absent."""
    import copy
    import inspect

    from fastlt._kernel_modules import MissingKernels

    stand_in = MissingKernels("fastlt.kernels.launch", ImportError("No module named 'triton'"))
    assert not hasattr(stand_in, "__wrapped__") and inspect.unwrap(stand_in) is stand_in
    copy.copy(stand_in)
    with pytest.raises(ImportError, match="fastlt.kernels.launch.forward needs the triton package"):
        stand_in.forward()
