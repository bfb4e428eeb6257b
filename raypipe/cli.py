"""`raypipe run | validate | prepare | report`: the command-line face. Imports nothing heavy
until it must."""

from __future__ import annotations

import argparse
import os
import sys

from raypipe.errors import UserError, find_user_error
from raypipe.progress import console
from raypipe.redaction import redact
from raypipe.registered import refuse_pickles

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raypipe",
        description="Pretrain on unlabeled data, then sweep fine-tuning on labeled data, "
        "from one YAML file.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    overrides = argparse.ArgumentParser(add_help=False)
    overrides.add_argument("pipeline", help="pipeline YAML file")
    overrides.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config value (repeatable), e.g. --set pretrain.max_steps=50",
    )
    run = sub.add_parser("run", parents=[overrides], help="run a pipeline")
    run.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)",
    )
    run.add_argument(
        "--verbose", action="store_true", help="show every Ray log line, not only progress"
    )
    sub.add_parser(
        "validate", parents=[overrides], help="check a pipeline file and its data; start nothing"
    )
    rep = sub.add_parser(
        "report",
        help="print a finished pipeline run's summary from MLflow",
        description="Print the summary `raypipe run` ended with, read back from MLflow.",
    )
    rep.add_argument("run_id", help="the pipeline run's id (the summary's `mlflow run` line)")
    rep.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the local store "
        "./raypipe-runs/mlflow.db)",
    )
    _add_prepare(sub)
    return parser


def _add_prepare(sub) -> None:
    """`raypipe prepare`: raw files to Parquet shards."""
    prep = sub.add_parser(
        "prepare",
        help="turn raw files into Parquet shards",
        description="Kinds: text FILES/DIRS (a row per line, paragraph or file); table FILE "
        "(TSV/CSV/JSONL with text and label); images DIR|ZIP (class = parent folder); "
        "captions IMAGES_DIR CAPTIONS_FILE; parallel SOURCE TARGET (line-aligned). "
        "Files may be gzipped.",
    )
    prep.add_argument("kind", choices=["text", "table", "images", "captions", "parallel"])
    prep.add_argument("inputs", nargs="+", help="input files or folders")
    prep.add_argument("--out", required=True, help="output folder for the shards")
    prep.add_argument(
        "--unit",
        choices=["line", "paragraph", "file"],
        default="line",
        help="text: one row per line, blank-line paragraph, or file",
    )
    prep.add_argument("--text-column", default="sentence", help="table: the text column")
    prep.add_argument("--label-column", default="label", help="table: the label column")
    prep.add_argument(
        "--format",
        choices=["auto", "tsv", "csv", "jsonl"],
        default="auto",
        help="table: file format (auto: from the extension)",
    )
    prep.add_argument(
        "--regression", action="store_true", help="table: labels are numbers, not classes"
    )
    prep.add_argument(
        "--validation-fraction",
        type=float,
        default=0.0,
        help="hold out this fraction (by image for captions) into OUT/validation",
    )
    prep.add_argument("--shard-rows", type=int, default=None, help="rows per Parquet shard")
    prep.add_argument("--seed", type=int, default=0, help="seed of the shuffle and the split")
    order = prep.add_mutually_exclusive_group()
    order.add_argument(
        "--shuffle",
        action="store_true",
        help="text, parallel: shuffle rows (seeded); for corpora of independent lines, e.g. "
        "several languages one after the other",
    )
    order.add_argument(
        "--keep-order",
        action="store_true",
        help="table, images, captions: keep input order (default: seeded shuffle)",
    )
    prep.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _quiet_driver() -> None:
    """Keep the console to raypipe's own progress and summary (this process only)."""
    import logging

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Tune's legacy reporter honours verbose=0; the new one prints its tables regardless.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray.data", "ray.tune", "ray.train", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # in case mlflow is imported already


def _error(message: str) -> int:
    console.end_status()  # a status line drawn on the terminal ends before the error
    # A credential in a path or a URI never reaches the console or a Ray job's log.
    print(f"raypipe: error: {redact(message)}", file=sys.stderr)
    return EXIT_USER_ERROR


