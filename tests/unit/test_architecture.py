"""The shape of the library: layers without cycles, short functions, a true architecture page."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "src" / "dinoflow"
MAX_FUNCTION_LINES = 60  # as `ruff format` writes it (no `# fmt: skip`)


def _import_cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_no_import_cycle_in_the_library_counting_function_level_imports() -> None:
    import grimp

    graph = grimp.build_graph("dinoflow")  # grimp reads every import, inside functions too
    # a package's __init__ re-exporting its modules is not a cycle of the design
    cycles = [c for c in _import_cycles(graph)
              if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]
    assert cycles == []


def test_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: a two-module loop is reported."""

    class Graph:
        modules = {"a", "b", "c"}
        edges = {"a": {"b"}, "b": {"a"}, "c": {"a"}}

        def find_modules_directly_imported_by(self, m: str) -> set[str]:
            return self.edges[m]

    assert _import_cycles(Graph()) == [["a", "b"]]


def test_import_layers_hold() -> None:
    """The import-linter contracts of pyproject.toml (also run by `make lint` and CI)."""
    out = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout


def _long_functions(tree: ast.AST, path: Path, root: Path = ROOT) -> list[str]:
    return [f"{path.relative_to(root)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def _long_functions_as_formatted(folder: Path) -> list[str]:
    """The functions over MAX_FUNCTION_LINES in ``folder`` once ``ruff format`` (the project's
    settings: line length 100) has written it. ``folder`` is formatted in place: pass a copy."""
    ruff = Path(sys.executable).with_name("ruff")
    out = subprocess.run([str(ruff), "format", "--config", str(ROOT / "pyproject.toml"),
                          "--no-cache", str(folder)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    found = []
    for path in sorted(folder.rglob("*.py")):
        found += _long_functions(ast.parse(path.read_text()), path, folder)
    return found


def test_no_fmt_skip_in_the_library() -> None:
    """No ``# fmt: skip`` (nor fmt: off) packs lines to pass the length check below."""
    packed = [f"{path.relative_to(ROOT)}:{n}" for path in sorted(LIBRARY.rglob("*.py"))
              for n, line in enumerate(path.read_text().splitlines(), 1)
              if re.search(r"fmt:\s*(skip|off)", line)]
    assert packed == [], f"`# fmt: skip` / `# fmt: off` in the library (remove it): {packed}"


def test_no_library_function_over_60_lines_as_ruff_formats_it(tmp_path: Path) -> None:
    copy = tmp_path / "dinoflow"
    shutil.copytree(LIBRARY, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert _long_functions_as_formatted(copy) == []


def test_long_function_finder_can_fail(tmp_path: Path) -> None:
    """A 61-line function is reported, a 60-line one is not; lines are counted as ruff formats
    them: a 50-line function packed on long lines is reported too."""
    lines = [f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES)]
    (tmp_path / "long.py").write_text("def long():\n" + "\n".join(lines) + "\n")
    (tmp_path / "short.py").write_text("def short():\n" + "\n".join(lines[:-1]) + "\n")
    packed = ", ".join(f"argument_{i}={i}" for i in range(20))  # ruff: one argument a line
    (tmp_path / "packed.py").write_text("def packed():\n" + "\n".join(lines[:48])
                                        + f"\n    y = dict({packed})\n")
    assert len((tmp_path / "packed.py").read_text().splitlines()) == 50
    found = _long_functions_as_formatted(tmp_path)
    assert found == [f"long.py:1 long ({MAX_FUNCTION_LINES + 1} lines)",
                     "packed.py:1 packed (71 lines)"]


def test_architecture_page_names_modules_that_exist() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`(dinoflow(?:\.[a-z_0-9]+)+)`", text))
    assert len(named) >= 20  # the page really lists the modules
    missing = []
    for dotted in sorted(named):
        parts = dotted.split(".")[1:]
        if parts[0] == "pipelines":
            base = ROOT / "pipelines" / Path(*parts[1:])
        else:
            base = LIBRARY / Path(*parts)
        if not (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
                or _is_attribute(dotted)):
            missing.append(dotted)
    assert missing == []
    # and every library module is on the page
    modules = {"dinoflow." + ".".join(p.relative_to(LIBRARY).with_suffix("").parts)
               for p in LIBRARY.rglob("*.py") if p.name != "__init__.py"}
    unlisted = sorted(m for m in modules if m not in named and m not in
                      {"dinoflow.__main__", "dinoflow.settings", "dinoflow.pipeline_registry"})
    assert unlisted == []


def _is_attribute(dotted: str) -> bool:
    """``dinoflow.training.pretrain``: a name defined in an existing module or package."""
    import importlib

    module, _, name = dotted.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


@pytest.mark.parametrize("module", ["benchmarks.bench_step", "benchmarks.gpu_step", "benchmarks.bench_distill",
                                    "experiments.profile_search", "experiments.continue_demo"])
def test_benchmarks_and_experiments_run_as_modules(module: str) -> None:
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout.lower()



def _private_imports(folder: Path) -> list[str]:
    """``from module import _name``: a module's private helper used by another module."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                found += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_private_helper_is_imported_across_modules(tmp_path: Path) -> None:
    assert _private_imports(LIBRARY) + _private_imports(ROOT / "pipelines") == []
    (tmp_path / "m.py").write_text("from dinoflow.files import _roll_forward, swap_in\n")
    assert _private_imports(tmp_path) == ["m.py: dinoflow.files._roll_forward"]


def _model_loading_functions(folder: Path) -> list[str]:
    """The functions whose own body calls ``mlflow.pytorch.load_model``."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                own = [n for n in node.body if not isinstance(n, ast.FunctionDef | ast.ClassDef)]
                calls = [c for n in own for c in ast.walk(n) if isinstance(c, ast.Call)]
                if any(ast.unparse(c.func) == "mlflow.pytorch.load_model" for c in calls):
                    found.append(f"{path.relative_to(folder)}:{node.name}")
    return found


def test_one_place_loads_a_logged_pytorch_model() -> None:
    """``mlflow.pytorch.load_model`` in ``dinoflow.artifacts`` (the one loader) and in the
    embedder's ``load_context`` (MLflow calls it inside the served model), nowhere else."""
    assert _model_loading_functions(LIBRARY) == [
        "artifacts.py:_from_mlflow",
        "serving.py:load_context",
    ]
