"""Text: tokenizer training and the batch transforms that run inside Ray Data on CPU.

The transforms (`pack_blocks`, `encode_labeled`) are plain functions over numpy batches, so
they are unit-tested without Ray and run as `map_batches` UDFs in the streaming pipeline.
"""

from __future__ import annotations

import functools
from itertools import chain

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from raypipe.errors import UserError
from raypipe.vocab import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "SPECIAL_TOKENS"]


def train_tokenizer(
    texts: list[str], *, kind: str = "bpe", vocab_size: int = 4096, lowercase: bool = False
) -> Tokenizer:
    """Byte-level BPE trained on `texts`; `kind="byte"` keeps only the 256 bytes (no merges).

    Special tokens take ids 0-4 (pad, bos, eos, unk, mask) in every tokenizer raypipe makes.
    """
    tok = Tokenizer(models.BPE())
    norm = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(norm)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    size = len(alphabet) + len(SPECIAL_TOKENS) if kind == "byte" else vocab_size
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok: Tokenizer) -> None:
    for expected, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != expected:
            raise UserError(
                f"tokenizer must map {token} to id {expected} (raypipe's special tokens are "
                f"{SPECIAL_TOKENS}); train one with raypipe or add them in that order"
            )


@functools.lru_cache(maxsize=4)
def load_tokenizer(tokenizer_json: str) -> Tokenizer:
    """Parse once per process: Ray Data reuses worker processes across batches."""
    return Tokenizer.from_str(tokenizer_json)


def _encode(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def _texts(batch: dict[str, np.ndarray], column: str) -> list[str]:
    values = batch[column].tolist()
    if any(v is None for v in values):
        raise UserError(f"text column '{column}' holds null values; drop or fill them first")
    return values


def pack_blocks(
    batch: dict[str, np.ndarray], *, tokenizer_json: str, text_column: str, block_size: int
) -> dict[str, np.ndarray]:
    """Tokenize documents, join them with <eos> and cut the stream into `block_size` blocks.

    The tail shorter than a block is dropped (at most block_size - 1 tokens per batch).
    """
    ids = _encode(load_tokenizer(tokenizer_json), _texts(batch, text_column))
    stream = np.fromiter(chain.from_iterable(d + [EOS_ID] for d in ids), dtype=np.int32)
    num_blocks = len(stream) // block_size
    return {"input_ids": stream[: num_blocks * block_size].reshape(num_blocks, block_size)}


def _pad_rows(rows: list[list[int]], length: int) -> np.ndarray:
    out = np.full((len(rows), length), PAD_ID, dtype=np.int32)
    for i, row in enumerate(rows):
        row = row[:length]
        out[i, : len(row)] = row
    return out


#: How a text longer than its room is cut: keep its start, its end, or both (a quarter from the
#: start and the rest from the end, as long-review classifiers commonly do).
TRUNCATIONS = ("head", "tail", "head+tail")


def kept(doc: list[int], room: int, how: str = "head") -> list[int]:
    """The `room` tokens of `doc` that a row keeps (all of them when it fits)."""
    if len(doc) <= room:
        return doc
    if how == "tail":
        return doc[len(doc) - room :]
    if how == "head+tail":
        head = room // 4
        return doc[:head] + doc[len(doc) - (room - head) :]
    return doc[:room]


def encode_texts(
    batch: dict[str, np.ndarray], *, tokenizer_json: str, text_column: str, length: int,
    eos: bool, truncation: str = "head",
) -> np.ndarray:  # fmt: skip
    """<bos> + tokens (+ <eos>), cut to `length` (`truncation` says which tokens stay) and
    right-padded with <pad>: (B, length)."""
    ids = _encode(load_tokenizer(tokenizer_json), _texts(batch, text_column))
    room = max(length - 1 - int(eos), 1)
    rows = [[BOS_ID, *kept(doc, room, truncation), *([EOS_ID] if eos else [])] for doc in ids]
    return _pad_rows(rows, length)


def length_profile(texts: list[str], tokenizer_json: str, max_len: int) -> dict[str, float]:
    """How much of `texts` a row of `max_len` tokens (with <bos>) holds: the share of rows
    cut, and the share of all their tokens kept."""
    docs = _encode(load_tokenizer(tokenizer_json), texts)
    room = max_len - 1
    total = sum(len(d) for d in docs)
    return {
        "rows": len(docs),
        "truncated_share": sum(len(d) > room for d in docs) / max(len(docs), 1),
        "tokens_kept_share": sum(min(len(d), room) for d in docs) / max(total, 1),
    }


def labels_as(values: np.ndarray, dtype: str, *, column: str) -> np.ndarray:
    """Integer class labels (int64) or real-valued targets (float32), checked."""
    if dtype == "int64":
        if values.dtype.kind not in "iu":
            raise UserError(
                f"label column '{column}' must hold integers, got dtype {values.dtype}; "
                "`raypipe prepare table` maps string labels to integers"
            )
        return values.astype(np.int64)
    if values.dtype.kind not in "iuf":
        raise UserError(f"label column '{column}' must hold numbers, got dtype {values.dtype}")
    out = values.astype(np.float32)
    if not np.isfinite(out).all():
        raise UserError(f"label column '{column}' holds NaN or infinite values; drop them first")
    return out


def encode_labeled(
    batch: dict[str, np.ndarray],
    *,
    tokenizer_json: str,
    text_column: str,
    label_column: str,
    max_len: int,
    label_dtype: str = "int64",
    truncation: str = "head",
) -> dict[str, np.ndarray]:
    """<bos> + tokens, cut to `max_len` as `truncation` says and right-padded with <pad>;
    labels checked."""
    ids = encode_texts(
        batch, tokenizer_json=tokenizer_json, text_column=text_column, length=max_len, eos=False,
        truncation=truncation,
    )  # fmt: skip
    return {
        "input_ids": ids,
        "label": labels_as(batch[label_column], label_dtype, column=label_column),
    }


def encode_translation(
    batch: dict[str, np.ndarray],
    *,
    tokenizer_json: str,
    text_column: str,
    target_column: str,
    max_len: int,
) -> dict[str, np.ndarray]:
    """One decoder-only sequence per pair: <bos> source <eos> target <eos>, right-padded.

    The source keeps at most half of `max_len`, so every target has room. `target_start` is the
    index of the first target token (what greedy decoding starts from).
    """
    tok = load_tokenizer(tokenizer_json)
    src = _encode(tok, _texts(batch, text_column))
    tgt = _encode(tok, _texts(batch, target_column))
    rows, starts = [], []
    for s_ids, t_ids in zip(src, tgt, strict=True):
        prompt = _prompt(s_ids, max_len)
        rows.append(prompt + [*t_ids, EOS_ID])
        starts.append(len(prompt))
    return {"input_ids": _pad_rows(rows, max_len), "target_start": np.asarray(starts, np.int64)}


def _prompt(source_ids: list[int], max_len: int) -> list[int]:
    return [BOS_ID, *source_ids[: max_len // 2 - 2], EOS_ID]


def encode_prompts(
    batch: dict[str, np.ndarray], *, tokenizer_json: str, text_column: str, max_len: int
) -> dict[str, np.ndarray]:
    """Translation sources alone, as `encode_translation` begins each pair (what greedy
    decoding starts from): right-padded to `max_len`, with each prompt's length."""
    src = _encode(load_tokenizer(tokenizer_json), _texts(batch, text_column))
    rows = [_prompt(s_ids, max_len) for s_ids in src]
    return {
        "input_ids": _pad_rows(rows, max_len),
        "target_start": np.asarray([len(r) for r in rows], np.int64),
    }
