"""`raypipe prepare`'s command line: raw files to Parquet shards (raypipe/data/prepare.py)."""

from __future__ import annotations

import argparse
import codecs
import re

_SPLIT = re.compile(r"[a-z][a-z0-9_-]{0,30}")


def add_prepare(sub) -> None:
    prep = sub.add_parser(
        "prepare",
        help="turn raw files into Parquet shards",
        description="Kinds: text FILES/DIRS (a row per line, paragraph or file); table FILES "
        "(TSV/CSV/JSONL with text and label columns, LABEL-text lines, or a file per label); "
        "images DIR|ZIP (class = parent folder); captions IMAGES_DIR CAPTIONS_FILE; parallel "
        "SOURCE TARGET (line-aligned). Inputs may be folders or globs; files may be gzipped.",
    )
    prep.add_argument("kind", choices=["text", "table", "images", "captions", "parallel"])
    prep.add_argument("inputs", nargs="*", help="input files, folders or globs")
    prep.add_argument("--out", required=True, help="output folder for the shards")
    prep.add_argument(
        "--unit",
        choices=["line", "paragraph", "file"],
        default="line",
        help="text: one row per line, blank-line paragraph, or file",
    )
    prep.add_argument("--encoding", default="utf-8",
                      help="text, table: the inputs' encoding (e.g. latin-1); default utf-8")  # fmt: skip
    prep.add_argument("--clean", action="store_true",
                      help="text, table: strip HTML tags (<br />), unescape entities (&amp;), "
                      "collapse whitespace")  # fmt: skip
    _add_table(prep)
    prep.add_argument(
        "--validation-fraction",
        type=float,
        default=0.0,
        help="hold out this fraction (by image for captions) into OUT/validation",
    )
    prep.add_argument(
        "--test-fraction",
        type=float,
        default=0.0,
        help="hold out this fraction too (other rows than validation's) into OUT/test",
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


def _add_table(prep) -> None:
    t = prep.add_argument_group("table")
    t.add_argument("--format", choices=["auto", "tsv", "csv", "jsonl", "lines"], default="auto",
                   help="tsv: literal tab-separated fields; csv: with CSV quoting; jsonl; lines: "
                   "LABEL<sep>text a line (auto: from the extension, else tsv)")  # fmt: skip
    t.add_argument("--text-column", default=None,
                   help="the text column(s), joined by a space when several: names "
                   "('title,description'), or numbers from 1 with --no-header (default: "
                   "sentence)")  # fmt: skip
    t.add_argument(
        "--label-column",
        default=None,
        help="the label column: a name, or a number from 1 (default: label)",
    )
    t.add_argument(
        "--no-header",
        action="store_true",
        help="tsv, csv: the first row is data; columns are numbers from 1",
    )
    t.add_argument(
        "--separator",
        default=None,
        help="lines: what ends the label (default: the first run of whitespace)",
    )
    t.add_argument("--label-map", default=None, metavar="RAW:ID,...|shift",
                   help="number the labels: '1:0,2:1,...' (rows with other labels are skipped) "
                   "or 'shift' (whole numbers moved to start at 0)")  # fmt: skip
    t.add_argument("--labels", default=None, metavar="LABELS_JSON",
                   help="number the labels as an earlier prepare did (its OUT/labels.json), "
                   "so that splits prepared apart agree")  # fmt: skip
    t.add_argument(
        "--label-from-file",
        nargs="+",
        default=None,
        metavar="LABEL=FILE",
        help="one text a line; the label is the file's (e.g. pos=a.txt neg=b.txt)",
    )
    t.add_argument("--split", action="append", default=[], metavar="NAME=FILES",
                   help="also write OUT/NAME from FILES (comma-separated) under the same label "
                   "map, e.g. --split test=test.tsv; the main inputs then go to OUT/train")  # fmt: skip
    t.add_argument("--regression", action="store_true", help="labels are numbers, not classes")


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} {item!r}: use NAME=FILE")
        if name in out:
            raise ValueError(f"{flag} names '{name}' twice")
        out[name] = value
    return out


def _options(args: argparse.Namespace) -> dict:
    """The prepare options from the command line; ValueError names a bad one."""
    if not 0 <= args.validation_fraction < 1:
        raise ValueError(f"--validation-fraction must be in [0, 1), got {args.validation_fraction}")
    if not 0 <= args.test_fraction < 1 or args.validation_fraction + args.test_fraction >= 1:
        raise ValueError(
            f"--test-fraction must be in [0, 1) and leave rows to train on, got {args.test_fraction}"
        )
    if args.shard_rows is not None and args.shard_rows < 1:
        raise ValueError(f"--shard-rows must be >= 1, got {args.shard_rows}")
    try:
        codecs.lookup(args.encoding)
    except LookupError:
        raise ValueError(f"--encoding '{args.encoding}' is not an encoding Python knows "
                         "(e.g. utf-8, latin-1, cp1252)") from None  # fmt: skip
    if args.kind != "table" and (args.label_from_file or args.split):
        raise ValueError("--label-from-file and --split are for `prepare table`")
    splits = {k: v.split(",") for k, v in _pairs(args.split, "--split").items()}
    bad = [s for s in splits if not _SPLIT.fullmatch(s) or s == "train"]
    if bad:
        raise ValueError(f"--split name '{bad[0]}': use a lower-case name other than 'train', "
                         "e.g. test or validation")  # fmt: skip
    if "validation" in splits and args.validation_fraction > 0:
        raise ValueError(
            "--split validation=... and --validation-fraction both make OUT/validation"
        )
    if "test" in splits and args.test_fraction > 0:
        raise ValueError("--split test=... and --test-fraction both make OUT/test")
    media = args.kind in ("images", "captions")
    return {
        "unit": args.unit,
        "encoding": args.encoding,
        "clean": args.clean,
        "format": args.format,
        "text_column": args.text_column,
        "label_column": args.label_column,
        "header": not args.no_header,
        "separator": args.separator,
        "label_map": args.label_map,
        "labels_file": args.labels,
        "label_files": _pairs(args.label_from_file or [], "--label-from-file"),
        "splits": splits,
        "regression": args.regression,
        "validation_fraction": args.validation_fraction,
        "test_fraction": args.test_fraction,
        "shard_rows": args.shard_rows or (1_000 if media else 10_000),
        "seed": args.seed,
        "overwrite": args.overwrite,
        **({"shuffle": False} if args.keep_order else {"shuffle": True} if args.shuffle else {}),
    }


def run_prepare(args: argparse.Namespace, error) -> int:
    from pathlib import Path

    from raypipe.data.prepare import prepare
    from raypipe.errors import UserError

    try:
        options = _options(args)
    except ValueError as e:
        return error(str(e))
    try:
        outcome = prepare(args.kind, args.inputs, out=args.out, options=options)
    except UserError as e:
        return error(str(e))
    print(outcome.describe(Path(args.out)))
    return 0
