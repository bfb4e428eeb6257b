"""The config schema's data section: where the unlabeled and labeled rows are, how they are
read and preprocessed, and the tokenizer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from raypipe.config.base import PositiveFloat, PositiveInt, Strict

# --- data ---------------------------------------------------------------------------------------


def _path_or_paths(value: Any) -> Any:
    ok = isinstance(value, str) or (
        isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    )
    if not ok:
        raise ValueError(f"must be a path or a non-empty list of paths (got {value!r})")
    return value


class Source(Strict):
    path: Annotated[str | list[str], BeforeValidator(_path_or_paths)] = Field(
        description="A Parquet file, a directory of shards, or a glob; or a list of them, read "
        "in the order listed (say a general corpus, then the task's own text)."
    )
    text_column: str = Field("text", description="Column holding text (or a caption).")
    image_column: str = Field(
        "image", description="Column holding images: encoded bytes (PNG/JPEG) or uint8 arrays."
    )
    max_rows: PositiveInt | None = Field(
        None, description="Read only the first this many rows (a quick run on big data)."
    )

    @property
    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


class UnlabeledSource(Source):
    weights: list[PositiveFloat] | None = Field(
        None,
        description="One weight per path in `path` (a list): pretraining draws its rows (token "
        "blocks, for text) from each path in proportion to its weight, reading the smaller ones "
        "again as often as their share needs (Ray Data's Dataset.mix; a path too big to hold in "
        "memory is read once an epoch), instead of each path once, one after another. E.g. `[1, 1]`: the task's own text as often as a corpus "
        "twenty times its size. `max_rows` then applies to each path.",
    )

    @model_validator(mode="after")
    def _one_weight_per_path(self):
        if self.weights is not None and len(self.weights) != len(self.paths):
            raise ValueError(
                f"weights: give one weight per path (got {len(self.weights)} for "
                f"{len(self.paths)} path(s)); list the paths as path: [a, b]"
            )
        return self

    def fingerprinted(self) -> dict[str, Any]:
        """What a pretrain stage's fingerprint covers (no weights key when there are none, so
        stages fingerprinted before weights existed are still reused)."""
        return self.model_dump(exclude=None if self.weights is not None else {"weights"})


class LabeledSource(Source):
    label_column: str = Field(
        "label", description="Column holding the label (an integer class, or a number)."
    )
    target_column: str = Field("target", description="Translation: column holding the target text.")


class LabeledData(Strict):
    train: LabeledSource = Field(description="Labeled training shards.")
    validation: LabeledSource = Field(
        description="Labeled validation shards (evaluated every epoch; they pick the trials)."
    )
    test: LabeledSource | None = Field(
        None,
        description="Labeled test shards, untouched by model selection: each arm's best "
        "checkpoint is scored on them once, after its sweep, and the gap is reported on them.",
    )

    @property
    def splits(self) -> list[str]:
        """The labeled splits given: train, validation and, when there is one, test."""
        return ["train", "validation"] + (["test"] if self.test is not None else [])

    def fingerprinted(self) -> dict[str, Any]:
        """What a fine-tune stage's fingerprint covers (no test key when there is none, so
        stages fingerprinted before test splits existed are still reused)."""
        return self.model_dump(exclude=None if self.test is not None else {"test"})


class PreprocessConfig(Strict):
    cpus_per_task: PositiveFloat = Field(
        1.0,
        description="CPUs each Ray Data preprocessing task reserves. Preprocessing never asks "
        "for GPUs, so on a mixed cluster it runs wherever CPUs are offered.",
    )
    concurrency: PositiveInt | None = Field(
        None,
        description="At most this many preprocessing tasks at once (default: Ray Data scales "
        "with the cluster's free CPUs).",
    )


class DataConfig(Strict):
    generate: Literal["quickstart"] | None = Field(
        None, description="Write this built-in synthetic dataset to the paths below when missing."
    )
    unlabeled: UnlabeledSource | None = Field(
        None, description="Unlabeled data for pretraining (text, images or image-text pairs)."
    )
    unlabeled_validation: Source | None = Field(
        None,
        description="Held-out unlabeled data, never trained on: pretraining is scored on it with "
        "its objective's loss every pretrain.eval_every steps (val/loss; val/perplexity for text).",
    )
    unlabeled_holdout: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        None,
        description="Instead of data.unlabeled_validation: hold out this share of the unlabeled "
        "rows (chosen by a seeded hash of their content), never trained on, as pretraining's "
        "validation data.",
    )
    labeled: LabeledData | None = Field(None, description="Labeled data for fine-tuning.")
    preprocess: PreprocessConfig = Field(
        default_factory=PreprocessConfig,
        description="Resources of the Ray Data tasks that decode, augment and tokenize.",
    )
    bad_images: Literal["fail", "skip"] = Field(
        "fail",
        description="An image that does not decode: fail naming the column, or skip its row "
        "and count it (reported as data/skipped_images).",
    )


class TokenizerConfig(Strict):
    type: Literal["bpe", "byte"] = Field("bpe", description="Byte-level BPE, or raw bytes.")
    vocab_size: Annotated[int, Field(ge=300, le=1_000_000)] = Field(
        4096, description="Target vocabulary size for BPE."
    )
    lowercase: bool = Field(False, description="Lowercase text before tokenizing.")
    sample_rows: PositiveInt = Field(100_000, description="Rows read to train the tokenizer.")
    path: str | None = Field(None, description="Use this tokenizer.json instead of training one.")
