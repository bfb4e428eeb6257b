"""Fine-tuning recipes on a small labeled set, pretrained vs scratch, averaged over seeds.

A study harness for the label-efficiency question (BENCHMARKS.md, SST-2). It fine-tunes the
backbone of a raypipe pretraining checkpoint with raypipe's classification task in a plain
PyTorch loop (no Ray, no MLflow: seconds per trial), from the pretrained weights and from random
ones, over several seeds, and prints each arm's mean validation accuracy (at the end and at its
best evaluation) and the gap. Recipes raypipe's sweep does not offer can be tried here first:
a lower learning rate for the backbone than for the head, a linear-probe warm start of the head,
frozen token embeddings.

    python bench/finetune_recipes.py --checkpoint RUNS/NAME/pretrain-*/train/step-00001600 \\
        --train RUNS/NAME/finetune-*/labels-0.01 --validation data/sst2/dev \\
        [--seeds 3] [--grid '[{"lr": 1e-3}, {"lr": 3e-3, "backbone_lr_scale": 0.1}]']

Grid keys: lr, steps (400), batch_size (32), pool (mean|last), dropout (0.1), weight_decay
(0.01), backbone_lr_scale (1.0), freeze_embeddings (false), probe_steps (0: head-only steps at
probe_lr 1e-2 before fine-tuning), evals (4).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pyarrow as pa
import torch

from raypipe.data import files as datafiles
from raypipe.data.text import encode_labeled
from raypipe.engine.checkpoint import load_weights, read_spec, read_tokenizer
from raypipe.engine.optim import warmup_cosine
from raypipe.models import build_model
from raypipe.tasks.base import build_task

DEFAULTS = {
    "lr": 1e-3,
    "steps": 400,
    "batch_size": 32,
    "pool": "mean",
    "dropout": 0.1,
    "weight_decay": 0.01,
    "backbone_lr_scale": 1.0,
    "freeze_embeddings": False,
    "probe_steps": 0,
    "probe_lr": 1e-2,
    "evals": 4,
}


def _encode(path: str, tokenizer_json: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    files = datafiles.resolve_parquet_files(path, key=path)
    table = pa.concat_tables(datafiles.read_blocks(files, ["text", "label"], rows_per_block=2**20))
    batch = {"text": np.array(table.column("text").to_pylist(), dtype=object),
             "label": table.column("label").to_numpy()}  # fmt: skip
    out = encode_labeled(batch, tokenizer_json=tokenizer_json, text_column="text",
                         label_column="label", max_len=max_len)  # fmt: skip
    return torch.as_tensor(out["input_ids"]).long(), torch.as_tensor(out["label"])


def _groups(params, lr: float, weight_decay: float) -> list[dict]:
    params = [p for p in params if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr": lr},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr},
    ]


def _accuracy(task, x: torch.Tensor, y: torch.Tensor) -> float:
    task.eval()
    with torch.no_grad():
        return float((task.predict(x).argmax(-1) == y).float().mean())


def trial(spec, checkpoint: str | None, data, *, seed: int, **recipe) -> list[float]:
    """Validation accuracy at `evals` evenly spaced points of one fine-tuning run."""
    r = {**DEFAULTS, **recipe}
    (x, y), (vx, vy) = data
    torch.manual_seed(seed)
    backbone = build_model(spec)
    if checkpoint:
        load_weights(checkpoint, backbone)
    options = {"num_classes": int(y.max()) + 1, "pool": r["pool"], "dropout": r["dropout"]}
    task = build_task("classification", backbone, options)
    if r["freeze_embeddings"]:
        backbone.tok_emb.weight.requires_grad_(False)
    draw = torch.Generator().manual_seed(seed)
    if r["probe_steps"]:
        probe = torch.optim.AdamW(task.head.parameters(), lr=r["probe_lr"])
        for _ in range(r["probe_steps"]):
            idx = torch.randint(0, len(y), (r["batch_size"],), generator=draw)
            task.eval()  # the backbone as pretrained: no dropout
            loss, _ = task({"input_ids": x[idx], "label": y[idx]})
            probe.zero_grad()
            loss.backward()
            probe.step()
    optimizer = torch.optim.AdamW(
        _groups(task.head.parameters(), r["lr"], r["weight_decay"])
        + _groups(backbone.parameters(), r["lr"] * r["backbone_lr_scale"], r["weight_decay"]),
        betas=(0.9, 0.95),
    )
    steps = r["steps"]
    scheduler = warmup_cosine(optimizer, warmup_steps=steps // 10, total_steps=steps)
    order, at, accuracies = torch.randperm(len(y), generator=draw), 0, []
    for step in range(1, steps + 1):
        if at + r["batch_size"] > len(y):
            order, at = torch.randperm(len(y), generator=draw), 0
        idx = order[at : at + r["batch_size"]]
        at += r["batch_size"]
        task.train()
        loss, _ = task({"input_ids": x[idx], "label": y[idx]})
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % (steps // r["evals"]) == 0:
            accuracies.append(_accuracy(task, vx, vy))
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a raypipe pretraining checkpoint")
    parser.add_argument("--train", required=True, help="labeled Parquet: text, label")
    parser.add_argument("--validation", required=True, help="labeled Parquet: text, label")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--grid", default='[{"lr": 0.001}, {"lr": 0.003}]', help="JSON list")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = read_spec(args.checkpoint)
    tokenizer_json = read_tokenizer(args.checkpoint)
    max_len = spec["config"]["max_len"]
    data = (_encode(args.train, tokenizer_json, max_len),
            _encode(args.validation, tokenizer_json, max_len))  # fmt: skip
    print(f"{len(data[0][1])} training rows, {len(data[1][1])} validation rows, "
          f"{args.seeds} seeds; mean accuracy at the end / at the best evaluation")  # fmt: skip
    print("| recipe | pretrained | scratch | gap (points) |\n|---|---|---|---|")
    for recipe in json.loads(args.grid):
        t0 = time.perf_counter()
        arms = {
            arm: np.array([trial(spec, ckpt, data, seed=s, **recipe) for s in range(args.seeds)])
            for arm, ckpt in (("pretrained", args.checkpoint), ("scratch", None))
        }
        end = {a: v[:, -1].mean() for a, v in arms.items()}
        best = {a: v.max(1).mean() for a, v in arms.items()}
        print(f"| {json.dumps(recipe)} | {end['pretrained']:.4f} / {best['pretrained']:.4f} | "
              f"{end['scratch']:.4f} / {best['scratch']:.4f} | "
              f"{100 * (end['pretrained'] - end['scratch']):+.1f} / "
              f"{100 * (best['pretrained'] - best['scratch']):+.1f} | "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