def _prepare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from raypipe.data.prepare import prepare

    if not 0 <= args.validation_fraction < 1:
        return _error(f"--validation-fraction must be in [0, 1), got {args.validation_fraction}")
    if args.shard_rows is not None and args.shard_rows < 1:
        return _error(f"--shard-rows must be >= 1, got {args.shard_rows}")
    media = args.kind in ("images", "captions")
    options = {
        "unit": args.unit,
        "text_column": args.text_column,
        "label_column": args.label_column,
        "format": args.format,
        "regression": args.regression,
        "validation_fraction": args.validation_fraction,
        "shard_rows": args.shard_rows or (1_000 if media else 10_000),
        "seed": args.seed,
        "overwrite": args.overwrite,
        **({"shuffle": False} if args.keep_order else {"shuffle": True} if args.shuffle else {}),
    }
    try:
        outcome = prepare(args.kind, args.inputs, out=args.out, options=options)
    except UserError as e:
        return _error(str(e))
    print(outcome.describe(Path(args.out)))
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        local = Path("raypipe-runs") / "mlflow.db"
        if not local.is_file():
            return _error(
                "no tracking store: pass --tracking-uri (e.g. sqlite:///PATH/raypipe-runs/"
                "mlflow.db, as the run's summary printed) or set MLFLOW_TRACKING_URI"
            )
        uri = f"sqlite:///{local.resolve()}"
    from raypipe import tracking
    from raypipe.summary import format_summary, read_summary

    try:
        tracking.check_uri(uri, key="--tracking-uri", must_exist=True)
        print(format_summary(read_summary(uri, args.run_id)))
    except UserError as e:
        return _error(str(e))
    return 0


def main(argv: list[str] | None = None) -> int:
    # No MLflow call in a raypipe process may unpickle what a store holds (a model.pth planted
    # beside a registered model, say): raypipe's own models load without it (pt2, checked).
    refuse_pickles()
    args = _parser().parse_args(argv)
    try:
        return _main(args)
    except Exception:
        # A bug, not a user's mistake: its traceback, with any credential in it masked (the
        # console and a Ray job's log are both this stream).
        import traceback

        console.end_status()
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1
    finally:
        from raypipe import localray

        # A local Ray begun early but never used (every stage reused, or a check failed):
        # stopped after the summary or the error is out.
        localray.discard()


def _main(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        return _prepare(args)
    if args.command == "report":
        return _report(args)
    from raypipe.config import load_config, to_yaml

    try:
        cfg = load_config(args.pipeline, args.overrides)
        if args.command == "validate":
            from raypipe.preflight import check_offline

            check_offline(cfg)
            print(redact(to_yaml(cfg)), end="")
            print(f"raypipe: {args.pipeline} is valid", file=sys.stderr)
            return 0
        from raypipe import timing

        timing.MARKS.clear()
        address = args.address or os.environ.get("RAY_ADDRESS")
        from raypipe.preflight import check_inputs

        # Every check of the data, storage and tracking store first: a mistake there never
        # starts Ray (and never waits for it to stop).
        checked = check_inputs(cfg, address=address)
        timing.mark("checks")
        if not address:
            from raypipe import localray

            # Ray's processes start while this one imports (see raypipe/localray).
            localray.start_in_background(verbose=args.verbose)
        # The heavy imports every run needs (Ray Train and Tune come with the stages), up
        # front so the cold-start breakdown shows them.
        import mlflow  # noqa: F401

        from raypipe.pipeline import run_pipeline
        from raypipe.summary import format_summary

        timing.mark("imports")

        if not args.verbose:
            _quiet_driver()
        try:
            summary = run_pipeline(cfg, address=address, verbose=args.verbose, checked=checked)
        except UserError:
            raise
        except KeyboardInterrupt:
            return _error("interrupted")
        except Exception as e:
            user = find_user_error(e)
            if user is not None:
                return _error(str(user))
            raise
        console.end_status()  # a status that came in after its stage ended
        print(format_summary(summary))
        return 0
    except UserError as e:
        return _error(str(e))
