"""The shape of the house (shared/DESIGN.md, Layers): what may import what, no import circle,
small functions, and `raypipe validate` without Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import yaml

PACKAGE = Path(__file__).resolve().parents[1] / "raypipe"
#: Functions allowed past 80 lines, and why: none today.
LONG_FUNCTIONS: dict[str, str] = {}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text())
    return out


def _imports(tree: ast.Module) -> set[str]:
    """Every module a file imports, at any depth (function-local imports too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_ray_train_and_tune_are_called_from_stages_only():
    for name, tree in _modules().items():
        if name.startswith("raypipe.stages"):
            continue
        bad = {m for m in _imports(tree) if m.startswith(("ray.train", "ray.tune"))}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_the_core_imports_neither_ray_nor_mlflow():
    core = ("raypipe.engine", "raypipe.models", "raypipe.objectives", "raypipe.tasks")
    for name, tree in _modules().items():
        if name.startswith(core):
            bad = {m for m in _imports(tree) if m.split(".")[0] in ("ray", "mlflow")}
            assert not bad, f"{name} imports {sorted(bad)}"
            inner = {
                m for m in _imports(tree) if m.startswith(("raypipe.stages", "raypipe.pipeline"))
            }
            assert not inner, f"{name} imports the orchestration wing: {sorted(inner)}"


def test_no_import_circle():
    modules = _modules()
    graph = {
        name: {m for m in _imports(tree) if m in modules and m != name}
        for name, tree in modules.items()
    }
    # A package's __init__ re-exporting its own modules is not a circle.
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, "import circle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_functions_stay_short_and_pipeline_py_small():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80 and node.name not in LONG_FUNCTIONS:
                    long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert not long
    assert len((PACKAGE / "pipeline.py").read_text().splitlines()) <= 200


def test_validate_loads_no_ray_module(tmp_path, quickstart_data):
    raw = yaml.safe_load((PACKAGE.parent / "pipelines" / "quickstart.yaml").read_text())
    raw["data"] = {
        "unlabeled": {"path": quickstart_data["unlabeled"], "text_column": "text"},
        "labeled": {
            split: {"path": quickstart_data[split], "text_column": "text", "label_column": "label"}
            for split in ("train", "validation")
        },
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    probe = (
        "import sys\n"
        "from raypipe import cli\n"
        f"code = cli.main(['validate', {str(path)!r}])\n"
        "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print('RAY MODULES', loaded, file=sys.stderr)\n"
        "sys.exit(code or (3 if loaded else 0))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "is valid" in done.stderr and "RAY MODULES []" in done.stderr
