"""Finding Parquet shards and checking them before anything starts (local paths or URIs)."""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raypipe import storage
from raypipe.errors import UserError

_GLOB_CHARS = set("*?[")


def resolve_parquet_files(path: str | list[str], *, key: str) -> list[str]:
    """A file, a directory (searched recursively for *.parquet) or a glob -> sorted file list;
    a list of those -> their files in the order listed, each file once. Local paths come back
    absolute; `s3://…` and other object-store URIs stay URIs.

    `key` is the config key the path came from, named in errors.
    """
    if not isinstance(path, str):
        return all_files(resolve_sources(path, key=key))
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


def resolve_sources(path: str | list[str], *, key: str) -> list[tuple[str, list[str]]]:
    """Each location `path` names (one, or each of a list) with its files, as
    `resolve_parquet_files` finds them."""
    if isinstance(path, str):
        return [(path, resolve_parquet_files(path, key=key))]
    return [(one, resolve_parquet_files(one, key=f"{key}[{i}]")) for i, one in enumerate(path)]


def all_files(sources: list[tuple[str, list[str]]]) -> list[str]:
    """The files of `resolve_sources`, in the order listed, each once."""
    return list(dict.fromkeys(f for _, files in sources for f in files))


def check_columns(files: list[str], columns: list[str], *, key: str, source=None) -> None:
    """Every shard must be readable Parquet holding `columns` (of the types `source`, the
    config's description of the data, implies); name the offending file."""
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
        for column in columns:
            _check_type(schema.field(column), source, key=key, where=f)


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _is_image(kind: pa.DataType, nested: bool = False) -> bool:
    """Encoded bytes, or uint8 arrays (nested lists, or a fixed-shape tensor extension)."""
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _is_image(kind.value_type, nested=True)
    storage_type = getattr(kind, "storage_type", None)  # Ray's / Arrow's tensor extensions
    if storage_type is not None:
        return _is_image(storage_type, nested=True)
    if pa.types.is_struct(kind) and kind.get_field_index("data") >= 0:  # variable-shaped tensors
        return _is_image(kind.field("data").type, nested=True)
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return not nested
    return nested and pa.types.is_integer(kind)


def _check_type(field: pa.Field, source, *, key: str, where: str) -> None:
    """A text column holds strings and an image column bytes or arrays: named before any
    stage runs, not as a failure deep inside a Ray Data task."""
    if source is None:
        return
    texts = {getattr(source, n, None) for n in ("text_column", "target_column")}
    if field.name == getattr(source, "image_column", None) and not _is_image(field.type):
        raise UserError(
            f"{key}.image_column: '{field.name}' in '{where}' holds {field.type}, not encoded "
            "images (bytes) or uint8 arrays; `raypipe prepare images` writes them"
        )
    if field.name in texts and field.name != getattr(source, "image_column", None):
        if not _is_text(field.type):
            raise UserError(
                f"{key}: column '{field.name}' in '{where}' holds {field.type}, not text; set "
                "the text column to one that holds strings"
            )


def check_not_empty(files: list[str], *, key: str) -> int:
    """The rows over `files`, from their footers; none at all is an error naming the key."""
    rows = 0
    for f in files:
        fs, path = storage.resolve(f)
        rows += pq.read_metadata(path, filesystem=fs).num_rows
    if rows == 0:
        raise UserError(f"{key}: its {len(files)} Parquet file(s) hold no rows; give data")
    return rows


def label_maps(files: list[str]) -> dict[str, str]:
    """{label-map digest: the first file carrying it} from the shards' footers, for shards
    `raypipe prepare` numbered (others carry none)."""
    from raypipe.data.labels import FOOTER_KEY

    found: dict[str, str] = {}
    for f in files:
        fs, path = storage.resolve(f)
        digest = (pq.read_schema(path, filesystem=fs).metadata or {}).get(FOOTER_KEY)
        if digest is not None:
            found.setdefault(digest.decode(errors="replace"), f)
    return found


