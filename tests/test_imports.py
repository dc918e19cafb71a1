"""Imports go one way: the root modules' import graph (read from their source) has no
circle and no module ``__getattr__``, nothing imports main.py or a script, and the files
docs/modules.md tells users to copy import nothing else from this repository."""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL = {p.stem for p in ROOT.glob("*.py")}


def imports_of(path: Path) -> set:
    """Names of the modules a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def root_graph() -> dict:
    return {m: sorted(imports_of(ROOT / f"{m}.py") & LOCAL - {m}) for m in sorted(LOCAL)}


def cycles(graph: dict) -> list:
    """Every import circle, as a path that comes back to its start (depth-first search)."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"
    for m in graph:
        if m not in state:
            visit(m, [m])
    return found


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]
    assert cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


def test_root_modules_import_without_a_circle():
    assert cycles(root_graph()) == []


def test_nothing_imports_main_or_a_script():
    scripts = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    for m in sorted(LOCAL):
        assert not imports_of(ROOT / f"{m}.py") & (scripts | {"main"}) - {m}, m
    for path in (ROOT / "scripts").glob("*.py"):
        assert "main" not in imports_of(path), path


def test_no_module_getattr():
    for path in ROOT.glob("*.py"):
        tree = ast.parse(path.read_text())
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body), path


def test_documented_files_are_enough(tmp_path):
    """The files docs/modules.md names to copy run the documented drop-in module alone."""
    text = (ROOT / "docs" / "modules.md").read_text()
    line = next(l for l in text.split("\n\n") if l.startswith("Files to copy"))
    files = re.findall(r"`(\w+\.py)`", line)
    assert "span_attention.py" in files
    for name in files:
        assert imports_of(ROOT / name) & LOCAL <= {Path(f).stem for f in files}, name
        (tmp_path / name).write_text((ROOT / name).read_text())
    code = ("import torch\nfrom span_attention import AdaptiveSpanAttention\n"
            "from adaptive_span import AdaptiveSpan\n"
            "a = AdaptiveSpanAttention(hidden_size=16, nheads=2, max_span=64)\n"
            "print(tuple(a(torch.randn(1, 9, 16)).shape))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": "", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 9, 16)"
