"""Imports go one way: the root modules' import graph (read from their source) has no
circle and no module ``__getattr__``, and the files docs/modules.md tells users to copy
import nothing else from this repository."""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL = {p.stem for p in ROOT.glob("*.py")}


def imports(path: Path) -> set:
    """Root modules that ``path`` imports, at any depth of its code (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & LOCAL


def graph() -> dict:
    return {p.stem: imports(p) for p in ROOT.glob("*.py")}


def test_root_modules_import_without_a_circle():
    edges = graph()
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            assert state.get(nxt) != "open", "import circle: " + " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


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
        assert imports(ROOT / name) <= {Path(f).stem for f in files}, name
        (tmp_path / name).write_text((ROOT / name).read_text())
    code = ("import torch\nfrom span_attention import AdaptiveSpanAttention\n"
            "from adaptive_span import AdaptiveSpan\n"
            "a = AdaptiveSpanAttention(hidden_size=16, nheads=2, max_span=64)\n"
            "print(tuple(a(torch.randn(1, 9, 16)).shape))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": "", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 9, 16)"
