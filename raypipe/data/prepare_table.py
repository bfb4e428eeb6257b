"""`raypipe prepare table`: labeled text in the layouts public datasets come in -> (text, label).

Layouts:
    tsv     literal tab-separated fields: a quote mark is text, never quoting (one stray `"`
            must not swallow the rows after it)
    csv     comma-separated with CSV quoting (a quoted field may hold commas and newlines)
    jsonl   one JSON object a line
    lines   `LABEL<sep>text` a line (`--separator`, default: the first run of whitespace)
    files   one text a line, the label given by the file (`--label-from-file pos=a.txt ...`)

Columns are header names, or with `--no-header` positions counted from 1 (as `cut -f`);
several text columns are joined by a space. Every row read is either written or counted and
named as skipped (`Skipped.rows`), so rows read = rows written + rows skipped.
"""

from __future__ import annotations

import csv
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

from raypipe.data.labels import LabelMap, build_label_map
from raypipe.data.prepare_io import Skipped, text_lines
from raypipe.errors import UserError

FORMATS = ("auto", "tsv", "csv", "jsonl", "lines")
_TAG = re.compile(r"<[^>]{0,200}>")


@dataclass(frozen=True)
class TableLayout:
    fmt: str = "auto"
    header: bool = True
    text_columns: tuple[str, ...] = ("sentence",)
    label_column: str = "label"
    separator: str | None = None  # lines: None = the first run of whitespace
    encoding: str = "utf-8"
    clean: bool = False


@dataclass
class Labeled:
    """Rows read, labels still raw: (where, text, raw label)."""

    where: list[str]
    texts: list[str]
    raw: list[str]


def clean_text(text: str) -> str:
    """Web text made plain: HTML tags become spaces, entities their characters, and every run
    of whitespace one space."""
    return " ".join(html.unescape(_TAG.sub(" ", text)).split())


def table_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.name.removesuffix(".gz")
    return (
        "jsonl" if name.endswith((".jsonl", ".json")) else "csv" if name.endswith(".csv") else "tsv"
    )


def _field_records(path: Path, fmt: str, layout: TableLayout, skipped: Skipped):
    """(where, fields) of every non-blank record of a TSV or CSV file."""
    lines = text_lines(path, skipped, encoding=layout.encoding)
    if fmt == "tsv":
        for i, line in lines:
            if line.strip():
                yield f"{path}:{i}", line.split("\t")
        return
    reader = csv.reader((line + "\n" for _, line in lines), quoting=csv.QUOTE_MINIMAL)
    try:
        for values in reader:
            if values and any(v.strip() for v in values):
                yield f"{path}:{reader.line_num}", values
    except csv.Error as e:  # a field over csv's size limit, a NUL byte: the rest is unreadable
        skipped.append(f"{path}:{reader.line_num} (unreadable from here: {e})")


def _column_index(spec: str, header: list[str] | None, path: Path) -> int:
    if header is not None and spec in header:
        return header.index(spec)
    if spec.isdigit() and int(spec) >= 1:
        return int(spec) - 1
    if header is None:
        raise UserError(
            f"prepare table: with --no-header, columns are numbers counted from 1 (got {spec!r})"
        )
    raise UserError(
        f"prepare table: '{path}' has no column '{spec}' (columns: {header}); set --text-column "
        "and --label-column, or pass --no-header for a file without a header row"
    )


def _read_fields(path: Path, fmt: str, layout: TableLayout, out: Labeled, skipped: Skipped):
    records = _field_records(path, fmt, layout, skipped)
    header = None
    if layout.header:
        first = next(records, None)
        if first is None:
            return
        header = [h.strip() for h in first[1]]
    columns = [_column_index(c, header, path) for c in (*layout.text_columns, layout.label_column)]
    width = len(header) if header is not None else None
    for where, fields in records:
        width = len(fields) if width is None else width  # headerless: the first row's width
        if len(fields) != width:
            skipped.row(f"{where} ({len(fields)} fields, expected {width})")
        elif max(columns) >= width:
            raise UserError(
                f"prepare table: column {max(columns) + 1} is past the {width} columns of '{path}'"
            )
        else:
            *texts, label = (fields[c] for c in columns)
            _add(out, skipped, where, texts, label, layout)


