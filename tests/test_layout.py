"""The layout's rules (docs/design.md, "Where things live"): imports flow one way, from the scripts down to the
common/ package; common/ never imports a script, a tool or a test; no import cycle, lazy imports included; the
modules a training script needs before torch (stop signals, flags, run resolution) import no torch."""
from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = sorted(p.stem for p in REPO.glob("*.py"))
COMMON = sorted(p.stem for p in (REPO / "common").glob("*.py") if p.stem != "__init__")
TOOLS = sorted(p.stem for p in (REPO / "tools").glob("*.py"))
TORCH_FREE = ["errors", "stop_signals", "flags", "files", "readers", "mirror", "runs"]


def project_module(name: str) -> str | None:
    """'common.loop' for common's modules, the script's name for a top-level script, None for anything else."""
    if name.startswith("common.") or name == "common":
        return name
    if name.startswith("tools."):
        return name
    return name if name in SCRIPTS else None


def imports_of(path) -> set[str]:
    """Every project module `path` imports, at the top or inside a function (lazy imports are edges too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ("common" + (f".{node.module}" if node.module else "")) if node.level else node.module
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            module = project_module(name or "")
            if module and module != "common":
                found.add(module)
    return found


def graph() -> dict[str, set[str]]:
    nodes = {name: REPO / f"{name}.py" for name in SCRIPTS}
    nodes.update({f"common.{name}": REPO / "common" / f"{name}.py" for name in COMMON})
    nodes.update({f"tools.{name}": REPO / "tools" / f"{name}.py" for name in TOOLS})
    return {name: {m for m in imports_of(path) if m in nodes} - {name} for name, path in nodes.items()}


def test_common_imports_nothing_above_it():
    for name, deps in graph().items():
        if name.startswith("common."):
            assert all(dep.startswith("common.") for dep in deps), f"{name} imports {deps}"
        if not name.startswith("tools."):
            assert not any(dep.startswith("tools.") for dep in deps), f"{name} imports a tool: {deps}"


def test_no_import_cycle():
    edges, state, path = graph(), {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for dep in sorted(edges[node]):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


def map_order() -> list[str]:
    """The modules of common/ as common/__init__.py's map lists them: in dependency order."""
    doc = ast.get_docstring(ast.parse((REPO / "common" / "__init__.py").read_text()))
    return [line.split()[0].removesuffix(".py") for line in doc.splitlines()
            if line.startswith("    ") and line.split()[0].endswith(".py")]


def test_common_modules_import_only_those_listed_above_them():
    """common/__init__.py's map lists the modules in dependency order; each imports only modules above it."""
    order = map_order()
    assert sorted(order) == COMMON, "every module of common/ is in the map, once"
    edges = graph()
    for position, name in enumerate(order):
        above = {f"common.{m}" for m in order[:position]}
        assert edges[f"common.{name}"] <= above, f"common.{name} imports {edges[f'common.{name}'] - above}"


def test_the_start_up_modules_import_no_torch():
    """A training script's first lines (stop signals) and the flags and run resolution load without torch, so a
    signal during start-up is caught and `--help` answers fast. One fresh process: nothing imported before."""
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            f"for name in {TORCH_FREE!r}: __import__('common.' + name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.slow  # a fresh process per module: about 3 s each, most of it importing torch
def test_each_module_imports_alone_in_a_fresh_process():
    order = map_order() + SCRIPTS + [f"tools.{n}" for n in TOOLS]
    for name in order:
        module = name if "." in name or name in SCRIPTS else f"common.{name}"
        code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import {module}"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, f"import {module}: {proc.stderr[-1500:]}"


def test_design_md_lists_every_module_of_common_in_the_maps_order():
    """docs/design.md's module table is the map of common/__init__.py, in the same order: it cannot drift."""
    text = (REPO / "docs" / "design.md").read_text()
    listed = re.findall(r"^\| `common/(\w+)\.py` \|", text, re.M)
    assert listed == [name for name in map_order() if name != "console"] or listed == map_order(), listed


def test_the_readmes_line_references_point_at_the_code_they_quote():
    """README's "Where to change what" names lines as `script.py:N` followed by the code there: each is checked."""
    text = (REPO / "README.md").read_text()
    found = re.findall(r"`(\w+\.py):(\d+)`(?:,\s*`(?!\w+\.py:\d)([^`]+)`)?", text)
    assert len(found) >= 8, found
    for name, line, code in found:
        lines = (REPO / name).read_text().splitlines()
        if code:  # the quoted code is on that line (a "..." stands for the rest of it)
            assert code.split("...")[0].strip() in lines[int(line) - 1], f"{name}:{line} is not `{code}`"
        else:  # a bare reference names a definition
            assert lines[int(line) - 1].startswith(("def ", "class ")), f"{name}:{line} is not a definition"
