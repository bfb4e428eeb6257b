"""Fine-tuning recipes on a small labeled set, pretrained vs scratch, averaged over seeds.

A study harness for the label-efficiency question (BENCHMARKS.md, SST-2). It fine-tunes the
backbone of a raypipe pretraining checkpoint with raypipe's own fine-tuning loop
(`raypipe.engine.finetune_loop`, the loop every sweep trial runs) over an in-memory session (no
Ray, no MLflow: seconds per trial), from the pretrained weights and from random ones, over
several seeds, and prints each arm's mean validation accuracy (at the last epoch and at its best
epoch) and the gap. A recipe is any of the loop's settings, so what wins here runs unchanged in a
sweep:

    python bench/finetune_recipes.py --checkpoint RUNS/NAME/pretrain-*/train/step-00001600 \\
        --train RUNS/NAME/finetune-*/labels-0.01 --validation data/sst2/dev \\
        [--seeds 3] [--grid '[{"lr": 1e-3}, {"lr": 3e-3, "freeze_backbone": true}]']

Grid keys: lr, epochs (4), batch_size (32), pool (mean|last), dropout (0.1), weight_decay
(0.01), warmup_ratio (0.1), freeze_backbone (false).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch

from raypipe.config import FinetuneConfig
from raypipe.data import files as datafiles
from raypipe.data.text import encode_labeled
from raypipe.engine.checkpoint import read_spec, read_tokenizer
from raypipe.engine.finetune_loop import FinetuneJob, finetune_loop
from raypipe.engine.session import MemorySession

DEFAULTS = {
    "lr": 1e-3,
    "epochs": 4,
    "batch_size": 32,
    "pool": "mean",
    "dropout": 0.1,
    "weight_decay": 0.01,
    "warmup_ratio": 0.1,
    "freeze_backbone": False,
}


def _encode(path: str, tokenizer_json: str, max_len: int) -> dict[str, torch.Tensor]:
    files = datafiles.resolve_parquet_files(path, key=path)
    table = pa.concat_tables(datafiles.read_blocks(files, ["text", "label"], rows_per_block=2**20))
    batch = {"text": np.array(table.column("text").to_pylist(), dtype=object),
             "label": table.column("label").to_numpy()}  # fmt: skip
    out = encode_labeled(batch, tokenizer_json=tokenizer_json, text_column="text",
                         label_column="label", max_len=max_len)  # fmt: skip
    return {"input_ids": torch.as_tensor(out["input_ids"]).long(),
            "label": torch.as_tensor(out["label"])}  # fmt: skip


def trial(spec, tokenizer_json, checkpoint: str | None, data, *, seed: int, **recipe) -> list:
    """Validation accuracy after each epoch of one fine-tuning run."""
    r = {**DEFAULTS, **recipe}
    cfg = FinetuneConfig(task="classification", epochs=r["epochs"], batch_size=r["batch_size"],
                         sweep={"metric": "val/accuracy", "mode": "max"})  # fmt: skip
    hp = {k: r[k] for k in ("lr", "weight_decay", "warmup_ratio", "batch_size",
                            "freeze_backbone", "dropout")}  # fmt: skip
    num_classes = int(data["train"]["label"].max()) + 1
    with tempfile.TemporaryDirectory(prefix="raypipe-recipes-") as tmp:
        session = MemorySession(data, checkpoint_dir=tmp, prefix="epoch-", num_to_keep=1)
        job = FinetuneJob(
            cfg=cfg, hp=hp,
            task_options={"num_classes": num_classes, "pool": r["pool"], "dropout": r["dropout"]},
            model_spec=spec, init_checkpoint=checkpoint, tokenizer_json=tokenizer_json,
            num_train_rows=len(data["train"]["label"]), seed=seed, fingerprint="recipes",
            arm="pretrained" if checkpoint else "scratch", trial_name=f"recipe-{seed}",
        )  # fmt: skip
        finetune_loop(job, session)
    return [record["val/accuracy"] for record in session.records]


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
    logging.getLogger("raypipe").setLevel(logging.ERROR)  # the loop's progress lines
    full = read_spec(args.checkpoint)
    spec = {"type": full["type"], "config": full["config"]}
    tokenizer_json = read_tokenizer(args.checkpoint)
    max_len = spec["config"]["max_len"]
    data = {"train": _encode(args.train, tokenizer_json, max_len),
            "validation": _encode(args.validation, tokenizer_json, max_len)}  # fmt: skip
    print(f"{len(data['train']['label'])} training rows, {len(data['validation']['label'])} "
          f"validation rows, {args.seeds} seeds; mean accuracy at the last / at the best epoch")  # fmt: skip
    print("| recipe | pretrained | scratch | gap (points) |\n|---|---|---|---|")
    for recipe in json.loads(args.grid):
        t0 = time.perf_counter()
        arms = {
            arm: np.array(
                [
                    trial(spec, tokenizer_json, ckpt, data, seed=s, **recipe)
                    for s in range(args.seeds)
                ]
            )
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
