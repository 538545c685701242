"""The package's floors (docs/architecture.md): a module imports only from its own floor or below, never
upward, not even inside a function, and no import circle exists. Read from the source, so a function-local
import counts as much as one at the top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "mtprune"

# floor -> modules (a name ending in ".*" covers a package); docs/architecture.md draws the same
FLOORS = {
    1: ["mtprune", "errors", "layout", "manifest", "textio", "batching", "cpus", "gpus", "faults", "children",
        "lock"],
    2: ["config"],
    3: ["fairseq_backend", "databin", "el2n", "scoring.*", "noise", "sources", "synthetic", "significance", "curves", "plots",
        "results", "curriculum", "fairseq_user.*"],
    4: ["pipeline", "inprogress", "launch"],
    5: ["stages.*"],
    6: ["cli", "slurm", "plan", "__main__"],
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(module: str) -> int:
    short = module.removeprefix("mtprune.") if module != "mtprune" else "mtprune"
    for floor, names in FLOORS.items():
        for n in names:
            if short == n or (n.endswith(".*") and (short == n[:-2] or short.startswith(n[:-1]))):
                return floor
    raise AssertionError(f"{module} is on no floor: add it to FLOORS and to docs/architecture.md")


def imports_of(path: Path, modules: set[str], source: str | None = None) -> set[str]:
    """The package's modules that ``path`` (or ``source`` read as that file) imports, wherever the import stands."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    text = path.read_text(encoding="utf-8") if source is None else source
    for node in ast.walk(ast.parse(text)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names = [stem] + [f"{stem}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in modules:  # `from .. import gpus` names a module; `from .x import f` a name in x
                n = n.rpartition(".")[0]
            if n and n != me and n.startswith("mtprune"):
                out.add(n)
    return out


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def test_no_module_imports_a_higher_floor() -> None:
    g = graph()
    upward = [f"{m} (floor {floor_of(m)}) imports {d} (floor {floor_of(d)})"
              for m, deps in sorted(g.items()) for d in sorted(deps) if floor_of(d) > floor_of(m)]
    assert not upward, "\n".join(upward)


def test_no_import_circle() -> None:
    g = graph()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for d in sorted(g[m]):
            if seen.get(d) == 1:
                circles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in seen:
                visit(d, path + [d])
        seen[m] = 2

    for m in sorted(g):
        if m not in seen:
            visit(m, [m])
    assert not circles, "\n".join(circles)


def test_the_checker_sees_an_upward_import_inside_a_function() -> None:
    f = PACKAGE / "textio.py"
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert all(floor_of(d) <= 1 for d in imports_of(f, modules))
    probe = f.read_text(encoding="utf-8") + "\n\ndef _probe():\n    from .stages.score import run\n"
    assert "mtprune.stages.score" in imports_of(f, modules, probe)


def test_every_module_is_on_a_floor_and_help_loads_no_heavy_library() -> None:
    for m in graph():
        floor_of(m)
    code = ("import sys, mtprune.cli; heavy = [m for m in ('torch', 'fairseq', 'lingua', 'pandas', 'sklearn') "
            "if m in sys.modules]; print(','.join(heavy))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "", p.stdout + p.stderr


def test_a_module_over_400_lines_says_at_its_top_why_it_is_one() -> None:
    long = [f for f in sorted(PACKAGE.rglob("*.py")) if len(f.read_text(encoding="utf-8").splitlines()) > 420]
    silent = [str(f.relative_to(ROOT)) for f in long
              if "Why one long module" not in (ast.get_docstring(ast.parse(f.read_text(encoding="utf-8"))) or "")]
    assert not silent, f"over 400 lines without a reason at the top: {silent}"
