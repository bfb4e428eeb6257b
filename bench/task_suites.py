"""Pretrain once, fine-tune many, on real data: the shipped several-task pipelines.

Prepares the data from ../shared/data with `raypipe prepare`, runs `pipelines/text_tasks.yaml`
(SST-2, MR, Subj, SST-5 as regression) and/or `pipelines/image_tasks.yaml` (CIFAR-10, vehicle or
animal) as a user would (`raypipe run`, one process each; a rerun in the same --workdir reuses
every finished stage), and prints, read back from the pipeline run in MLflow, each task's
downstream metric against the pretraining step fine-tuning started from (its checkpoint curve,
scratch at step 0) per label fraction, with the paired-t interval of the gap, and the
scoreboard's mean gain.

    python bench/task_suites.py [--data ../shared/data] [--only text,image] [--workdir DIR]
                                [--storage DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from acceptance import RAYPIPE, ROOT, _prepare

#: suite -> (the datasets it prepares, its pipeline)
SUITES = {
    "text": (("sst2", "mr", "subj", "sst5"), "text_tasks"),
    "image": (("cifar10", "cifar-vehicles"), "image_tasks"),
}


def _artifact(client, run_id: str, name: str, workdir: Path):
    return json.loads(Path(client.download_artifacts(run_id, name, str(workdir))).read_text())


def _print_suite(uri: str, run_id: str, workdir: Path, seconds: float, name: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    board = _artifact(client, run_id, "scoreboard.json", workdir)
    print(f"\n### {name}: {seconds / 60:.1f} min wall\n")
    print("| task | metric | labels | step | value (mean ± sd) | gap | gap 95 % CI (paired t) |")
    print("|---|---|---|---|---|---|---|")
    for task in sorted(
        {r["task"] for r in board["rows"]}, key=[r["task"] for r in board["rows"]].index
    ):
        metric = next(r["metric"] for r in board["rows"] if r["task"] == task)
        for p in _artifact(client, run_id, f"checkpoint_curve-{task}.json", workdir):
            gap = f"{p['gap']:+.4f}" if p.get("gap") is not None else "-"
            ci = (f"[{p['gap_low']:+.4f}, {p['gap_high']:+.4f}]" if "gap_low" in p
                  else "-")  # fmt: skip
            print(f"| {task} | {metric} | {p['fraction']:.0%} | {p['step']} | "
                  f"{p['value']:.4f} ± {p['sd']:.4f} | {gap} | {ci} |")  # fmt: skip
    print("\n| task | labels | pretrained | scratch | gain | gain 95 % CI | baseline |")
    print("|---|---|---|---|---|---|---|")
    for r in board["rows"]:
        cells = [f"{r[k]:.4f}" if r.get(k) is not None else "-"
                 for k in ("pretrained", "scratch")]  # fmt: skip
        gain = f"{r['gain']:+.4f}" if r.get("gain") is not None else "-"
        ci = f"[{r['gain_low']:+.4f}, {r['gain_high']:+.4f}]" if "gain_low" in r else "-"
        base = f"{r['baseline']:.4f}" if r.get("baseline") is not None else "-"
        print(f"| {r['task']} | {r['fraction']:.0%} | {cells[0]} | {cells[1]} | {gain} | {ci} | "
              f"{base} |")  # fmt: skip
    for m in board["mean_gain"]:
        print(f"\nmean gain in {m['metric']} over {m['tasks']} task(s) at {m['fraction']:.0%}: "
              f"{m['gain']:+.4f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--workdir", default="/tmp/raypipe-task-suites")
    parser.add_argument("--storage", default=None, help="default: WORKDIR/runs")
    parser.add_argument("--only", default="text,image", help=f"comma-separated: {','.join(SUITES)}")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for suite, (datasets, pipeline) in SUITES.items():
        if suite not in args.only.split(","):
            continue
        for dataset in datasets:
            _prepare(dataset, Path(args.data).resolve(), workdir)
        cmd = RAYPIPE + ["run", str(ROOT / "pipelines" / f"{pipeline}.yaml"),
                         "--set", f"storage={args.storage or workdir / 'runs'}"]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        print(proc.stdout[-6000:], flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], flush=True)
            sys.exit(f"{pipeline} failed (exit {proc.returncode})")
        (line,) = [x for x in proc.stdout.splitlines() if x.strip().startswith("mlflow ")]
        run_id, uri = line.split()[2], line.split(" in ", 1)[1].strip()
        _print_suite(uri, run_id, workdir / "artifacts" / run_id, seconds, pipeline)


if __name__ == "__main__":
    main()
