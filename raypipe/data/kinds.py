"""One description per data kind: the columns it reads, its CPU transform and how that is
called, its batch size, and whether it needs a tokenizer.

Pretraining kinds are named by an objective's `data_kind`; fine-tuning kinds by a task's
`data_kind` ("labeled", "pairs") and, for "labeled", the model input ("text" or "image"). The
plan (which columns to check, whether to train a tokenizer) and the Ray Data pipelines
(`data/pipelines.py`) both read these, so a new kind is added here once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raypipe.data.text import encode_labeled, encode_translation, pack_blocks
from raypipe.data.vision import (
    decode_images,
    encode_image_text,
    encode_labeled_images,
    simclr_views,
)


@dataclass(frozen=True)
class Encoding:
    """How one batch transform of a kind is called (the kwargs come from `Needs`)."""

    transform: Callable
    kwargs: dict[str, Any]
    columns: list[str]
    batch_size: int


@dataclass(frozen=True)
class Needs:
    """What a kind's transform may take: the source's columns, the model's image shape, the
    tokenizer and the token lengths."""

    source: Any  # config.Source or config.LabeledSource
    model_config: dict[str, Any]
    tokenizer_json: str | None = None
    length: int | None = None  # tokens per row (pretraining: seq_len + the objective's extra)
    label_dtype: str | None = None
    truncation: str = "head"  # labeled text longer than `length`: which tokens stay

    def images(self) -> dict[str, Any]:
        return {
            "image_column": self.source.image_column,
            "image_size": self.model_config.get("image_size"),
            "channels": self.model_config.get("channels"),
        }

    def text(self) -> dict[str, Any]:
        return {"tokenizer_json": self.tokenizer_json, "text_column": self.source.text_column}


@dataclass(frozen=True)
class DataKind:
    name: str
    columns: tuple[str, ...]  # the Source fields naming the columns read
    needs_tokenizer: bool
    reads_images: bool
    batch_size: int
    encoding: Callable[[Needs], tuple[Callable, dict[str, Any]]]

    def column_names(self, source) -> list[str]:
        return [getattr(source, c) for c in self.columns]

    def text_column_names(self, source) -> list[str]:
        """The columns holding text (what a tokenizer is trained on)."""
        return [getattr(source, c) for c in self.columns if c in ("text_column", "target_column")]

    @property
    def labeled(self) -> bool:
        """Rows carry a label (a class or a target value) besides their input."""
        return "label_column" in self.columns

    def encode(self, needs: Needs) -> Encoding:
        fn, kwargs = self.encoding(needs)
        return Encoding(fn, kwargs, self.column_names(needs.source), self.batch_size)


PRETRAIN_KINDS = {
    "text_blocks": DataKind(
        "text_blocks", ("text_column",), needs_tokenizer=True, reads_images=False,
        batch_size=1024,
        encoding=lambda n: (pack_blocks, {**n.text(), "block_size": n.length}),
    ),
    "images": DataKind(
        "images", ("image_column",), needs_tokenizer=False, reads_images=True, batch_size=256,
        encoding=lambda n: (decode_images, n.images()),
    ),
    "image_views": DataKind(
        "image_views", ("image_column",), needs_tokenizer=False, reads_images=True,
        batch_size=256,
        encoding=lambda n: (simclr_views, n.images()),
    ),
    "image_text": DataKind(
        "image_text", ("image_column", "text_column"), needs_tokenizer=True, reads_images=True,
        batch_size=256,
        encoding=lambda n: (
            encode_image_text,
            {**n.images(), **n.text(), "text_len": n.length},
        ),
    ),
}  # fmt: skip

LABELED_KINDS = {
    "text": DataKind(
        "text", ("text_column", "label_column"), needs_tokenizer=True, reads_images=False,
        batch_size=256,
        encoding=lambda n: (
            encode_labeled,
            {**n.text(), "label_column": n.source.label_column, "label_dtype": n.label_dtype,
             "max_len": n.length, "truncation": n.truncation},
        ),
    ),
    "image": DataKind(
        "image", ("image_column", "label_column"), needs_tokenizer=False, reads_images=True,
        batch_size=256,
        encoding=lambda n: (
            encode_labeled_images,
            {"image_column": n.source.image_column, "label_column": n.source.label_column,
             "label_dtype": n.label_dtype, "image_size": n.model_config["image_size"],
             "channels": n.model_config["channels"]},
        ),
    ),
    "pairs": DataKind(
        "pairs", ("text_column", "target_column"), needs_tokenizer=True, reads_images=False,
        batch_size=256,
        encoding=lambda n: (
            encode_translation,
            {**n.text(), "target_column": n.source.target_column, "max_len": n.length},
        ),
    ),
}  # fmt: skip


def pretrain_kind(name: str) -> DataKind:
    if name not in PRETRAIN_KINDS:
        raise ValueError(f"unknown data kind {name!r}; expected one of {list(PRETRAIN_KINDS)}")
    return PRETRAIN_KINDS[name]


def labeled_kind(task_kind: str, model_input: str | None) -> DataKind:
    """A task's data: "pairs" (source -> target text), else one input column and a label."""
    return LABELED_KINDS["pairs" if task_kind == "pairs" else (model_input or "text")]
