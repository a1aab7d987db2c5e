"""The package's layers point one way: no import cycle among hrnet_fast's modules, every module
imports on its own, and nothing has to be imported first for an op to be defined (the Triton
case is in test_triton.py, which needs TRITON_INTERPRET=1)."""
from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hrnet_fast"
# The C++ extension: a module with no Python source (setup.py builds it), imported by _extension.py.
COMPILED = {"hrnet_fast._C"}


def _modules() -> dict[str, Path]:
    """Dotted name -> source file of every Python module and package in hrnet_fast."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The hrnet_fast modules `name` imports anywhere in its source: at module level, inside
    functions (lazy imports still make a layer depend on another) and through
    importlib.import_module("...") with a literal name, so that no import hides from this check."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def owner(dotted: str) -> str:
        while dotted not in known:  # a name inside a module (a function, a class) counts as its module
            dotted = dotted.rpartition(".")[0]
        return dotted

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "hrnet_fast"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base.split(".")[0] == "hrnet_fast":
                # `from pkg import sub` imports the submodule `pkg.sub`; `from pkg import fn`, pkg itself
                found |= {owner(f"{base}.{a.name}") for a in node.names}
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and str(node.args[0].value).split(".")[0] == "hrnet_fast"
        ):
            found.add(owner(node.args[0].value))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules) | COMPILED
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_the_graph_reader_sees_every_kind_of_import(tmp_path):
    """The reader itself: plain, from-, relative, lazy and importlib imports all become edges."""
    source = textwrap.dedent(
        """
        import hrnet_fast.ops._checks
        from hrnet_fast.ops import _backend, conv_bias_act
        from . import reference
        def later():
            from hrnet_fast.triton import conv
            return importlib.import_module("hrnet_fast.fused.conv")
        """
    )
    path = tmp_path / "example.py"
    path.write_text(source)
    known = {"hrnet_fast", "hrnet_fast.ops", "hrnet_fast.ops._checks", "hrnet_fast.ops._backend",
             "hrnet_fast.ops.reference", "hrnet_fast.triton", "hrnet_fast.triton.conv", "hrnet_fast.fused.conv"}
    assert _imports("hrnet_fast.ops.example", path, known) == {
        "hrnet_fast.ops._checks", "hrnet_fast.ops._backend", "hrnet_fast.ops", "hrnet_fast.ops.reference",
        "hrnet_fast.triton.conv", "hrnet_fast.fused.conv",
    }


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert "hrnet_fast.ops._meta" in graph and "hrnet_fast.triton.conv" in graph
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        pytest.fail("import cycle: " + " -> ".join(e.args[1]))


def test_layers_point_one_way():
    """The layers, stated: the Triton kernels and what every backend of an op shares (_meta,
    reference) never import the functional API or the backend table, and the ops never import the
    fused modules or optimize() (convert.py)."""
    graph = import_graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    public = {"hrnet_fast", "hrnet_fast.ops", "hrnet_fast.ops.conv", "hrnet_fast.ops.fusion", "hrnet_fast.ops._backend"}
    for leaf in ("hrnet_fast.ops._meta", "hrnet_fast.ops.reference", "hrnet_fast.triton.conv", "hrnet_fast.triton.fusion"):
        assert not reach(leaf) & public, f"{leaf} imports {sorted(reach(leaf) & public)}"
    for op in ("hrnet_fast.ops.conv", "hrnet_fast.ops.fusion", "hrnet_fast.ops.winograd", "hrnet_fast.ops._backend"):
        above = {m for m in reach(op) if m.startswith(("hrnet_fast.fused", "hrnet_fast.convert"))}
        assert not above, f"{op} imports {sorted(above)}"


def test_no_module_shares_a_name_with_a_function():
    """A package that re-exports a function named like one of its modules hides that module
    (`hrnet_fast.ops.x` is then the function, and `import hrnet_fast.ops.x as m` gives the function
    too): no module-level function anywhere in hrnet_fast is named like one of its modules."""
    modules = _modules()
    module_names = {m.rpartition(".")[2] for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        functions = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assert not functions & module_names, f"{name} defines {sorted(functions & module_names)}, which are also module names"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one child per module")
def test_every_module_imports_alone():
    """Each module imported first, in a process of its own that has imported nothing of hrnet_fast:
    none needs another imported before it. One interpreter imports torch and Dynamo (which
    hrnet_fast pulls in) once, then forks a child per module, so this takes seconds, not minutes."""
    names = sorted(_modules())
    script = textwrap.dedent(
        """
        import os, sys, traceback
        import importlib
        import torch, torch._dynamo  # third-party, shared by every child
        assert not any(m.split(".")[0] == "hrnet_fast" for m in sys.modules)
        failed = []
        for name in sys.argv[1:]:
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            if os.waitpid(pid, 0)[1] != 0:
                failed.append(name)
        print("failed:", failed)
        sys.exit(1 if failed else 0)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
