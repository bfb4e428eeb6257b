"""P3 at scale: the cold start (`raypipe run` process start -> first optimizer step) with the
quickstart's unlabeled data at 1x, 10x and 100x its rows.

The bigger corpora are the quickstart's 20,000 rows repeated (4 shards each, as the quickstart
writes them), so only the amount of data changes. Each scale runs pretraining only, a few
steps, `--repeats` times, the scales interleaved; a fresh storage each run (nothing reused).
Prints the median and range of the first step and of its "first batch" part, per scale.

    python bench/cold_start_scale.py [--scales 1 10 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "pipelines" / "quickstart.yaml"


def scaled(base: Path, scale: int, into: Path) -> Path:
    """The quickstart's unlabeled rows repeated `scale` times, in 4 shards."""
    table = pq.read_table(base)
    big = pa.concat_tables([table] * scale)
    per = -(-big.num_rows // 4)
    into.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        pq.write_table(big.slice(i * per, per), into / f"part-{i}.parquet")
    return into


def cold_start(data: Path, storage: Path) -> tuple[float, dict[str, float]]:
    cmd = [sys.executable, "-m", "raypipe", "run", str(PIPELINE), "--set", "finetune=null",
           "--set", "pretrain.max_steps=5", "--set", "pretrain.log_every=5",
           "--set", f"data.unlabeled.path={data}", "--set", f"storage={storage}"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    line = re.search(r"first step ([\d.]+) s after process start \((.*)\)", out)
    parts = {k: float(v) for k, v in re.findall(r"([a-z ]+?) ([\d.]+)(?:,|$)", line.group(2))}
    return float(line.group(1)), {k.strip(): v for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    base = ROOT / "data" / "quickstart" / "unlabeled"
    if not base.exists():
        sys.exit("run the quickstart once first (it writes data/quickstart)")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {s: scaled(base, s, Path(tmp) / f"x{s}") for s in args.scales}
        seen: dict[int, list[tuple[float, dict]]] = {s: [] for s in args.scales}
        for r in range(args.repeats):
            for s in args.scales:
                total, parts = cold_start(dirs[s], Path(tmp) / f"runs-{s}-{r}")
                seen[s].append((total, parts))
                print(f"{s}x run {r + 1}: first step {total:.1f} s ({parts})", flush=True)
    for s, runs in seen.items():
        totals = [t for t, _ in runs]
        batches = [p.get("first batch", float("nan")) for _, p in runs]
        print(f"{s}x: first step median {statistics.median(totals):.1f} s "
              f"(range {min(totals):.1f}-{max(totals):.1f}); first batch median "
              f"{statistics.median(batches):.1f} s (range {min(batches):.1f}-{max(batches):.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
