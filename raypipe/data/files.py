"""Finding Parquet shards and checking them before anything starts (local paths or URIs)."""

from __future__ import annotations

import glob
import hashlib
import os

import pyarrow.parquet as pq

from raypipe import storage
from raypipe.errors import UserError

_GLOB_CHARS = set("*?[")


def resolve_parquet_files(path: str, *, key: str) -> list[str]:
    """A file, a directory (searched recursively for *.parquet) or a glob -> sorted file list.
    Local paths come back absolute; `s3://…` and other object-store URIs stay URIs.

    `key` is the config key the path came from, named in errors.
    """
    remote = storage.is_remote(path)
    if _GLOB_CHARS & set(path):
        if remote:
            files = storage.glob_remote(path)
        else:
            files = [os.path.abspath(p) for p in glob.glob(path, recursive=True)]
            files = sorted(p for p in files if os.path.isfile(p))
        if not files:
            raise UserError(f"{key}: no files match '{path}'; check the pattern")
        return files
    try:
        found = storage.exists(path)
    except OSError as e:  # e.g. a bucket that does not exist, or no credentials
        raise UserError(
            f"{key}: cannot read '{path}' ({e}); check the path and credentials"
        ) from None
    if not found:
        raise UserError(
            f"{key}: data path '{path}' does not exist; fix the path or create the data"
        )
    if storage.is_dir(path):
        files = storage.list_files(path, "*.parquet")
        if not files:
            raise UserError(f"{key}: directory '{path}' holds no .parquet files")
        return files
    return [storage.normalize(path)]


def check_columns(files: list[str], columns: list[str], *, key: str) -> None:
    """Every shard must be readable Parquet holding `columns`; name the offending file."""
    for f in files:
        try:
            fs, path = storage.resolve(f)
            schema = pq.read_schema(path, filesystem=fs)
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
        h.update(f"{f}\0{storage.file_stamp(f)}\n".encode())
    return h.hexdigest()


def read_column_sample(files: list[str], column: str, max_rows: int) -> list[str]:
    """Up to `max_rows` values of a text column, read shard by shard (for tokenizer training)."""
    out: list[str] = []
    for f in files:
        with storage.open_input_file(f) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=8192, columns=[column]):
                out.extend(s for s in batch.column(0).to_pylist() if s)
                if len(out) >= max_rows:
                    return out[:max_rows]
    return out
