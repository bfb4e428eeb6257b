"""Loading a pipeline file: YAML (safe, bounded: config/yaml_file.py) -> dotted overrides -> the schema -> the rules;
every problem reported at once with its key path, before anything starts."""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ValidationError

from raypipe import registry
from raypipe.config.rules import cross_checks
from raypipe.config.schema import ConfigError, FinetuneTask, PipelineConfig
from raypipe.config.tasks import all_tasks
from raypipe.config.yaml_file import parse_yaml, read_yaml_file, value_problems
from raypipe.errors import UserError


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the config class at `loc` (for 'did you mean' on unknown keys)."""
    cls: Any = PipelineConfig
    for part in loc:
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            if part not in cls.model_fields:
                return []
            cls = cls.model_fields[part].annotation
        elif typing.get_origin(cls) is dict:
            cls = typing.get_args(cls)[1]
        else:
            return []
        # Unwrap Optional[...] / Annotated[...] to the config class inside.
        while typing.get_origin(cls) in (typing.Union, types.UnionType, Annotated):
            args = [a for a in typing.get_args(cls) if a is not type(None)]
            cls = args[0]
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return []


def _without_form(loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """`loc` less the tag pydantic adds for the form of `finetune` (one section, or named
    tasks), and the class of a named task's section when the error is inside one."""
    if len(loc) > 1 and loc[0] == "finetune" and loc[1] in ("one", "tasks"):
        task = FinetuneTask if loc[1] == "tasks" else None
        return (loc[0], *loc[2:]), task
    return loc, None


def _format_error(err: dict) -> str:
    loc, task = _without_form(tuple(err["loc"]))
    path = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        if task is not None and len(loc) == 3:  # a key of a named task's own section
            known = list(task.model_fields)
        elif task is not None and len(loc) > 3:
            known = _fields_at(("finetune", *loc[2:-1]))
        else:
            known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {known}"
        return f"{path}: unknown key; {hint}"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error":
        return f"{path}: {msg}"
    return f"{path}: {msg} (got {err['input']!r})"


def apply_overrides(raw: dict, overrides: list[str], *, source: str) -> dict:
    """`key.path=value` pairs; the value is parsed as YAML (`3e-4`, `true`, `[1, 2]`)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(source, [f"--set {item!r}: use key.path=value"])
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(source, [f"--set {key}: '{part}' is not a section"])
        try:
            node[parts[-1]] = parse_yaml(value)
        except UserError as e:
            raise ConfigError(source, [f"--set {key}: the value is {e}"]) from None
    return raw


def parse_config(raw: Any, *, source: str = "config") -> PipelineConfig:
    if not isinstance(raw, dict):
        raise ConfigError(
            source, [f"expected a mapping of keys at the top, got {type(raw).__name__}"]
        )
    problems = value_problems(raw)
    if problems:
        raise ConfigError(source, problems)
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(source, [_format_error(err) for err in e.errors()]) from None
    problems = cross_checks(cfg)
    if problems:
        raise ConfigError(source, problems)
    # The plugins this file names are the user's own choice: a checkpoint may name them too.
    registry.trust(cfg.model.type, cfg.pretrain.objective if cfg.pretrain else None,
                   *(f.task for f in all_tasks(cfg)))  # fmt: skip
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise UserError(f"pipeline file '{path}' not found")
    raw = read_yaml_file(path)
    if overrides and isinstance(raw, dict):
        raw = apply_overrides(raw, overrides, source=source)
    named = raw.get("plugins") if isinstance(raw, dict) else None
    if isinstance(named, list) and all(isinstance(p, str) and p for p in named):
        from raypipe import plugins

        # Before the schema's checks, which ask the plugin's task for its metrics.
        plugins.activate(named)
    return parse_config(raw, source=source)


def to_yaml(cfg: PipelineConfig) -> str:
    """The fully resolved config (defaults filled in), as saved with every run."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
