"""The engine stays a plain library: no Streamlit, no plotting, no bare prints."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "core"


def test_importing_every_core_module_pulls_in_no_ui_library():
    modules = sorted(".".join(p.relative_to(CORE).with_suffix("").parts).removesuffix(".__init__")
                     for p in CORE.rglob("*.py") if p != CORE / "__init__.py" and p.name != "__main__.py")
    code = ("import sys\n" + "".join(f"import core.{m}\n" for m in modules) +
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('streamlit', 'plotly', 'matplotlib'))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=CORE.parent)
    assert out.stdout.strip() == ""


def test_library_modules_log_instead_of_printing():
    offenders = []
    for path in CORE.rglob("*.py"):
        if "cli" in path.relative_to(CORE).parts:   # the command line prints its results by design
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


ROOT = CORE.parent
UI = ("streamlit",)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return found


def _file_of(module: str) -> Path | None:
    for candidate in (ROOT / Path(*module.split(".")).with_suffix(".py"),
                      ROOT / Path(*module.split(".")) / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_no_import_of_core_reaches_streamlit_even_inside_a_function():
    """Lazy imports count too: ``compare --html`` once imported a dashboard module that imported
    Streamlit from inside a function, which the import-time test above cannot see."""
    seen: dict[str, str] = {}            # module -> the module that imported it
    todo = [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in CORE.rglob("*.py")]
    while todo:
        module = todo.pop()
        path = _file_of(module)
        if path is None:
            continue
        for name in _imports(path):
            if name.split(".")[0] in ("core", "dashboard") and name not in seen:
                seen[name] = module
                todo.append(name)
            elif name.split(".")[0] in UI:
                chain = [module]
                while chain[-1] in seen:
                    chain.append(seen[chain[-1]])
                raise AssertionError(f"{' <- '.join(chain)} imports {name}")


def test_compare_html_report_runs_without_streamlit(tmp_path):
    from conftest import saved_tiny

    folder = saved_tiny()
    report = tmp_path / "r.html"
    code = ("import sys\nfrom core.cli import main\n"
            f"rc = main(['compare', {str(folder)!r}, {str(folder)!r}, '--device', 'cpu', '--quiet', "
            f"'--html', {str(report)!r}])\n"
            "print(rc, [m for m in sys.modules if m.split('.')[0] == 'streamlit'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.stdout.split() == ["0", "[]"], out.stderr[-2000:]
    assert report.stat().st_size > 1_000_000 and "Plotly.newPlot" in report.read_text()
