"""Why a masked LM on the SST-2 phrases sat at unigram level for 900 steps: the same model,
data and optimizer as `pipelines/masked_lm.yaml`, in plain PyTorch (raypipe's tokenizer,
packing, model, objective and optimizer; no Ray), with one thing changed per variant.

    python bench/masked_lm_plateau.py [--data ../shared/data] [--steps 1000] [--only a,b]

Prints, per variant, the held-out masked-token loss every 100 steps beside the unigram loss
(the cross-entropy of the training tokens' frequencies on the same held-out targets: what a
model that ignores context reaches), and the seconds it took. The held-out blocks are packed
from SST-2's dev sentences and masked once, with a fixed seed, for every variant alike.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import numpy as np
import torch

from raypipe.data.text import pack_blocks, train_tokenizer
from raypipe.engine.optim import build_optimizer, warmup_cosine
from raypipe.models import build_model
from raypipe.objectives import build_objective
from raypipe.objectives.lm import bert_mask
from raypipe.objectives.losses import IGNORE
from raypipe.vocab import NUM_SPECIAL

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 64

#: variant -> changes to the masked_lm.yaml settings
VARIANTS = {
    "as shipped (4 layers, batch 32, mask 15 %, lr 1e-3)": {},
    "mask 40 %": {"mask_prob": 0.4},
    "batch 128": {"batch": 128},
    "lr 3e-3": {"lr": 3e-3},
    "2 layers": {"layers": 2},
    "blocks shuffled": {"shuffle": True},
}
BASE = {"mask_prob": 0.15, "batch": 32, "lr": 1e-3, "layers": 4, "shuffle": False,
        "warmup": 100, "weight_decay": 0.01}  # fmt: skip


def _sentences(path: Path) -> list[str]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r[0] for r in rows[1:] if r]


def _blocks(texts: list[str], tokenizer_json: str) -> torch.Tensor:
    packed = pack_blocks({"text": np.array(texts, dtype=object)}, tokenizer_json=tokenizer_json,
                         text_column="text", block_size=BLOCK)  # fmt: skip
    return torch.as_tensor(packed["input_ids"]).long()


def _unigram_loss(train: torch.Tensor, targets: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train.flatten(), minlength=vocab).double() + 1.0
    counts[:NUM_SPECIAL] = 0.0
    logp = (counts / counts.sum()).log()
    picked = targets[targets != IGNORE]
    return float(-logp[picked].mean())


def _held_out_loss(objective, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    model = objective.model
    model.eval()
    with torch.no_grad():
        logits = model.lm_logits(model(inputs))
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE
        )
    model.train()
    return float(loss)


def run(name: str, changes: dict, data: dict, steps: int) -> list[tuple[int, float]]:
    s = {**BASE, **changes}
    torch.manual_seed(0)
    spec = {"type": "transformer", "config": {"vocab_size": data["vocab"], "dim": 128,
            "num_layers": s["layers"], "num_heads": 4, "max_len": BLOCK, "pad_id": 0,
            "causal": False}}  # fmt: skip
    objective = build_objective("masked_lm", build_model(spec), {"mask_prob": s["mask_prob"]})
    optimizer = build_optimizer(objective.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    schedule = warmup_cosine(optimizer, warmup_steps=s["warmup"], total_steps=steps)
    train = data["train"]
    order = torch.randperm(len(train)) if s["shuffle"] else torch.arange(len(train))
    curve, at, t0 = [], 0, time.perf_counter()
    for step in range(1, steps + 1):
        idx = order[torch.arange(at, at + s["batch"]) % len(train)]
        at += s["batch"]
        loss, _ = objective({"input_ids": train[idx]})
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            curve.append((step, _held_out_loss(objective, *data["held_out"])))
    print(f"| {name} | " + " | ".join(f"{v:.2f}" for _, v in curve)
          + f" | {time.perf_counter() - t0:.0f} s |", flush=True)  # fmt: skip
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--only", default="", help="comma-separated variant numbers from 1")
    args = parser.parse_args()
    sst2 = Path(args.data) / "classification" / "sst2"
    texts = _sentences(sst2 / "train.tsv")
    tokenizer = train_tokenizer(texts, vocab_size=4096).to_str()
    train = _blocks(texts, tokenizer)
    dev = _blocks(_sentences(sst2 / "dev.tsv"), tokenizer)
    torch.manual_seed(1234)
    inputs, targets = bert_mask(dev, mask_prob=0.15, vocab_size=4096)
    data = {"train": train, "held_out": (inputs, targets), "vocab": 4096}
    unigram = _unigram_loss(train, targets, 4096)
    print(f"{len(train):,} training blocks of {BLOCK} tokens; held out: {len(dev)} blocks, "
          f"{int((targets != IGNORE).sum())} masked targets; unigram loss {unigram:.2f}\n")  # fmt: skip
    header = " | ".join(str(s) for s in range(100, args.steps + 1, 100))
    print(f"| variant | held-out masked loss at step {header} | time |")
    print("|---|" + "---|" * (args.steps // 100 + 1))
    chosen = {int(x) for x in args.only.split(",") if x}
    for i, (name, changes) in enumerate(VARIANTS.items(), 1):
        if not chosen or i in chosen:
            run(name, changes, data, args.steps)
    print(f"\nunigram level: {unigram:.2f}; log(vocab) = {math.log(4096):.2f}")


if __name__ == "__main__":
    main()
