"""Finding Parquet shards and checking them before anything starts."""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path

import pyarrow.parquet as pq

from raypipe.errors import UserError

_GLOB_CHARS = set("*?[")


def resolve_parquet_files(path: str, *, key: str) -> list[str]:
    """A file, a directory (searched recursively for *.parquet) or a glob -> sorted file list.

    `key` is the config key the path came from, named in errors.
    """
    if _GLOB_CHARS & set(path):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise UserError(f"{key}: no files match '{path}'; check the pattern")
        return [os.path.abspath(f) for f in files]
    p = Path(path)
    if not p.exists():
        raise UserError(
            f"{key}: data path '{path}' does not exist; fix the path or create the data"
        )
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*.parquet") if f.is_file())
        if not files:
            raise UserError(f"{key}: directory '{path}' holds no .parquet files")
        return [os.path.abspath(f) for f in files]
    return [str(p.resolve())]


def check_columns(files: list[str], columns: list[str], *, key: str) -> None:
    """Every shard must be readable Parquet holding `columns`; name the offending file."""
    for f in files:
        try:
            schema = pq.read_schema(f)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise UserError(f"{key}: '{f}' is not a readable Parquet file ({e})") from None
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise UserError(
                f"{key}: column(s) {missing} not in '{f}'; columns present: {schema.names}. "
                "Set the column name in the config"
            )


def manifest_digest(files: list[str]) -> str:
    """A cheap identity of the input data: paths, sizes and modification times."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def read_column_sample(files: list[str], column: str, max_rows: int) -> list[str]:
    """Up to `max_rows` values of a text column, read shard by shard (for tokenizer training)."""
    out: list[str] = []
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=8192, columns=[column]):
            out.extend(s for s in batch.column(0).to_pylist() if s)
            if len(out) >= max_rows:
                return out[:max_rows]
    return out
