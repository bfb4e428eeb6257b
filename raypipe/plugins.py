"""A pipeline's own code: the `plugins:` it names, importable here and on every Ray process.

Each entry is a path (relative to the current directory, as data paths are) to a package
folder (`myext/` with an `__init__.py`: what Ray's `py_modules` ships); the pipeline then
names its classes as `"myext.objectives:MyObjective"`. `raypipe run`:
- makes each importable in this process, under its own name only (a folder of symlinks on
  `sys.path`, so nothing else beside it becomes importable), and imports it once, so a
  syntax error or a failing import is one line before Ray starts;
- ships each to every Ray process through the runtime environment (`py_modules`), for the
  embedded Ray and for a cluster, also under `ray job submit` (merged with the job's own).

Only the pipeline file, which the user wrote, names plugins; nothing read from storage does.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

from raypipe.errors import UserError

_ACTIVE: dict[str, str] = {}  # module name -> its absolute path


def _module(entry: str, key: str) -> tuple[str, Path]:
    """(module name, absolute path) of one `plugins` entry, checked."""
    path = Path(entry).expanduser()
    if not path.exists():
        raise UserError(
            f"{key}: '{entry}' does not exist (plugin paths are relative to the current "
            f"directory, {os.getcwd()})"
        )
    if not path.is_dir() or not (path / "__init__.py").is_file():
        raise UserError(
            f"{key}: '{entry}' is not a package folder; put the plugin's modules in a folder "
            "with an __init__.py (e.g. myext/__init__.py, myext/objectives.py) and name that"
        )
    name = path.resolve().name
    if not name.isidentifier():
        raise UserError(f"{key}: '{name}' is not a valid module name; rename '{entry}'")
    return name, path.resolve()


def _shadows(name: str, path: Path) -> bool:
    """True when `name` already imports as something else (a plugin must not replace it)."""
    if name in _ACTIVE:
        return _ACTIVE[name] != str(path)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    locations = list(spec.submodule_search_locations or [])
    found = Path(locations[0]) if locations else Path(spec.origin or "")
    return found.resolve() != path


def activate(entries: list[str]) -> list[str]:
    """Make each plugin importable here and import it; returns their absolute paths (for the
    runtime environment). A mistake is a UserError naming the entry."""
    paths = []
    for i, entry in enumerate(entries):
        key = f"plugins[{i}]"
        name, path = _module(entry, key)
        if _shadows(name, path):
            raise UserError(
                f"{key}: a module named '{name}' is already importable (an installed package or "
                "raypipe's own); rename the plugin"
            )
        _link(name, path)
        _import(name, path, key)
        paths.append(str(path))
    return paths


def _link(name: str, path: Path) -> None:
    if name in _ACTIVE:
        return
    if "dir" not in _LINKS:
        _LINKS["dir"] = tempfile.mkdtemp(prefix="raypipe-plugins-")
        atexit.register(shutil.rmtree, _LINKS["dir"], True)
        sys.path.insert(0, _LINKS["dir"])
    os.symlink(path, Path(_LINKS["dir"]) / name)
    importlib.invalidate_caches()
    _ACTIVE[name] = str(path)


_LINKS: dict[str, str] = {}


def _import(name: str, path: Path, key: str) -> None:
    try:
        importlib.import_module(name)
    except SyntaxError as e:
        raise UserError(
            f"{key}: syntax error in {e.filename}, line {e.lineno}: {e.msg}; fix the plugin"
        ) from None
    except Exception as e:  # noqa: BLE001 - a plugin's import may raise anything
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise UserError(
            f"{key}: importing '{name}' failed at {frame.filename}:{frame.lineno}: "
            f"{type(e).__name__}: {e}"
        ) from None


def runtime_env() -> dict | None:
    """The runtime environment shipping the active plugins to every Ray process (None: no
    plugins). Under `ray job submit` the job's own `py_modules`, if any, are kept beside ours (Ray
    refuses a driver's runtime env that sets a field the job set)."""
    paths = list(_ACTIVE.values())
    if not paths:
        return None
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
    theirs = (job.get("runtime_env") or {}).get("py_modules") or []
    if theirs:
        os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"  # ours is theirs plus the plugins
    return {"py_modules": [*theirs, *(p for p in paths if p not in theirs)]}
