"""The package's import graph has no cycles, and importing it has no side effects."""
import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "deepwish"


def _module_name(f: Path) -> str:
    rel = f.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> deepwish modules it imports (module-level and function-level imports alike;
    package __init__ files are left out, as importing a submodule always runs them)."""
    files = {_module_name(f): f for f in PKG.rglob("*.py")}
    modules = {m for m, f in files.items() if f.name != "__init__.py"}
    graph = {}
    for m in modules:
        deps = set()
        for node in ast.walk(ast.parse(files[m].read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = m.split(".")[: len(m.split(".")) - node.level]
                    base = ".".join(pkg + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            deps |= {n for n in names if n in modules and n != m}
        graph[m] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert "deepwish.model.transformer" in graph and graph["deepwish.train.loop"]
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_import_has_no_side_effects_and_the_cli_sets_the_thread_policy():
    # importing the package (and its model) leaves the environment alone, and the package's names
    # still resolve (loaded on first use); one interpreter for both (each start imports torch)
    assert _run("import os, deepwish\nprint(deepwish.Transformer.__name__, deepwish.load_config.__name__)\n"
                "import deepwish.model.transformer\nprint(os.environ.get('OMP_WAIT_POLICY'))").splitlines() == \
        ["Transformer load_config", "None"]
    # the entry point sets the policy before torch is imported
    out = _run("import sys, os, deepwish.cli; print('torch' in sys.modules)\n"
               "try:\n    deepwish.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
               "print(os.environ.get('OMP_WAIT_POLICY'))")
    assert out.splitlines()[0] == "False" and out.splitlines()[-1] == "PASSIVE"


def test_the_training_loop_reads_as_small_functions():
    """train() is a handful of functions, none over ~80 lines (a reader sees each step whole)."""
    tree = ast.parse((PKG / "train" / "loop.py").read_text())
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, long
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 40
