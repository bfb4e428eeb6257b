"""Reading a pipeline file's YAML, bounded: UTF-8 only, no duplicate keys, and a document
that stays small once its aliases are followed, with finite numbers of sane size. Each
problem is one line naming where it is; nothing reaches the schema that could hang it or
make a 70 MB error message."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from raypipe.errors import UserError

MAX_DEPTH = 40  # sections within sections; a pipeline file needs about 6
MAX_VALUES = 50_000  # values in the document with every alias followed
MAX_INT = 2**53  # beyond this no setting is meant (and JSON, MLflow, torch lose it)
#: An object-store URI with credentials in it (`s3://KEY:SECRET@bucket/…`): pyarrow's
#: filesystems do not take them there, and they would be shown and logged.
_STORE_CREDENTIALS = re.compile(r"(s3|s3a|gs|gcs|abfss?|az|hdfs)://[^/?#\s]*@", re.IGNORECASE)


class _Loader(yaml.SafeLoader):
    """safe_load's loader, refusing a key given twice in one mapping (the second would
    silently replace the first: a second `pretrain:` section, say). Merge keys (`<<: *common`)
    work as in YAML: the mapping's own keys win over merged ones."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the schema names it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (first at line {first})",
                    key_node.start_mark,
                )  # fmt: skip
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML's) reads `1e-3` as a string: it wants a dot (`1.0e-3`). YAML 1.2 and every
# user read it as a number, so it is one here too (in options, which no schema coerces).
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _one_line(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"invalid YAML{where}: {problem}"


def parse_yaml(text: str) -> Any:
    """`text` as YAML (safe), or a UserError with one line."""
    loader = _Loader(text)  # what yaml.load does, with our SafeLoader subclass
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise UserError(_one_line(e)) from None
    except RecursionError:
        raise UserError(f"invalid YAML: nested more than {MAX_DEPTH} levels deep") from None
    finally:
        loader.dispose()


def read_yaml_file(path: Path) -> Any:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        what = "UTF-16" if utf16 else f"not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
        raise UserError(f"{path}: the file is {what}; save it as UTF-8") from None
    try:
        return parse_yaml(text)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def value_problems(raw: Any) -> list[str]:
    """What no setting can be, anywhere in the document: too deep, too many values once
    aliases are followed (a YAML alias bomb), a non-finite number, an absurdly large one."""
    problems: list[str] = []
    budget = [MAX_VALUES]

    def walk(node: Any, path: str, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0 or len(problems) >= 10:
            return
        if depth > MAX_DEPTH:
            problems.append(f"{path}: nested more than {MAX_DEPTH} levels deep")
            return
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k), depth + 1)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]", depth + 1)
        elif isinstance(node, str) and _STORE_CREDENTIALS.match(node):
            problems.append(
                f"{path}: credentials inside an object-store URI are not supported (they would "
                "be shown and logged); give them as the store's environment variables (e.g. "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) or an instance role"
            )
        elif isinstance(node, float) and not math.isfinite(node):
            problems.append(f"{path}: {node} is not a finite number")
        elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > MAX_INT:
            problems.append(f"{path}: {node:.3g} is far larger than any setting (at most 2**53)")

    walk(raw, "", 0)
    if budget[0] < 0:
        return [f"the document holds more than {MAX_VALUES:,} values once its aliases are "
                "followed (a YAML alias bomb?); write the settings out"]  # fmt: skip
    return problems
