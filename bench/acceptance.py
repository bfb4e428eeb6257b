"""Short real-data runs of every objective: `raypipe prepare` on ../shared/data, then
`raypipe run pipelines/X.yaml` with size overrides; prints each pretraining run's first and
last logged loss, its throughput and the fine-tuning result, read back from MLflow.

    python bench/acceptance.py --data ../shared/data [--workdir DIR] [--only simclr,gan] [--steps N]

Real data is never needed by the tests; this is the acceptance check of issue-sized runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RAYPIPE = [sys.executable, "-m", "raypipe"]

VEHICLES = "airplane:1,automobile:1,ship:1,truck:1,bird:0,cat:0,deer:0,dog:0,frog:0,horse:0"
PREPARE = {
    "sst2": [
        ["table", "{d}/classification/sst2/train.tsv", "--out", "data/sst2/train"],
        ["table", "{d}/classification/sst2/dev.tsv", "--out", "data/sst2/dev"],
        ["table", "{d}/classification/sst2/test-labeled.tsv", "--out", "data/sst2/test"],
    ],
    # MR, Subj, CR: one sentence a line, the label given by the file; no official splits:
    # seeded 80/10/10 by `prepare` (--seed 0; validation and test disjoint, label map shared).
    **{
        name: [["table", "--label-from-file", *(f"{label}={{d}}/classification/sentconv/{f}"
                for label, f in files), *enc, "--validation-fraction", "0.1",
                "--test-fraction", "0.1", "--out", f"data/{name}"]]
        for name, files, enc in (
            ("mr", (("pos", "rt-polarity.pos"), ("neg", "rt-polarity.neg")), ["--encoding", "latin-1"]),
            ("subj", (("subjective", "subj.subjective"), ("objective", "subj.objective")),
             ["--encoding", "latin-1"]),
            ("cr", (("pos", "custrev.pos"), ("neg", "custrev.neg")), []),
        )
    },
    "cifar10": [
        ["images", "{d}/images/cifar10/cifar10_train_1k_per_class_jpeg.zip", "--out",
         "data/cifar10/train"],
        ["images", "{d}/images/cifar10/cifar10_test_jpeg.zip", "--out", "data/cifar10/test"],
        # Halves of the test images: one picks (validation), the other only reports (test).
        ["images", "{d}/images/cifar10/cifar10_test_jpeg.zip", "--out", "data/cifar10/heldout",
         "--validation-fraction", "0.5"],
    ],
    # SST-5 as regression on its 0-4 scale ("label sentence" lines), its own three splits.
    "sst5": [
        ["table", "{d}/classification/sentconv/stsa.fine.train", "--format", "lines",
         "--regression", "--split", "validation={d}/classification/sentconv/stsa.fine.dev",
         "--split", "test={d}/classification/sentconv/stsa.fine.test", "--out", "data/sst5"],
    ],
    # The CIFAR-10 images again, labelled vehicle (1) or animal (0); the same seeded halves.
    "cifar-vehicles": [
        [kind, f"{{d}}/images/cifar10/{src}", "--out", out, *extra, "--label-map", VEHICLES]
        for kind, src, out, extra in (
            ("images", "cifar10_train_1k_per_class_jpeg.zip", "data/cifar-vehicles/train", []),
            ("images", "cifar10_test_jpeg.zip", "data/cifar-vehicles/heldout",
             ["--validation-fraction", "0.5"]),
        )
    ],
    "flickr8k": [
        ["captions", "{d}/image_caption/flickr8k/images",
         "{d}/image_caption/flickr8k/captions_1000images.csv", "--out", "data/flickr8k",
         "--validation-fraction", "0.1"],
    ],
    "multi30k": [
        ["text", "{d}/translation/multi30k/train.en.gz", "{d}/translation/multi30k/train.de.gz",
         "--shuffle", "--out", "data/multi30k/text"],
        ["parallel", "{d}/translation/multi30k/train.en.gz",
         "{d}/translation/multi30k/train.de.gz", "--out", "data/multi30k/train"],
        ["parallel", "{d}/translation/multi30k/test_2016_flickr.en.gz",
         "{d}/translation/multi30k/test_2016_flickr.de.gz", "--out", "data/multi30k/test"],
    ],
}  # fmt: skip

SMALL_FT = ["finetune.epochs=1", "finetune.sweep.num_samples=1", "finetune.compare_scratch=false",
            "finetune.sweep.scheduler=fifo", "finetune.sweep.search=random"]  # fmt: skip

#: pipeline -> (dataset, overrides). Sizes fit 2 CPU cores in a few minutes each.
RUNS = {
    "masked_lm": ("sst2", ["model.dim=64", "model.layers=2", "tokenizer.vocab_size=2048",
                           "data.labeled.train.max_rows=4000", *SMALL_FT]),
    "masked_image": ("cifar10", ["model.dim=64", "model.layers=2",
                                 "data.labeled.train.max_rows=4000",
                                 "data.labeled.validation.max_rows=2000", *SMALL_FT]),
    "simclr": ("cifar10", ["model.dim=64", "pretrain.batch_size=64",
                           "data.labeled.train.max_rows=4000",
                           "data.labeled.validation.max_rows=2000", *SMALL_FT]),
    "gan": ("cifar10", ["data.labeled.train.max_rows=4000", "data.labeled.validation.max_rows=2000",
                        *SMALL_FT]),
    "clip": ("flickr8k", ["model.dim=64", "model.layers=2", "model.image_size=32",
                          "model.patch_size=4", "data.labeled.train.max_rows=2000",
                          "data.labeled.validation.max_rows=1000", *SMALL_FT]),
    "captioning": ("flickr8k", ["model.dim=64", "model.layers=2", "model.image_size=32",
                                "model.patch_size=4"]),
    "translation": ("multi30k", ["model.dim=64", "model.layers=2", "model.max_len=64",
                                 "tokenizer.vocab_size=2048", "data.labeled.train.max_rows=4000",
                                 "data.labeled.validation.max_rows=200",
                                 "finetune.options.max_new_tokens=32", *SMALL_FT]),
}  # fmt: skip


def _prepare(name: str, data: Path, workdir: Path) -> None:
    for args in PREPARE[name]:
        out = workdir / args[args.index("--out") + 1]
        if out.exists():
            continue
        cmd = RAYPIPE + ["prepare", *(a.format(d=data) for a in args)]
        subprocess.run(cmd, cwd=workdir, check=True)


def _pretrain_figures(tracking_uri: str) -> dict:
    """The newest pretrain run in the store (the one this script just ran)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (pre,) = client.search_runs(
        experiments,
        filter_string="attributes.run_name = 'pretrain'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    # A GAN's headline loss is the generator's; its discriminator's is what must fall.
    key = "train/loss"
    if "train/discriminator_loss" in pre.data.metrics:
        key = "train/discriminator_loss"
    losses = client.get_metric_history(pre.info.run_id, key)
    unit = "tokens" if "perf/tokens_per_s" in pre.data.metrics else "images"
    rates = [m.value for m in client.get_metric_history(pre.info.run_id, f"perf/{unit}_per_s")]
    steady = rates[1:] or rates  # the first window includes start-up
    return {
        "first": losses[0], "last": losses[-1],
        "rate": sum(steady) / len(steady), "unit": unit,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--workdir", default="/tmp/raypipe-acceptance")
    parser.add_argument("--only", default="", help="comma-separated pipelines")
    parser.add_argument("--steps", type=int, default=150, help="pretraining steps per run")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = [n for n in RUNS if not args.only or n in args.only.split(",")]
    rows = []
    for name in names:
        dataset, overrides = RUNS[name]
        _prepare(dataset, Path(args.data).resolve(), workdir)
        if name == "clip":
            _prepare("cifar10", Path(args.data).resolve(), workdir)
        cmd = RAYPIPE + ["run", str(ROOT / "pipelines" / f"{name}.yaml"),
                         "--set", f"storage={workdir / 'runs'}",
                         "--set", f"pretrain.max_steps={args.steps}",
                         "--set", f"pretrain.log_every={max(1, args.steps // 30)}",
                         "--set", f"pretrain.checkpoint_every={args.steps}",
                         *[x for o in overrides for x in ("--set", o)]]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        print(proc.stdout[-2500:], flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], flush=True)
            rows.append((name, "FAILED", seconds))
            continue
        fig = _pretrain_figures(f"sqlite:///{workdir / 'runs' / 'mlflow.db'}")
        lines = [line.strip() for line in proc.stdout.splitlines()]
        best = [line.split()[1] for line in lines if line.startswith("pretrained ")]
        metric = [line.split()[1] for line in lines if line.startswith("best ")]
        fig["finetune"] = f"{metric[0]} {best[0]}" if best else "-"
        rows.append((name, fig, seconds))
    print("\npipeline      loss first -> last (step)        throughput       wall    fine-tuned")
    for name, fig, seconds in rows:
        if fig == "FAILED":
            print(f"{name:13s} FAILED{'':39s}{seconds:6.0f} s")
            continue
        first, last = fig["first"], fig["last"]
        print(f"{name:13s} {first.value:7.4f} (step {first.step:3d}) -> {last.value:7.4f} "
              f"(step {last.step:3d})  {fig['rate']:8.0f} {fig['unit']}/s  {seconds:6.0f} s  "
              f"{fig['finetune']}")  # fmt: skip


if __name__ == "__main__":
    main()