def _nonblank(path: Path, layout: TableLayout, skipped: Skipped):
    """(where, line) of every line of `path` with text on it."""
    for i, line in text_lines(path, skipped, encoding=layout.encoding):
        if line.strip():
            yield f"{path}:{i}", line


def _read_jsonl(path: Path, layout: TableLayout, out: Labeled, skipped: Skipped) -> None:
    for where, line in _nonblank(path, layout, skipped):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            skipped.row(f"{where} (not JSON)")
            continue
        if not isinstance(row, dict):
            skipped.row(f"{where} (not an object)")
            continue
        wanted = (*layout.text_columns, layout.label_column)
        if any(c not in row for c in wanted):
            raise UserError(
                f"prepare table: {where} has no column "
                f"'{next(c for c in wanted if c not in row)}' (columns: {sorted(row)}); set "
                "--text-column and --label-column"
            )
        *texts, label = (row[c] for c in wanted)
        _add(out, skipped, where, texts, label, layout)


def _read_lines(path: Path, layout: TableLayout, out: Labeled, skipped: Skipped) -> None:
    for where, line in _nonblank(path, layout, skipped):
        if layout.separator is None:
            parts = line.strip().split(None, 1)
        else:
            parts = line.split(layout.separator, 1)
        if len(parts) != 2:
            skipped.row(f"{where} (no label before the text)")
            continue
        _add(out, skipped, where, [parts[1]], parts[0], layout)


def _add(out: Labeled, skipped: Skipped, where: str, texts: list, label, layout) -> None:
    parts = [clean_text(str(t)) if layout.clean else str(t).strip() for t in texts if t is not None]
    text = " ".join(p for p in parts if p)
    raw = "" if label is None else str(label).strip()
    if not text or not raw:
        skipped.row(f"{where} (empty text or label)")
        return
    out.where.append(where)
    out.texts.append(text)
    out.raw.append(raw)


def read_labeled(inputs: list[Path], layout: TableLayout, skipped: Skipped) -> Labeled:
    """Every row of `inputs` (tables, or `lines` files), labels raw."""
    out = Labeled([], [], [])
    for path in inputs:
        fmt = table_format(path, layout.fmt)
        if fmt == "jsonl":
            _read_jsonl(path, layout, out, skipped)
        elif fmt == "lines":
            _read_lines(path, layout, out, skipped)
        else:
            _read_fields(path, fmt, layout, out, skipped)
    return out


def read_label_files(files: dict[str, Path], layout: TableLayout, skipped: Skipped) -> Labeled:
    """`--label-from-file NAME=FILE ...`: each line of FILE is a text labeled NAME."""
    out = Labeled([], [], [])
    for name, path in files.items():
        for where, line in _nonblank(path, layout, skipped):
            _add(out, skipped, where, [line], name, layout)
    return out


def numbered(rows: Labeled, labels: LabelMap, skipped: Skipped) -> dict[str, list]:
    """{"text", "label"} with each raw label's id; a label the map lacks skips its row."""
    kept: dict[str, list] = {"text": [], "label": []}
    for where, text, raw in zip(rows.where, rows.texts, rows.raw, strict=True):
        i = labels.id_of(raw)
        if i is None:
            skipped.row(f"{where} (label {raw!r} is not in the label map)")
            continue
        kept["text"].append(text)
        kept["label"].append(i)
    return kept


def as_numbers(rows: Labeled, skipped: Skipped) -> dict[str, list]:
    """{"text", "label"} for regression: a label that is not a number skips its row."""
    kept: dict[str, list] = {"text": [], "label": []}
    for where, text, raw in zip(rows.where, rows.texts, rows.raw, strict=True):
        try:
            value = float(raw)
        except ValueError:
            skipped.row(f"{where} (label {raw!r} is not a number)")
            continue
        kept["text"].append(text)
        kept["label"].append(value)
    return kept


def label_dataset(splits: dict[str, Labeled], given, *, regression: bool, skipped: Skipped):
    """Each split's {"text", "label"} under one label map for all of them (None: regression)."""
    if regression:
        return {s: as_numbers(r, skipped) for s, r in splits.items()}, None
    labels = build_label_map([raw for r in splits.values() for raw in r.raw], given)
    return {s: numbered(r, labels, skipped) for s, r in splits.items()}, labels
