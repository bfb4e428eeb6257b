"""The label-efficiency acceptance runs on real data: does pretraining pay with few labels?

Prepares the datasets from ../shared/data with `raypipe prepare`, runs the label-efficiency
pipelines as a user would (`raypipe run`, one process each), and prints each run's wall time
and its label-efficiency table (read back from the pipeline run in MLflow) as Markdown. The
studies: `sst2`, `mr`, `subj`, `cr` (the text recipe, `pipelines/sst2_label_efficiency.yaml`,
pointed at each task's data), `sst2-transformer` (its transformer variant) and `cifar10`.

    python bench/label_efficiency.py [--data ../shared/data] [--only sst2,mr,subj,cr]
                                     [--workdir DIR] [--set KEY=VALUE ...]

Figures are on each pipeline's test split (which picks nothing), the mean over the repeats of
each arm's best settings, with the gap's 95 % paired-t interval and the classical baseline on
the same rows. The target: at 1 % of the labels, pretrained beats scratch by at least 5 points.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from acceptance import RAYPIPE, ROOT, _prepare


def _sentences(name: str) -> list[str]:
    """The text recipe's pipeline pointed at a sentence task prepared into data/NAME."""
    return [
        f"name={name}-label-efficiency",
        f"data.unlabeled.path=data/{name}/train",
        *(f"data.labeled.{s}.path=data/{name}/{s}" for s in ("train", "validation", "test")),
    ]


#: study -> (the data it prepares, its pipeline, overrides)
RUNS = {
    "sst2": ("sst2", "sst2_label_efficiency", []),
    **{n: (n, "sst2_label_efficiency", _sentences(n)) for n in ("mr", "subj", "cr")},
    "sst2-transformer": ("sst2", "sst2_transformer_label_efficiency", []),
    "cifar10": ("cifar10", "cifar10_label_efficiency", []),
}
TARGET_POINTS = 5.0


def _table(tracking_uri: str, run_id: str, workdir: Path) -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    path = client.download_artifacts(run_id, "label_efficiency.json", str(workdir))
    return json.loads(Path(path).read_text())


def _cell(row: dict, arm: str) -> str:
    """mean ± sd over the repeats (the mean alone without them)."""
    sd = row.get(f"{arm}_sd")
    return f"{row[arm]:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--workdir", default="/tmp/raypipe-label-efficiency")
    parser.add_argument("--only", default="", help=f"comma-separated: {','.join(RUNS)}")
    parser.add_argument("--set", action="append", default=[], help="override for every run")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for study, (dataset, pipeline, extra) in RUNS.items():
        if args.only and study not in args.only.split(","):
            continue
        _prepare(dataset, Path(args.data).resolve(), workdir)
        cmd = RAYPIPE + ["run", str(ROOT / "pipelines" / f"{pipeline}.yaml"),
                         "--set", f"storage={workdir / 'runs'}",
                         *[x for o in extra for x in ("--set", o)],
                         *[x for o in args.set for x in ("--set", o)]]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        print(proc.stdout[-3000:], flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], flush=True)
            sys.exit(f"{pipeline} failed (exit {proc.returncode})")
        (run_line,) = [x for x in proc.stdout.splitlines() if x.strip().startswith("mlflow ")]
        run_id, uri = run_line.split()[2], run_line.split(" in ", 1)[1].strip()
        results.append((study, seconds, _table(uri, run_id, workdir / "artifacts" / run_id)))

    for pipeline, seconds, table in results:
        print(f"\n### {pipeline}: {seconds / 60:.1f} min wall\n")
        print("| labels | rows | pretrained | scratch | gap (points) | gap 95 % CI (paired t) "
              "| baseline | majority class |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for row in table:
            gap = 100 * (row["pretrained"] - row["scratch"])
            ci = (f"[{100 * row['gap_low']:+.1f}, {100 * row['gap_high']:+.1f}]"
                  if "gap_low" in row else "-")  # fmt: skip
            base, chance = (f"{row[k]:.4f}" if row.get(k) is not None else "-"
                            for k in ("baseline", "majority"))  # fmt: skip
            print(f"| {row['fraction']:.0%} | {row['rows']:,} | {_cell(row, 'pretrained')} | "
                  f"{_cell(row, 'scratch')} | {gap:+.1f} | {ci} | {base} | {chance} |")  # fmt: skip
        low = table[0]
        gap = 100 * (low["pretrained"] - low["scratch"])
        verdict = "met" if gap >= TARGET_POINTS else "not met"
        print(f"\nat {low['fraction']:.0%} of the labels: {gap:+.1f} points "
              f"(target +{TARGET_POINTS:.0f}): {verdict}")  # fmt: skip


if __name__ == "__main__":
    main()
