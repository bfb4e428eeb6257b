"""Tiny models and batches for every objective, shared by the pure-PyTorch tests.

A helper module with no tests of its own: tests/test_objectives.py and
tests/test_model_objective.py assert on what it builds.
"""

from __future__ import annotations

import torch

from raypipe import registry
from raypipe.models import build_model
from raypipe.objectives import build_objective

VOCAB = 40
IMAGE = {"image_size": 16, "patch_size": 4, "channels": 3}
TEXT = {"vocab_size": VOCAB, "max_len": 12}
COMMON = {"dim": 32, "num_layers": 2, "num_heads": 4}

#: objective -> (model type, model config, options)
SETUPS = {
    "causal_lm": ("transformer", {**COMMON, **TEXT, "causal": True}, {}),
    "masked_lm": ("transformer", {**COMMON, **TEXT, "causal": False}, {}),
    "masked_image": ("vit", {**COMMON, **IMAGE}, {"decoder_dim": 32}),
    "simclr": ("cnn", {"dim": 32, "num_layers": 2, "image_size": 16, "channels": 3}, {}),
    "clip": ("clip", {**COMMON, **TEXT, **IMAGE}, {"embed_dim": 16}),
    "captioning": ("captioner", {**COMMON, **TEXT, **IMAGE}, {}),
    "gan": ("cnn", {"dim": 32, "num_layers": 2, "image_size": 16, "channels": 3}, {"z_dim": 8,
            "generator_width": 8}),
    # Subsampling off: in a 40-token vocabulary every token is "frequent".
    "skipgram": ("bag", {"dim": 32, **TEXT}, {"window": 2, "negatives": 3, "subsample": 0.0}),
}  # fmt: skip


#: Learning rates of objectives that train at another scale than the rest (skip-gram's
#: dot products of small vectors: word2vec itself uses 0.025).
LR = {"skipgram": 2e-2}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    kind, config, options = SETUPS[name]
    return build_objective(name, build_model({"type": kind, "config": config}), options)


def batch(name: str, n: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cls = registry.resolve("objective", name)
    kind = cls.data_kind
    s = IMAGE["image_size"]

    def images():
        # Structured images (a bright square somewhere), so there is something to learn.
        x = torch.randint(0, 60, (n, 3, s, s), generator=g, dtype=torch.uint8)
        for i in range(n):
            r, c = torch.randint(0, s - 6, (2,), generator=g).tolist()
            x[i, i % 3, r : r + 6, c : c + 6] = 250
        return x

    def tokens(length):
        ids = torch.randint(5, VOCAB, (n, length), generator=g)
        ids[:, 0] = 1  # <bos>
        return ids

    if kind == "text_blocks":
        return {"input_ids": tokens(12 + cls.text_extra)}
    if kind == "images":
        return {"image": images()}
    if kind == "image_views":
        x = images()
        return {"view1": x, "view2": x.flip(-1)}
    if kind != "image_text":
        raise ValueError(f"objective {name!r} reads {kind!r}; teach tests/tiny.py to make it")
    ids = tokens(12 + cls.text_extra)
    ids[:, -3:] = 0  # padded captions
    return {"image": images(), "input_ids": ids}
