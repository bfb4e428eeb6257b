"""Batch inference throughput: `raypipe predict` (Ray Data, one model actor) against a plain loop
over the same registered model, the same rows, the same encoding and batch size.

The rows are the DATA Parquet's, repeated to `--rows` (written once to a temporary folder). Each
pair times, interleaved, in this one process with one Ray already up (its start is not counted,
as a cluster's is not):
  - raypipe: `run_predict` end to end: reading, the actor's model download and load, encoding,
    the model, writing Parquet;
  - plain: the model loaded with raypipe's loader, then pyarrow reads, the same encoding
    (`RowPredictor`), the model, one Parquet file written, all in this process.
Prints the median and range of the rows/s ratio (raypipe / plain) over `--pairs` pairs.

    python bench/predict_speed.py models:/quickstart@champion data/quickstart/validation \\
        --tracking-uri sqlite:///$PWD/raypipe-runs/mlflow.db [--rows 20000] [--pairs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raypipe.predict import load_registered, run_predict  # noqa: E402
from raypipe.predict_rows import RowPredictor  # noqa: E402


def repeated(data: str, rows: int, into: Path) -> Path:
    table = pq.read_table(data)
    copies = -(-rows // table.num_rows)
    big = pa.concat_tables([table] * copies).slice(0, rows)
    for i, start in enumerate(range(0, rows, max(rows // 8, 1))):  # 8 shards, like real data
        pq.write_table(big.slice(start, max(rows // 8, 1)), into / f"part-{i:03d}.parquet")
    return into


def plain(model_uri: str, tracking_uri: str, data: Path, out: Path, batch_size: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model, card, tokenizer_json = load_registered(model_uri, tracking_uri, tmp)
        predictor = RowPredictor(model, card, tokenizer_json)
        parts, rows = [], 0
        for f in sorted(data.glob("*.parquet")):
            table = pq.read_table(f)
            for batch in table.to_batches(max_chunksize=batch_size):
                cols = {
                    c: batch.column(c).to_numpy(zero_copy_only=False) for c in batch.schema.names
                }
                got = predictor(cols)
                parts.append(pa.table({"label": cols["label"], "prediction": got["prediction"],
                                       "probabilities": [p.tolist() for p in got["probabilities"]]}))  # fmt: skip
                rows += batch.num_rows
        pq.write_table(pa.concat_tables(parts), out / "plain.parquet")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_uri")
    ap.add_argument("data")
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    import ray

    ray.init(address="local", logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        data = repeated(args.data, args.rows, Path(tmp))
        ratios, rates = [], {"raypipe": [], "plain": []}
        for i in range(args.pairs):
            with tempfile.TemporaryDirectory() as o1, tempfile.TemporaryDirectory() as o2:
                t = time.perf_counter()
                n = run_predict(args.model_uri, str(data), f"{o1}/out", tracking_uri=args.tracking_uri,
                                batch_size=args.batch_size).rows  # fmt: skip
                r = n / (time.perf_counter() - t)
                t = time.perf_counter()
                m = plain(args.model_uri, args.tracking_uri, data, Path(o2), args.batch_size)
                p = m / (time.perf_counter() - t)
            assert n == m == args.rows
            rates["raypipe"].append(r)
            rates["plain"].append(p)
            ratios.append(r / p)
            print(
                f"pair {i + 1}: raypipe {r:,.0f} rows/s, plain {p:,.0f} rows/s, ratio {r / p:.3f}"
            )
    for k, v in rates.items():
        print(f"{k}: median {statistics.median(v):,.0f} rows/s (range {min(v):,.0f}-{max(v):,.0f})")
    print(f"ratio raypipe/plain: median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)} pairs, {args.rows} rows)")  # fmt: skip


if __name__ == "__main__":
    main()