def label_names(files: list[str]) -> list[str] | None:
    """Each class id's name, for shards `prepare` numbered by names: its labels.json (in the
    shards' folder, or the one above a split's) whose digest their footers carry. None for
    labels kept as integers, shards not prepared (or by several maps), or no such file."""
    from raypipe.data.labels import IDENTITY, LABELS_FILE, LabelMap

    found = label_maps(files)
    if len(found) != 1 or IDENTITY in found:
        return None
    ((digest, first),) = found.items()
    folder = first.rsplit("/", 1)[0]
    for place in (folder, folder.rsplit("/", 1)[0]):
        path = storage.join(place, LABELS_FILE)
        try:
            ids = json.loads(storage.read_text(path))["ids"] if storage.is_file(path) else None
        except (OSError, ValueError, KeyError, TypeError):
            ids = None
        if isinstance(ids, dict) and LabelMap(ids).digest == digest:
            return LabelMap(ids).names()
    return None


def check_one_label_map(splits: dict[str, list[str]], *, key: str) -> None:
    """Every labeled split's labels numbered by one label map (as `prepare` stamped them)."""
    seen: list[tuple[str, str, str]] = []  # (split, digest, file)
    for split, files in splits.items():
        seen += [(split, d, f) for d, f in label_maps(files).items()]
    if len({d for _, d, _ in seen}) > 1:
        (s1, d1, f1), (s2, d2, f2) = seen[0], next(x for x in seen if x[1] != seen[0][1])
        raise UserError(
            f"{key}.{s2}: its labels were numbered by another label map than {key}.{s1} "
            f"('{f2}': {d2}; '{f1}': {d1}), so the same id means different classes; prepare "
            "every split with one map (`raypipe prepare table ... --labels "
            "FIRST_OUT/labels.json`, or all splits in one call with --split)"
        )


