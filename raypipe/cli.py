"""`raypipe run | validate`: the command-line face. Imports nothing heavy until it must."""

from __future__ import annotations

import argparse
import os
import sys

from raypipe.errors import UserError

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


def _error(message: str) -> int:
    print(f"raypipe: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from raypipe.config import load_config, to_yaml

    try:
        cfg = load_config(args.pipeline, args.overrides)
        if args.command == "validate":
            from raypipe.pipeline import prepare_offline

            prepare_offline(cfg)
            print(to_yaml(cfg), end="")
            print(f"raypipe: {args.pipeline} is valid", file=sys.stderr)
            return 0
        from raypipe.pipeline import run_pipeline
        from raypipe.stages.common import find_user_error
        from raypipe.summary import format_summary

        if not args.verbose:
            _quiet_driver()
        try:
            summary = run_pipeline(
                cfg, address=args.address or os.environ.get("RAY_ADDRESS"), verbose=args.verbose
            )
        except UserError:
            raise
        except KeyboardInterrupt:
            return _error("interrupted")
        except Exception as e:
            user = find_user_error(e)
            if user is not None:
                return _error(str(user))
            raise
        print(format_summary(summary))
        return 0
    except UserError as e:
        return _error(str(e))
