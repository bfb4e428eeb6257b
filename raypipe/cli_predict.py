"""`raypipe predict MODEL_URI DATA --out DIR`: the command line of batch inference
(raypipe/predict.py)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

TRACKING_HELP = (
    "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the local store "
    "./raypipe-runs/mlflow.db)"
)
NO_STORE = (
    "no tracking store: pass --tracking-uri (e.g. sqlite:///PATH/raypipe-runs/mlflow.db, as "
    "the run's summary printed) or set MLFLOW_TRACKING_URI"
)


def tracking_uri(given: str | None) -> str | None:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the local store `raypipe run` writes in
    this folder; None if there is none."""
    uri = given or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        local = Path("raypipe-runs") / "mlflow.db"
        uri = f"sqlite:///{local.resolve()}" if local.is_file() else None
    return uri


def add_predict(sub) -> None:
    pred = sub.add_parser(
        "predict",
        help="predict with a registered model on Parquet, CSV or JSON-lines rows",
        description="Batch inference through Ray Data: each row's prediction (label and "
        "probabilities, a value, or a translation) written as Parquet beside the row's other "
        "columns. E.g. raypipe predict models:/quickstart@champion data/new.parquet --out preds",
    )
    pred.add_argument("model_uri", help="e.g. models:/NAME@champion or models:/NAME/VERSION")
    pred.add_argument("data", help="a Parquet, CSV or .jsonl file, a folder of them, or a glob; "
                      "or Parquet in an object store (s3://bucket/prefix)")  # fmt: skip
    pred.add_argument("--out", required=True,
                      help="a new (or empty) folder, or object-store prefix, for the predictions")  # fmt: skip
    pred.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    pred.add_argument("--keep", default=None, metavar="COL,COL",
                      help="the row columns written beside the predictions (default: all but "
                      "the model's input)")  # fmt: skip
    pred.add_argument("--batch-size", type=int, default=256, help="rows per model call")
    pred.add_argument("--workers", type=int, default=1, help="most model actors at once")
    pred.add_argument("--gpu", action="store_true", help="one GPU per model actor")
    pred.add_argument("--address", default=None,
                      help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")  # fmt: skip
    pred.add_argument("--verbose", action="store_true", help="show Ray's log lines")


def run_predict_cmd(args: argparse.Namespace, error) -> int:
    from raypipe.errors import UserError, find_user_error
    from raypipe.predict import run_predict

    uri = tracking_uri(args.tracking_uri)
    if uri is None:
        return error(NO_STORE)
    if args.batch_size < 1 or args.workers < 1:
        return error("--batch-size and --workers must be at least 1")
    from raypipe.tracking import check_uri

    try:
        check_uri(uri, key="--tracking-uri", must_exist=True)
    except UserError as e:
        return error(str(e))
    keep = [c.strip() for c in args.keep.split(",") if c.strip()] if args.keep else None
    try:
        outcome = run_predict(
            args.model_uri, args.data, args.out, tracking_uri=uri, batch_size=args.batch_size,
            gpu=args.gpu, workers=args.workers, keep=keep,
            address=args.address or os.environ.get("RAY_ADDRESS"), verbose=args.verbose,
        )  # fmt: skip
    except UserError as e:
        return error(str(e))
    except Exception as e:
        user = find_user_error(e)
        if user is None:
            raise
        return error(str(user))
    print(f"raypipe: {outcome.rows} predictions in {outcome.out} ({', '.join(outcome.columns)})")
    return 0
