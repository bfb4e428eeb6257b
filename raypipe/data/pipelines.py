"""The Ray Data pipelines, defined once on the driver: pretraining's stream (read -> transform,
over several passes when the data is small) and fine-tuning's encoded, materialized splits;
the data's footprint, and the count of undecodable images skipped.

Each data kind's columns and transform come from `data/kinds.py`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from raypipe.config import LabeledSource, PreprocessConfig, PretrainConfig, Source
from raypipe.data import files as datafiles
from raypipe.data.idle_nap import nap_when_idle
from raypipe.data.kinds import Needs, labeled_kind, pretrain_kind

#: Bytes of text per token, a generous upper bound (BPE on English gives 2-5): so the count of
#: blocks estimated from the text's size is low, and `passes_per_epoch` errs towards more.
MAX_BYTES_PER_TOKEN = 8
#: At most this many passes over the data in one Ray Data epoch.
MAX_PASSES = 64
#: Data up to this size (raw column bytes, from the Parquet footers) is read once into Ray's
#: object store, in blocks of about BLOCK_BYTES; larger data streams from its shards.
CACHE_MAX_BYTES = 256 * 2**20
BLOCK_BYTES = 8 * 2**20
#: A weighted mix draws whole blocks: small data is read in blocks this small for it, so the
#: sources take turns every few hundred rows, not every pass.
MIX_BLOCK_BYTES = 256 * 2**10
#: The block size of data streamed from its shards (see build_dataset).
STREAM_BLOCK_BYTES = 4 * 2**20
#: How much of streamed training data (per worker) may wait in Ray's object store ahead of the
#: trainer: a few blocks, minutes of training. Unbounded, Ray Data reads and tokenizes the
#: shards as fast as its CPUs allow, and on a small machine that competes with the training
#: step itself (P1 in BENCHMARKS.md).
STREAM_AHEAD_BYTES = 64 * 2**20
#: A source is read at most this many times in one epoch of a weighted mix.
MAX_MIX_REPEATS = 1000


def data_columns(kind: str, source: Source) -> list[str]:
    """The columns of the shards that objectives of data kind `kind` read."""
    return pretrain_kind(kind).column_names(source)


@dataclass(frozen=True)
class Footprint:
    """What a stage will read, from the Parquet footers: rows (after `max_rows`) and the
    uncompressed bytes of the columns read. Decides how the data is read (`small`)."""

    rows: int
    size: int

    @property
    def small(self) -> bool:
        """Read once on the driver into the object store; otherwise streamed from the shards."""
        return self.size <= CACHE_MAX_BYTES


def data_footprint(files: list[str], *, kind: str, source: Source) -> Footprint:
    rows, size = datafiles.footprint(files, data_columns(kind, source))
    if source.max_rows and rows > source.max_rows:
        size, rows = size * source.max_rows // rows, source.max_rows
    return Footprint(rows=rows, size=size)


def passes_per_epoch(
    footprint: Footprint, *, kind: str, cfg: PretrainConfig, block_size: int, world: int,
    one_pass: Footprint | None = None,
) -> int:  # fmt: skip
    """Passes over the data that one Ray Data epoch makes: enough for the whole run.

    Each epoch of a streaming split starts a new execution (tasks, the first blocks through
    the transforms) behind a barrier, and the trainer waits for it: seconds every epoch, a real
    cost when the data is small and epochs are short. Repeating the data inside one epoch
    removes those waits. Estimated from the Parquet footers, before anything is read.
    `one_pass`: what one pass reads when that is not the data once (a weighted mix's).
    """
    if not footprint.small:
        return 1  # streamed from the shards: an epoch's start is small beside a pass of them
    needed = cfg.max_steps * cfg.batch_size * cfg.grad_accum_steps * world
    one_pass = one_pass or footprint
    if kind == "text_blocks":
        have = one_pass.size / (MAX_BYTES_PER_TOKEN * block_size)
    else:
        have = one_pass.rows
    return int(min(MAX_PASSES, max(1, math.ceil(needed / max(have, 1)))))


def preprocess_args(section: PreprocessConfig | None) -> dict[str, Any]:
    """Ray Data map arguments: CPUs only (preprocessing never holds a GPU), optional cap."""
    section = section or PreprocessConfig()
    args: dict[str, Any] = {"num_cpus": section.cpus_per_task, "num_gpus": 0}
    if section.concurrency is not None:
        args["concurrency"] = section.concurrency
    return args


@ray.remote(num_cpus=0)
class Tally:
    """A count that Ray Data tasks add to (e.g. images skipped as undecodable)."""

    def __init__(self):
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    def get(self) -> int:
        return self.count


def skip_bad_images(ds, *, image_column: str, channels: int, batch_size: int, preprocess, tally):
    """Put the undecodable-row filter in front of a dataset's decoding transform."""
    from raypipe.data.vision import drop_undecodable

    return ds.map_batches(
        drop_undecodable,
        batch_format="numpy",
        batch_size=batch_size,
        fn_kwargs={"image_column": image_column, "channels": channels, "tally": tally},
        **preprocess_args(preprocess),
    )


@dataclass(frozen=True)
class Holdout:
    """A seeded share of the rows set apart by a hash of their content: never trained on
    (`keep=False` drops them), scored on (`keep=True` keeps only them)."""

    fraction: float
    seed: int
    keep: bool


def _unit_hash(value, seed: int) -> float:
    """A stable number in [0, 1) for a row's content (text, bytes or an array) and a seed."""
    if isinstance(value, str):
        data = value.encode()
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    else:
        data = np.asarray(value).tobytes()
    digest = hashlib.blake2b(data, digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "little") / 2**64


def held_out(batch: dict[str, np.ndarray], *, column: str, holdout: Holdout) -> dict:
    """The batch's rows on `holdout`'s side (see Holdout)."""
    values = batch[column]
    inside = np.fromiter((_unit_hash(v, holdout.seed) < holdout.fraction for v in values),
                         dtype=bool, count=len(values))  # fmt: skip
    keep = inside if holdout.keep else ~inside
    return batch if keep.all() else {k: v[keep] for k, v in batch.items()}


def _read_small(files: list[str], columns: list[str], footprint: Footprint, max_rows,
                block_bytes: int = BLOCK_BYTES):  # fmt: skip
    """Small data, read once here into Ray's object store, in order, in blocks of about
    `block_bytes`. Ray Data's reader took 2-3 s to start for what pyarrow reads in 0.1 s (the
    quickstart's 20,000 rows). Returns the blocks' refs."""
    per_block = max(1, footprint.rows * block_bytes // max(footprint.size, 1))
    tables = datafiles.read_blocks(files, columns, rows_per_block=per_block, max_rows=max_rows)
    return [ray.put(t) for t in tables]


def _have(footprint: Footprint, kind: str) -> float:
    """How much data there is, in the unit a mix's weights share out: bytes of text (about
    tokens) for text blocks, rows for everything else."""
    return footprint.size if kind == "text_blocks" else footprint.rows


def mix_repeats(haves: list[float], weights: list[float]) -> list[int]:
    """How many times each source is read in one epoch of a weighted mix: the source with the
    most data per unit of weight once, every other one as often as its share needs, at most
    MAX_MIX_REPEATS times (a source spent early leaves the rest of the epoch to the others)."""
    epoch = max(h / w for h, w in zip(haves, weights, strict=True))
    return [min(MAX_MIX_REPEATS, max(1, math.ceil(epoch * w / max(h, 1))))
            for h, w in zip(haves, weights, strict=True)]  # fmt: skip


def mix_pass(footprints: list[Footprint], weights: list[float], kind: str) -> Footprint:
    """What one pass of a weighted mix reads: each source as many times as `mix_repeats` says."""
    repeats = mix_repeats([_have(f, kind) for f in footprints], weights)
    return Footprint(rows=sum(r * f.rows for r, f in zip(repeats, footprints, strict=True)),
                     size=sum(r * f.size for r, f in zip(repeats, footprints, strict=True)))  # fmt: skip


def mixed_dataset(
    groups: list[list[str]], weights: list[float], *, footprints: list[Footprint], passes: int,
    kind: str, **build,
) -> ray.data.Dataset:  # fmt: skip
    """The sources `groups` (each a path's files) mixed by `weights` (Ray Data's Dataset.mix):
    each built by `build_dataset` and read `mix_repeats` x `passes` times, so the epoch ends
    when the source with the most data per unit of weight has been read `passes` times. Each
    output block comes from one source; blocks are drawn so the rows so far follow the
    weights, in a fixed order (Ray waits for the source that is due). The epoch ends when
    every source is spent (the repeats make them end together, to a block or so): none is
    cut short. A source too big to hold in memory (streamed from its shards) is read once an
    epoch all the same (a union of it with itself would repeat each block in a row): spent
    early, it leaves the rest of the epoch to the others."""
    from ray.data import MixStoppingCondition

    repeats = mix_repeats([_have(f, kind) for f in footprints], weights)
    parts = [build_dataset(files, kind=kind, footprint=fp, passes=r * passes,
                           block_bytes=MIX_BLOCK_BYTES, **build)
             for files, fp, r in zip(groups, footprints, repeats, strict=True)]  # fmt: skip
    return parts[0].mix(
        *parts[1:],
        weights=list(weights),
        stopping_condition=MixStoppingCondition.STOP_ON_LONGEST_DROP,
    )


def build_dataset(
    files: list[str],
    *,
    kind: str,
    source: Source,
    tokenizer_json: str | None,
    seq_len: int,
    text_extra: int,
    model_config: dict[str, Any],
    preprocess: PreprocessConfig | None = None,
    bad_image_tally=None,
    footprint: Footprint | None = None,
    passes: int = 1,
    holdout: Holdout | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> ray.data.Dataset:
    """Lazy: read shards -> decode / augment / tokenize on CPU tasks, streamed into the trainer.

    `kind` is the objective's `data_kind` (see data/kinds.py). With `bad_image_tally` (a
    Tally), rows whose image does not decode are dropped and counted. One epoch of the result
    makes `passes` passes over small data (`Footprint.small`; the footprint is read from the
    footers unless given), in order; over larger data, streamed from the shards, one (see
    `passes_per_epoch`). With `holdout`, only the rows on its side (see Holdout).
    """
    described = pretrain_kind(kind)
    needs = Needs(source, model_config, tokenizer_json, length=seq_len + text_extra)
    enc = described.encode(needs)
    footprint = footprint or data_footprint(files, kind=kind, source=source)
    if footprint.small:
        refs = _read_small(files, enc.columns, footprint, source.max_rows, block_bytes)
        ds = ray.data.from_arrow_refs(refs)
    else:
        ds = ray.data.read_parquet(files, columns=enc.columns)
        if source.max_rows:
            ds = ds.limit(source.max_rows)
    if holdout is not None:
        ds = ds.map_batches(
            held_out, batch_format="numpy", batch_size=enc.batch_size,
            fn_kwargs={"column": enc.columns[0], "holdout": holdout}, **preprocess_args(preprocess),
        )  # fmt: skip
    skipping = bad_image_tally is not None and described.reads_images
    if skipping:
        ds = skip_bad_images(
            ds, image_column=source.image_column, channels=model_config.get("channels"),
            batch_size=enc.batch_size, preprocess=preprocess, tally=bad_image_tally,
        )  # fmt: skip
    if footprint.small and passes > 1:
        # One epoch makes `passes` passes: the same blocks listed `passes` times, in order. (A
        # union of the data with itself deals its inputs' blocks out in turn, even with the
        # order kept: each block came `passes` times in a row.) Bad images are skipped (and
        # counted) once, before the passes.
        if skipping or holdout is not None:
            ds.context.execution_options.preserve_order = True
            refs = ds.materialize().to_arrow_refs()
        ds = ray.data.from_arrow_refs(refs * passes)
    ds.context.raise_original_map_exception = True  # a UserError in a transform stays one
    if not footprint.small:
        # Streamed shards come out of their read tasks (and the transform) in blocks of this
        # size, not Ray Data's 128 MiB: the first batch no longer waits for a whole shard to
        # be read and transformed.
        ds.context.target_max_block_size = STREAM_BLOCK_BYTES
    ds = ds.map_batches(
        enc.transform,
        batch_format="numpy",
        batch_size=enc.batch_size,
        fn_kwargs=enc.kwargs,
        **preprocess_args(preprocess),
    )
    return nap_when_idle(ds)  # no busy loop against the training step (see data/idle_nap.py)


def labeled_dataset(
    files: list[str],
    *,
    source: LabeledSource,
    kind: str,
    input: str,
    label_dtype: str,
    tokenizer_json: str | None,
    max_len: int,
    model_config: dict[str, Any],
    preprocess: PreprocessConfig | None = None,
    bad_image_tally=None,
    truncation: str = "head",
) -> ray.data.Dataset:
    """Encoded once and materialized: every trial and epoch re-reads the same blocks.
    With `bad_image_tally` (a Tally), rows whose image does not decode are dropped and counted.

    kind "labeled": one input column (text or image) + label; "pairs": source -> target text.
    """
    described = labeled_kind(kind, input)
    needs = Needs(source, model_config, tokenizer_json, length=max_len, label_dtype=label_dtype,
                  truncation=truncation)  # fmt: skip
    enc = described.encode(needs)
    ds = ray.data.read_parquet(files, columns=enc.columns)
    if source.max_rows:
        ds = ds.limit(source.max_rows)
    if bad_image_tally is not None and described.reads_images:
        ds = skip_bad_images(
            ds, image_column=source.image_column, channels=model_config["channels"],
            batch_size=enc.batch_size, preprocess=preprocess, tally=bad_image_tally,
        )  # fmt: skip
    ds = ds.map_batches(
        enc.transform, batch_format="numpy", batch_size=enc.batch_size, fn_kwargs=enc.kwargs,
        **preprocess_args(preprocess),
    )  # fmt: skip
    ds.context.execution_options.preserve_order = True  # the same rows in the same order
    ds.context.raise_original_map_exception = True  # a UserError in a transform stays one
    return ds.materialize()


def encoded_rows(
    files: list[str],
    *,
    source: LabeledSource,
    rows: int,
    kind: str,
    input: str,
    label_dtype: str,
    tokenizer_json: str | None,
    max_len: int,
    model_config: dict[str, Any],
    truncation: str = "head",
) -> dict[str, np.ndarray]:
    """The first `rows` labeled rows of `files`, encoded as `labeled_dataset` encodes them,
    here in this process without Ray Data (a small sample: the pretraining probe's)."""
    described = labeled_kind(kind, input)
    needs = Needs(source, model_config, tokenizer_json, length=max_len, label_dtype=label_dtype,
                  truncation=truncation)  # fmt: skip
    enc = described.encode(needs)
    tables = datafiles.read_blocks(files, enc.columns, rows_per_block=rows, max_rows=rows)
    table = pa.concat_tables(tables)
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in enc.columns}
    return enc.transform(batch, **enc.kwargs)
