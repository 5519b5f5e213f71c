"""Every module the product imports is installed by ``pip install .`` on a fresh machine.

The product's files (``core/``, ``pages/``, ``dashboard/``, ``app.py``) are read statically;
each top-level module they import must be the standard library, the project itself, or come
from a distribution declared in pyproject.toml's ``dependencies``. A distribution of an
optional extra may only be imported inside a function. (``threadpoolctl`` once came only
through the test extras, and the README's first command failed on a fresh machine.)
"""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from functools import lru_cache
from pathlib import Path

try:
    import tomllib
except ImportError:        # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"core", "pages", "dashboard", "app"}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)).lower()


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {_name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    return {_name(r) for r in project["dependencies"]}, extras


def _product_files() -> list[Path]:
    files = [ROOT / "app.py"]
    for folder in ("core", "pages", "dashboard"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return [f for f in files if f.is_file()]


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """``(top-level module, inside a function, line)`` of every absolute import in ``path``."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], in_function, child.lineno))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


@lru_cache(maxsize=1)
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(module: str) -> set[str]:
    """The distributions that install ``module`` (its own name, normalised, if none is installed)."""
    dists = _installed().get(module)
    return {_name(d) for d in dists} if dists else {_name(module)}


def check(files: list[Path]) -> list[str]:
    required, extras = _declared()
    problems = []
    for path in files:
        for module, in_function, line in _imports(path):
            if module in sys.stdlib_module_names or module in PROJECT:
                continue
            dists = _distributions(module)
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line} imports {module!r} (from {', '.join(sorted(dists))})"
            if dists & required:
                continue
            if dists & extras:
                if not in_function:
                    problems.append(f"{where}: an optional extra, imported at module level")
                continue
            problems.append(f"{where}: not declared in pyproject.toml's dependencies")
    return problems


def test_every_imported_module_is_declared():
    files = _product_files()
    assert len(files) > 10, files
    problems = check(files)
    assert not problems, "\n".join(problems)


def test_an_undeclared_import_is_caught(tmp_path):
    """The check itself fails for the mistakes it guards against."""
    bad = tmp_path / "probe.py"
    bad.write_text("import threadpoolctl_missing_dep\nimport json\n\ndef f():\n    import psutil\n"
                   "import weightwatcher\n")
    problems = check([bad])
    assert len(problems) == 2, problems
    assert "threadpoolctl_missing_dep" in problems[0] and "not declared" in problems[0]
    assert "weightwatcher" in problems[1] and "module level" in problems[1]
