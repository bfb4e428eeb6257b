"""`raypipe prepare`'s two edges: reading raw inputs as bounded line streams, and writing the
shards to `--out` without harming anything that is already there.

Reading: text is decoded line by line, so one bad byte costs its line, not the file; a
compressed input may expand at most `MAX_EXPANSION` times (a gzip bomb is an unreadable
input, not a `MemoryError`); a truncated file ends its stream with the rows read so far and
is named.

Writing: `--out` may not be, or hold, the current directory or an input; `--overwrite`
replaces only what an earlier `prepare` wrote there (recognised by its `prepare.json` and
shard names), and the old output stays in place until the new one is complete.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raypipe.atomic import atomic_directory
from raypipe.data.labels import FOOTER_KEY, LABELS_FILE
from raypipe.errors import UserError

MANIFEST = "prepare.json"
SPLITS = ("train", "validation", "test")
_SHARD = re.compile(r"part-\d{5}\.parquet")
_SPLIT_NAME = re.compile(r"[a-z][a-z0-9_-]{0,30}")
#: A compressed input expanding beyond this many times its size (and 64 MiB) is unreadable.
MAX_EXPANSION = 100
_EXPANSION_FLOOR = 64 * 2**20
_NAMES = {"utf-8": "UTF-8"}


class Unreadable(Exception):
    """An input (or the rest of it) that cannot be read: counted and named, never fatal."""


class Skipped(list):
    """What a prepare left out, named (a list of "where (why)"), and how many of the input's
    rows that was: `rows read = rows written + Skipped.rows`."""

    rows: int = 0

    def row(self, where: str) -> None:
        """One input row left out."""
        self.append(where)
        self.rows += 1


# --- reading ------------------------------------------------------------------------------------


def _raw_lines(path: Path) -> Iterator[bytes]:
    """The file's lines as bytes; a .gz is decompressed, bounded by MAX_EXPANSION."""
    if path.suffix != ".gz":
        with open(path, "rb") as fh:
            yield from fh
        return
    limit = max(MAX_EXPANSION * path.stat().st_size, _EXPANSION_FLOOR)
    seen = 0
    try:
        with gzip.open(path, "rb") as fh:
            for line in fh:
                seen += len(line)
                if seen > limit:
                    raise Unreadable(f"expands more than {MAX_EXPANSION}x its size")
                yield line
    except (EOFError, OSError, zlib.error) as e:  # truncated or not gzip at all
        raise Unreadable(f"{type(e).__name__}: {e}") from None


def text_lines(
    path: Path, skipped: Skipped, *, whole: bool = False, encoding: str = "utf-8"
) -> Iterator[tuple[int, str]]:
    """(line number, text without its newline) for every line that decodes in `encoding`; a
    line that does not is a row named in `skipped`. An unreadable rest of the file is named
    there too (the lines before it are kept), or, with `whole`, is a UserError."""
    i = 0
    try:
        for i, raw in enumerate(_raw_lines(path), start=1):
            if i == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")) and encoding == "utf-8":
                raise Unreadable("UTF-16 text: save it as UTF-8")
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError:
                skipped.row(f"{path}:{i} (not {_NAMES.get(encoding, encoding)})")
                continue
            if i == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark is not text
            yield i, line.rstrip("\r\n")
    except (Unreadable, OSError) as e:
        why = str(e) if isinstance(e, Unreadable) else f"{type(e).__name__}: {e.strerror or e}"
        problem = f"{path} (unreadable after line {i}: {why})"
        if whole:
            raise UserError(f"prepare: {problem}; the file must be read whole") from None
        skipped.append(problem)


# --- where the output goes ----------------------------------------------------------------------


def check_output(out: Path, inputs: list[Path], *, overwrite: bool) -> None:
    """Refuse an `--out` that writing (or replacing) would harm, in one line each."""
    _check_location(out)
    target = out.resolve()
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise UserError(
            f"prepare: --out '{out}' is the current directory or holds it; give a new folder"
        )
    for p in inputs:
        if target == p.resolve() or target in p.resolve().parents:
            raise UserError(
                f"prepare: --out '{out}' holds the input '{p}'; give a folder outside the inputs"
            )
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(
            f"prepare: output '{out}' already exists and is not empty; choose another --out "
            "or pass --overwrite"
        )
    foreign = _not_written_by_prepare(out)
    if foreign is not None:
        raise UserError(
            f"prepare --overwrite: '{out}' holds {foreign}, which prepare did not write; "
            "--overwrite only replaces an earlier prepare output: choose another --out"
        )


def _check_location(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"prepare: --out '{out}' is a file; give a folder")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise UserError(f"prepare: --out '{out}' is under the file '{existing}'; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"prepare: cannot write in '{existing}' (permission denied)")


def _not_written_by_prepare(out: Path) -> str | None:
    """The first thing in `out` that a `prepare` would not have written (None: all of it)."""
    if not (out / MANIFEST).is_file():
        return f"no {MANIFEST}"
    splits = {*SPLITS, *_manifest_splits(out / MANIFEST)}
    for entry in sorted(out.iterdir()):
        if entry.name in (MANIFEST, LABELS_FILE) or (
            entry.is_file() and _SHARD.fullmatch(entry.name)
        ):
            continue
        if entry.is_dir() and entry.name in splits:
            stray = next((e for e in sorted(entry.iterdir()) if not _SHARD.fullmatch(e.name)), None)
            if stray is None:
                continue
            entry = stray
        return f"'{entry}'"
    return None


def _manifest_splits(manifest: Path) -> list[str]:
    """The split folders an earlier prepare's manifest says it wrote."""
    try:
        rows = json.loads(manifest.read_text(encoding="utf-8")).get("rows", {})
    except (OSError, ValueError, AttributeError):
        return []
    return (
        [s for s in rows if isinstance(s, str) and _SPLIT_NAME.fullmatch(s)]
        if isinstance(rows, dict)
        else []
    )


# --- writing ------------------------------------------------------------------------------------


def write_split(
    directory: Path, rows: dict[str, list], shard_rows: int, metadata: dict | None = None
) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(rows.values())))
    for i, start in enumerate(range(0, max(n, 1), shard_rows)):
        part = pa.table({k: v[start : start + shard_rows] for k, v in rows.items()})
        if metadata:
            part = part.replace_schema_metadata(metadata)
        pq.write_table(part, directory / f"part-{i:05d}.parquet")
    return n


def write_output(
    out: Path,
    splits: dict[str, dict[str, list]],
    manifest: dict,
    *,
    shard_rows: int,
    labels: tuple[str, str] | None = None,
):
    """Write each split ("" = `out` itself) and the manifest, all at once: the old output,
    if any, is replaced only when the new one is complete. `labels` (digest, labels.json
    text): the label map, written as labels.json and stamped into every shard's footer.
    Returns the rows per split."""
    metadata = {FOOTER_KEY: labels[0].encode()} if labels else None
    try:
        with atomic_directory(out) as tmp:
            counts = {
                s: write_split(tmp / s if s else tmp, r, shard_rows, metadata)
                for s, r in splits.items()
            }
            if labels:
                (tmp / LABELS_FILE).write_text(labels[1], encoding="utf-8")
            (tmp / MANIFEST).write_text(json.dumps({**manifest, "rows": counts}, indent=2))
    except OSError as e:
        raise UserError(f"prepare: cannot write '{out}' ({e.strerror or e}); check --out") from None
    return counts
