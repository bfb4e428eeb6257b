"""`raypipe run | validate | prepare | report | predict`: the command-line face. Imports nothing heavy
until it must."""

from __future__ import annotations

import argparse
import os
import sys

from raypipe.cli_predict import NO_STORE, TRACKING_HELP, add_predict, run_predict_cmd, tracking_uri
from raypipe.cli_prepare import add_prepare, run_prepare
from raypipe.errors import UserError, find_user_error
from raypipe.progress import console
from raypipe.redaction import redact
from raypipe.registered import refuse_pickles
from raypipe.tracking import quiet_run_links

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
    val = sub.add_parser(
        "validate", parents=[overrides], help="check a pipeline file and its data; start nothing"
    )
    val.add_argument(
        "--plan",
        action="store_true",
        help="print what the run will do (tokens, steps, trials x epochs x rows) and an "
        "estimate of its training time from a short warm-up on this machine, not the config",
    )
    rep = sub.add_parser(
        "report",
        help="print a finished pipeline run's summary from MLflow",
        description="Print the summary `raypipe run` ended with, read back from MLflow.",
    )
    rep.add_argument("run_id", help="the pipeline run's id (the summary's `mlflow run` line)")
    rep.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    add_prepare(sub)
    add_predict(sub)
    return parser


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


def _report(args: argparse.Namespace) -> int:
    uri = tracking_uri(args.tracking_uri)
    if uri is None:
        return _error(NO_STORE)
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
    quiet_run_links()
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
        return run_prepare(args, _error)
    if args.command == "report":
        return _report(args)
    if args.command == "predict":
        if not args.verbose:
            _quiet_driver()
        return run_predict_cmd(args, _error)
    from raypipe.config import load_config, to_yaml

    try:
        cfg = load_config(args.pipeline, args.overrides)
        if args.command == "validate":
            from raypipe.preflight import check_offline

            plan, sources = check_offline(cfg)
            if args.plan:
                from raypipe.config.tasks import task_views
                from raypipe.sizing import plan_run

                views = task_views(cfg)
                # With several named tasks: pretraining and the first task's sweep.
                print(plan_run(views[0].cfg if views else cfg, plan, sources))
            else:
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
