"""The package's import graph has no circle, and the command line answers --help without loading torch.

The graph: a node per module of ``python/fastbon`` (a package is its ``__init__``); an edge for every ``import`` and
``from ... import`` statement in a module's source, at module level or inside a function, class or ``if`` (a lazy
import is still an arrow: it runs the other module while this one is in use). ``from P import x`` points at the module
``P.x`` where that is one, else at ``P``. The implicit import of a module's parent packages is no edge: Python
initialises a package before its modules, whatever imports what.
"""

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "fastbon"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def import_graph() -> dict:
    """{module: the fastbon modules its source imports}."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    # Compiled extensions (fastbon._C) are modules too, leaves of the graph.
    extensions = {f"{_module_name(path.parent / '__init__.py')}.{path.name.split('.')[0]}"
                  for suffix in ("*.so", "*.pyd") for path in PACKAGE.rglob(suffix)}
    graph = {name: set() for name in extensions}
    for name, path in modules.items():
        package = name if _is_package(path) else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = ".".join(part for part in (base if node.level else "", node.module or "") if part)
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    targets.add(submodule if submodule in modules or submodule in extensions else source)
        graph[name] = {target for target in targets if (target in modules or target in extensions) and target != name}
    return graph


def find_cycle(graph: dict) -> list:
    """One circle of ``graph`` as [a, b, ..., a], or [] (depth-first search, nodes in sorted order)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*stack[stack.index(target):], target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "fastbon.jobs.parquet" in graph["fastbon.jobs.groups"], "from . import a module"
    assert {"fastbon.jobs.config", "fastbon.prompts"} <= graph["fastbon.jobs.groups"], "from .x / from ..x import"
    assert "fastbon._C" in graph["fastbon._cpp_ops"], "a compiled extension"
    assert "fastbon.jobs.ray_runner" in graph["fastbon.jobs"], "a function-level import of the Ray runner"


def test_no_import_circle_in_the_package():
    assert find_cycle(import_graph()) == []


def test_a_circle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def _seconds(*command) -> float:
    """The best of three wall times of ``command`` in a fresh interpreter (the best: the machine is shared)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, *command], check=True, capture_output=True, env=environment, timeout=120)
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.parametrize("arguments", [["--help"], ["run", "--help"], ["batch", "--help"], ["demo", "--help"],
                                       ["demo", "--search", "--help"], ["bench", "--help"]])
def test_help_takes_under_a_second_more_than_an_empty_interpreter(arguments):
    """Measured side by side in one run, so a slow machine slows both."""
    empty = _seconds("-c", "pass")
    help_seconds = _seconds("-m", "fastbon.cli", *arguments)
    assert help_seconds - empty < 1.0, f"fastbon {' '.join(arguments)}: {help_seconds:.2f} s vs {empty:.2f} s"


def test_import_fastbon_loads_neither_torch_nor_transformers():
    code = ("import sys, fastbon, fastbon.cli; heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy; assert callable(fastbon.generate) and 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_generate_is_the_function_after_its_module_is_imported():
    """``fastbon.generate`` shares its name with the module that defines it; importing that module first (as
    ``fastbon.search`` does) must not turn the public name into the module."""
    code = "import fastbon.search, fastbon; from fastbon.generate import generate; assert fastbon.generate is generate"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
