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

PAD, BOS, EOS, UNK, MASK = "<pad>", "<bos>", "<eos>", "<unk>", "<mask>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, MASK]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


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


def encode_labeled(
    batch: dict[str, np.ndarray],
    *,
    tokenizer_json: str,
    text_column: str,
    label_column: str,
    max_len: int,
) -> dict[str, np.ndarray]:
    """<bos> + tokens, truncated to `max_len` and right-padded with <pad>; labels as int64."""
    ids = _encode(load_tokenizer(tokenizer_json), _texts(batch, text_column))
    out = np.full((len(ids), max_len), PAD_ID, dtype=np.int32)
    for i, doc in enumerate(ids):
        row = [BOS_ID] + doc[: max_len - 1]
        out[i, : len(row)] = row
    labels = batch[label_column]
    if labels.dtype.kind not in "iu":
        raise UserError(
            f"label column '{label_column}' must hold integers, got dtype {labels.dtype}"
        )
    return {"input_ids": out, "label": labels.astype(np.int64)}
