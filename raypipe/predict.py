"""`raypipe predict MODEL_URI DATA --out DIR`: batch inference with a registered model over
Parquet (or CSV / JSON lines) through Ray Data, an actor pool holding the model (a GPU each when
asked), predictions written as Parquet beside the rows' other columns.

Everything a user can get wrong (the model, the data, its columns, the output folder) is
checked on the driver before Ray starts; nothing already in `--out` is ever replaced.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from raypipe import storage
from raypipe.data.files import resolve_parquet_files
from raypipe.errors import UserError
from raypipe.predict_rows import RowPredictor, output_columns, read_card
from raypipe.progress import console

#: Input files by suffix -> the Ray Data reader that reads them.
READERS = {".parquet": "read_parquet", ".csv": "read_csv", ".jsonl": "read_json",
           ".json": "read_json"}  # fmt: skip


@dataclass(frozen=True)
class PredictOutcome:
    rows: int
    out: str
    columns: list[str]


def load_registered(model_uri: str, tracking_uri: str | None, into: str):
    """The registered model at `model_uri` downloaded into `into`: (graph, card, tokenizer)."""
    import mlflow

    from raypipe.registered import check_model_folder, global_store, refuse_pickles

    refuse_pickles()
    try:
        with global_store(tracking_uri):
            local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=into))
    except Exception as e:  # noqa: BLE001 - MLflow raises many kinds for "not there"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load model '{model_uri}' ({first}); check the name, version or alias "
            "and --tracking-uri"
        ) from None
    check_model_folder(local, model_uri)
    card, tokenizer_json = read_card(local, model_uri)
    return mlflow.pytorch.load_model(str(local)), card, tokenizer_json


class _Actor:
    """One Ray Data actor: downloads the model once (a node of a cluster may not see the
    driver's disk), then predicts each block it is given, `batch_size` rows at a time.

    It takes whole blocks, not Ray Data's batches: Ray Data 2.60 returns the batches it cuts
    from a block in the order they finish, even with `preserve_order`, which puts rows out of
    order; whole blocks keep it."""

    def __init__(self, model_uri: str, tracking_uri: str | None, device: str, keep: list[str],
                 threads: int, batch_size: int):  # fmt: skip
        import torch

        # Ray gives a 1-CPU actor one torch thread; the model is most of the work, so it gets
        # its share of the node's cores (reading and writing are light beside it).
        torch.set_num_threads(threads)
        self._dir = tempfile.TemporaryDirectory(prefix="raypipe-predict-")  # gone with the actor
        model, card, tokenizer_json = load_registered(model_uri, tracking_uri, self._dir.name)
        self.predictor = RowPredictor(model.to(device), card, tokenizer_json, device)
        self.keep, self.batch_size = keep, batch_size

    def __call__(self, block):
        import pyarrow as pa

        rows = len(next(iter(block.values()))) if block else 0
        parts = [self._predict({k: v[i : i + self.batch_size] for k, v in block.items()})
                 for i in range(0, rows, self.batch_size)]  # fmt: skip
        return pa.concat_tables(parts) if parts else self._predict(block)

    def _predict(self, batch):
        import pyarrow as pa

        columns = {k: pa.array(batch[k]) for k in self.keep}
        for name, values in self.predictor(batch).items():
            # Probabilities as a plain list<float> column, not Ray's tensor extension type.
            columns[name] = pa.array([v.tolist() for v in values] if _rows(values) else values)
        return pa.table(columns)


def _rows(values) -> bool:
    return isinstance(values, list) or getattr(values, "ndim", 1) > 1


def input_files(data: str) -> tuple[str, list[str]]:
    """(reader, files) for DATA: a file, a folder of one kind of file, or a glob; in an object
    store (`s3://…`), Parquet."""
    import glob

    if storage.is_remote(data):
        files = resolve_parquet_files(data, key="DATA")
        if any(Path(f).suffix != ".parquet" for f in files):
            raise UserError(f"DATA: '{data}': from an object store, predict reads .parquet "
                            "files only; convert it, or copy it here first")  # fmt: skip
        return "read_parquet", files
    if any(ch in data for ch in "*?["):
        files = sorted(p for p in glob.glob(data, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(data):
        files = sorted(str(p) for p in Path(data).rglob("*") if p.suffix in READERS)
    elif os.path.isfile(data):
        files = [data]
    else:
        raise UserError(f"DATA: '{data}' does not exist; give a Parquet file, folder or glob")
    kinds = {Path(f).suffix for f in files if Path(f).suffix in READERS}
    if not files or not kinds:
        raise UserError(f"DATA: '{data}' holds no .parquet, .csv or .jsonl files")
    if len(kinds) > 1:
        raise UserError(f"DATA: '{data}' mixes {sorted(kinds)} files; give one kind")
    (suffix,) = kinds
    return READERS[suffix], [os.path.abspath(f) for f in files if Path(f).suffix == suffix]


def check_out(out: str) -> None:
    """`--out` must be new or an empty folder (local, or a prefix in an object store):
    predictions never replace files."""
    if storage.is_remote(out):
        try:
            taken = storage.exists(out) and (storage.is_file(out) or storage.list_files(out))
        except OSError as e:  # a bucket that does not exist, or no credentials
            raise UserError(f"--out: cannot use '{out}' ({e}); check the path and "
                            "credentials (nothing was written)") from None  # fmt: skip
        if taken:
            raise UserError(f"--out: '{out}' already holds files; give a new prefix (nothing "
                            "was written)")  # fmt: skip
        return
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise UserError(
            f"--out: '{out}' already holds files; give a new folder (nothing was written)"
        )


def kept_columns(schema_names: list[str], card, keep: list[str] | None) -> list[str]:
    """The row columns written beside the predictions: `keep`, else every column but the
    model's input."""
    clash = sorted(set(output_columns(card)) & set(keep or schema_names))
    missing = sorted({card.column, *(keep or [])} - set(schema_names))
    if missing:
        raise UserError(
            f"DATA has no column {', '.join(map(repr, missing))} (it has {schema_names}); "
            f"the model reads '{card.column}'"
            + ("; fix --keep" if keep and set(missing) - {card.column} else "")
        )
    if clash and keep:
        raise UserError(f"--keep {clash}: predictions are written under those names")
    return list(keep) if keep else [c for c in schema_names if c != card.column and c not in clash]


def column_names(reader: str, first: str) -> list[str]:
    """The columns of DATA's first file, read on the driver (no Ray)."""
    import pyarrow.parquet as pq
    from pyarrow import csv, json

    try:
        if reader == "read_parquet":
            fs, path = storage.resolve(first)
            return list(pq.read_schema(path, filesystem=fs).names)
        if reader == "read_csv":
            with csv.open_csv(first) as f:
                return list(f.schema.names)
        return list(json.read_json(first).schema.names)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for an unreadable file vary
        raise UserError(f"DATA: cannot read '{first}' ({str(e).splitlines()[0]})") from None


def run_predict(
    model_uri: str, data: str, out: str, *, tracking_uri: str | None, batch_size: int = 256,
    gpu: bool = False, workers: int = 1, keep: list[str] | None = None,
    address: str | None = None, verbose: bool = False,
) -> PredictOutcome:  # fmt: skip
    """Predict on every row of `data` with the model at `model_uri`, into `out` (Parquet)."""
    check_out(out)
    reader, files = input_files(data)
    with tempfile.TemporaryDirectory(prefix="raypipe-") as tmp:
        _, card, _ = load_registered(model_uri, tracking_uri, tmp)  # fails before Ray starts
    keep = kept_columns(column_names(reader, files[0]), card, keep)
    import ray

    from raypipe import localray

    started = not ray.is_initialized()
    if started:
        localray.init(address, verbose=verbose)
    try:
        ds = getattr(ray.data, reader)(files)
        ds.context.execution_options.preserve_order = True  # rows out in the order read
        ds.context.raise_original_map_exception = True  # a UserError in a batch stays one
        console.line(f"[predict] {model_uri} ({card.task}) on {len(files)} file(s) -> {out}")
        ds = ds.map_batches(
            _Actor, batch_size=None, batch_format="numpy", concurrency=(1, workers),
            num_gpus=1 if gpu else 0,
            fn_constructor_kwargs={"model_uri": model_uri, "tracking_uri": tracking_uri,
                                   "device": "cuda" if gpu else "cpu", "keep": keep,
                                   "threads": _threads(workers), "batch_size": batch_size},
        )  # fmt: skip
        ds.write_parquet(out)
    finally:
        if started:
            ray.shutdown()
    return _written(out, keep + list(output_columns(card)))


def _threads(workers: int) -> int:
    """Torch threads per model actor: the cores of a node shared by the actors a node may hold
    (this machine's count stands for a node's)."""
    return max(1, (os.cpu_count() or 1) // workers)


def _written(out: str, columns: list[str]) -> PredictOutcome:
    import pyarrow.parquet as pq

    rows = 0
    for f in storage.list_files(out, "*.parquet"):
        fs, path = storage.resolve(f)
        with fs.open_input_file(path) as handle:
            rows += pq.read_metadata(handle).num_rows
    return PredictOutcome(rows=rows, out=out, columns=columns)