def manifest_digest(files: list[str]) -> str:
    """A cheap identity of the input data: paths, sizes and modification times."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f}\0{storage.file_stamp(f)}\n".encode())
    return h.hexdigest()


def footprint(files: list[str], columns: list[str]) -> tuple[int, int]:
    """(rows, uncompressed bytes of `columns`) over the shards, from their Parquet footers."""
    rows, size = 0, 0
    for f in files:
        fs, path = storage.resolve(f)
        meta = pq.read_metadata(path, filesystem=fs)
        schema = meta.schema.to_arrow_schema()
        indices = [schema.get_field_index(c) for c in columns]
        rows += meta.num_rows
        size += sum(
            meta.row_group(rg).column(i).total_uncompressed_size
            for rg in range(meta.num_row_groups)
            for i in indices
        )
    return rows, size


def read_blocks(
    files: list[str], columns: list[str], *, rows_per_block: int, max_rows: int | None = None
) -> list[pa.Table]:
    """`columns` of the shards' rows in order (the first `max_rows` only, if set), as tables of
    at most `rows_per_block` rows each, each with buffers of its own."""
    out: list[pa.Table] = []
    left = max_rows
    for f in files:
        with storage.open_input_file(f) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(
                batch_size=rows_per_block, columns=columns
            ):
                if left is not None:
                    batch = batch.slice(0, left)
                    left -= batch.num_rows
                if batch.num_rows:
                    out.append(pa.Table.from_batches([batch]))
                if left == 0:
                    return out
    return out


def read_column_sample(files: list[str], column: str, max_rows: int) -> list[str]:
    """Up to `max_rows` non-empty values of a text column, drawn across all `files`: each
    shard gives the rows from its start in proportion to its size (from the footers), so a
    tokenizer trained on the sample sees every listed source, not only the first ones."""
    sizes = [_num_rows(f) for f in files]
    total = sum(sizes)
    out: list[str] = []
    for f, size in zip(files, sizes, strict=True):
        quota = size if total <= max_rows else math.ceil(max_rows * size / total)
        out += _first_values(f, column, quota)
    return out[:max_rows]


def _num_rows(f: str) -> int:
    fs, path = storage.resolve(f)
    return pq.read_metadata(path, filesystem=fs).num_rows


def _first_values(f: str, column: str, quota: int) -> list[str]:
    out: list[str] = []
    if quota <= 0:
        return out
    with storage.open_input_file(f) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=8192, columns=[column]):
            out.extend(s for s in batch.column(0).to_pylist() if s)
            if len(out) >= quota:
                return out[:quota]
    return out


def _column_facts(meta, fs, path: str, column: str, *, want_range: bool):
    """(null count, min, max) of a column from the row-group statistics in the footer; the
    column itself is read only when a writer left the statistics out."""
    idx = meta.schema.to_arrow_schema().get_field_index(column)
    nulls, lo, hi = 0, None, None
    for rg in range(meta.num_row_groups):
        stats = meta.row_group(rg).column(idx).statistics
        if stats is None or not stats.has_null_count or (want_range and not stats.has_min_max):
            values = pq.read_table(path, columns=[column], filesystem=fs).column(0)
            bounds = pc.min_max(values) if want_range else None
            lo_hi = (bounds["min"].as_py(), bounds["max"].as_py()) if bounds else (None, None)
            return values.null_count, *lo_hi
        nulls += stats.null_count
        if want_range and stats.num_values:
            lo = stats.min if lo is None else min(lo, stats.min)
            hi = stats.max if hi is None else max(hi, stats.max)
    return nulls, lo, hi


def check_values(
    files: list[str],
    columns: list[str],
    *,
    key: str,
    label_column: str | None = None,
    label_dtype: str | None = None,
    num_classes: int | None = None,
) -> None:
    """No nulls in `columns`; labels of the right type and, for classes, in [0, num_classes).

    Read from the Parquet footers (statistics), so it costs no data scan on shards written
    with statistics (pyarrow's default).
    """
    lo_all, hi_all = None, None
    for f in files:
        fs, path = storage.resolve(f)
        meta = pq.read_metadata(path, filesystem=fs)
        schema = meta.schema.to_arrow_schema()
        if label_column is not None:
            kind = schema.field(label_column).type
            integer = pa.types.is_integer(kind)
            if label_dtype == "int64" and not integer:
                raise UserError(
                    f"{key}.label_column: '{label_column}' in '{f}' holds {kind}, not integer "
                    "class labels; `raypipe prepare table` maps string labels to integers"
                )
            if not (integer or pa.types.is_floating(kind)):
                raise UserError(
                    f"{key}.label_column: '{label_column}' in '{f}' holds {kind}, not numbers; "
                    "store numeric targets"
                )
        for column in columns:
            ranged = column == label_column and label_dtype == "int64" and num_classes is not None
            nulls, lo, hi = _column_facts(meta, fs, path, column, want_range=ranged)
            if nulls:
                raise UserError(
                    f"{key}: column '{column}' has {nulls} null value(s) in '{f}'; drop or "
                    "fill those rows"
                )
            if ranged and lo is not None:
                lo_all = lo if lo_all is None else min(lo_all, lo)
                hi_all = hi if hi_all is None else max(hi_all, hi)
    if num_classes is not None and lo_all is not None and (lo_all < 0 or hi_all >= num_classes):
        raise UserError(
            f"{key}: labels range over [{lo_all}, {hi_all}] but finetune.num_classes is "
            f"{num_classes}; labels must be integers in [0, num_classes)"
        )


def label_subset(
    files: list[str],
    *,
    fraction: float,
    seed: int,
    stratify_by: str | None,
    out: str,
    max_rows: int | None = None,
) -> list[str]:
    """A seeded `fraction` of the rows of `files`, written as one Parquet shard in `out` (a
    path or URI); returns [its location]. With `stratify_by` (a class label column) each
    class keeps its share, and at least one row. Rows keep their order. The same inputs
    give the same subset, so every arm of a sweep trains on the same rows. `max_rows` first
    keeps only the first rows, as the data source's `max_rows` does."""
    import io

    import numpy as np

    tables = []
    for f in files:
        fs, path = storage.resolve(f)
        tables.append(pq.read_table(path, filesystem=fs))
    table = pa.concat_tables(tables, promote_options="default")
    if max_rows:
        table = table.slice(0, max_rows)
    rng = np.random.default_rng(seed)
    if stratify_by is None:
        groups = [np.arange(table.num_rows)]
    else:
        labels = table.column(stratify_by).to_numpy(zero_copy_only=False)
        groups = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    chosen = np.sort(
        np.concatenate(
            [rng.choice(g, size=max(1, round(fraction * len(g))), replace=False) for g in groups]
        )
    )
    buffer = io.BytesIO()
    pq.write_table(table.take(chosen), buffer)
    location = storage.join(out, "part-00000.parquet")
    storage.write_bytes(location, buffer.getvalue())
    return [location]
