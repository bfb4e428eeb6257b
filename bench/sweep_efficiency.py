"""P4: an ASHA sweep against the same trials run to their full budget.

One run: the quickstart pipeline pretrains once, then the same fine-tuning sweep runs twice from
that checkpoint (pretrained arm only), once with `scheduler: fifo` (every trial runs all its
epochs) and once with `scheduler: asha`. Random search is seeded, so both sweeps sample the same
settings. From each sweep's MLflow store: compute spent (trial-epochs, counted from the epochs
each trial logged) and the best validation metric any trial reached.

    python bench/sweep_efficiency.py [--trials 12] [--epochs 6] [--reduction-factor 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "pipelines" / "quickstart.yaml"


def _raypipe(args: list[str], cwd: Path) -> None:
    cmd = [sys.executable, "-m", "raypipe", "run", str(PIPELINE), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        print(done.stdout, done.stderr, sep="\n")
        raise SystemExit(done.returncode)


def _trials(storage: Path, metric: str) -> tuple[list[list[float]], float]:
    """Each trial's validation metric, epoch by epoch; the pipeline's wall time."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db")
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([exp.experiment_id], "tags.`raypipe.kind` = 'trial'")
    out = []
    for run in runs:
        history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
        out.append([m.value for m in history])
    (pipeline,) = client.search_runs([exp.experiment_id], "tags.`raypipe.kind` = 'pipeline'")
    return out, pipeline.data.metrics["pipeline/seconds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--grace-period", type=int, default=1)
    parser.add_argument("--reduction-factor", type=float, default=3.0)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="raypipe-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    metric = "val/accuracy"

    if not (work / "pretrain").is_dir():
        _raypipe(["--set", "finetune=null", "--set", f"storage={work}/pretrain"], work)
    ckpt = max((work / "pretrain").rglob("step-*/model.json")).parent
    sweep = [
        "--set",
        "pretrain=null",
        "--set",
        f"finetune.init={ckpt}",
        "--set",
        "finetune.compare_scratch=false",
        "--set",
        f"finetune.epochs={args.epochs}",
        "--set",
        f"finetune.sweep.num_samples={args.trials}",
        "--set",
        f"finetune.sweep.grace_period={args.grace_period}",
        "--set",
        f"finetune.sweep.reduction_factor={args.reduction_factor}",
    ]
    results = {}
    for scheduler in ("fifo", "asha"):
        storage = work / scheduler
        done = work / f"{scheduler}.done.json"  # a finished sweep in this workdir is kept
        if not done.is_file():
            shutil.rmtree(storage, ignore_errors=True)
            _raypipe(
                [
                    *sweep,
                    "--set",
                    f"finetune.sweep.scheduler={scheduler}",
                    "--set",
                    f"storage={storage}",
                ],
                work,
            )
            done.write_text("{}")
        trials, wall = _trials(storage, metric)
        results[scheduler] = {
            "wall": wall,
            "trials": len(trials),
            "epochs": sum(len(t) for t in trials),
            "best": max(max(t) for t in trials if t),
            "per_trial": sorted(len(t) for t in trials),
        }

    full, asha = results["fifo"], results["asha"]
    print(
        f"--- sweep efficiency (workdir {work}): {args.trials} trials x {args.epochs} epochs, "
        f"ASHA grace {args.grace_period}, reduction factor {args.reduction_factor:g}; {metric}"
    )
    for name, r in (("full budget", full), ("asha", asha)):
        print(
            f"{name:12s} {r['epochs']:3d} trial-epochs over {r['trials']} trials "
            f"(epochs per trial {r['per_trial']}), best {r['best']:.4f}, "
            f"pipeline {r['wall']:.0f} s"
        )
    print(f"compute ratio  {asha['epochs'] / full['epochs']:.3f} (ASHA / full)")
    print(f"best metric    {asha['best'] / full['best']:.4f} of the full-budget best")
    print(f"wall ratio     {asha['wall'] / full['wall']:.3f} (the pipelines' pipeline/seconds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
