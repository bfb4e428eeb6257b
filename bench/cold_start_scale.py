"""P3 at scale: the cold start (`raypipe run` process start -> first optimizer step) with the
quickstart's unlabeled data at 1x, 10x and 100x its rows.

The bigger corpora are the quickstart's 20,000 rows repeated (4 shards each, as the quickstart
writes them), so only the amount of data changes. Each scale runs pretraining only, a few
steps, `--repeats` times, the scales interleaved; a fresh storage each run (nothing reused).
Prints the median and range of the first step and of its "first batch" part, per scale.

With `--against-block-mib N`, each run is paired with one whose streamed data comes in blocks of
N MiB (Ray Data's 128 MiB default was the setting before STREAM_BLOCK_BYTES): the constant is
set in that run's own process (the bench starts raypipe through `-c`), nothing else changes.
The pair's order alternates. Prints the median and range of the paired differences.

    python bench/cold_start_scale.py [--scales 1 10 100] [--repeats 3] [--against-block-mib 128]
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


#: `raypipe run` with streamed data in blocks of the given bytes (argv[1]), the rest as usual.
WITH_BLOCK = (
    "import sys; import raypipe.data.pipelines as p; p.STREAM_BLOCK_BYTES = int(sys.argv.pop(1)); "
    "from raypipe.cli import main; raise SystemExit(main(sys.argv[1:]))"
)


def cold_start(data: Path, storage: Path, block_bytes: int | None = None) -> tuple[float, dict]:
    start = ["-m", "raypipe"] if block_bytes is None else ["-c", WITH_BLOCK, str(block_bytes)]
    cmd = [sys.executable, *start, "run", str(PIPELINE), "--set", "finetune=null",
           "--set", "pretrain.max_steps=5", "--set", "pretrain.log_every=5",
           "--set", f"data.unlabeled.path={data}", "--set", f"storage={storage}"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    line = re.search(r"first step ([\d.]+) s after process start \((.*)\)", out)
    parts = {k: float(v) for k, v in re.findall(r"([a-z ]+?) ([\d.]+)(?:,|$)", line.group(2))}
    return float(line.group(1)), {k.strip(): v for k, v in parts.items()}


def _runs(dirs: dict, tmp: Path, args) -> tuple[dict, dict]:
    """Every scale `--repeats` times, interleaved: {scale: [(first step, parts)]}, and with
    `--against-block-mib` the paired runs' too, each pair's order alternating."""
    against = args.against_block_mib * 2**20 if args.against_block_mib else None
    seen = {s: [] for s in args.scales}
    paired = {s: [] for s in args.scales}
    for r in range(args.repeats):
        for i, s in enumerate(args.scales):
            ours = lambda s=s, r=r: cold_start(dirs[s], tmp / f"runs-{s}-{r}")  # noqa: E731
            theirs = lambda s=s, r=r: cold_start(dirs[s], tmp / f"base-{s}-{r}", against)  # noqa: E731
            if against is None:
                seen[s].append(ours())
            elif (r + i) % 2 == 0:
                seen[s].append(ours())
                paired[s].append(theirs())
            else:
                paired[s].append(theirs())
                seen[s].append(ours())
            print(f"{s}x run {r + 1}: first step {seen[s][-1][0]:.1f} s ({seen[s][-1][1]})"
                  + (f"; {args.against_block_mib} MiB blocks {paired[s][-1][0]:.1f} s "
                     f"({paired[s][-1][1]})" if against else ""), flush=True)  # fmt: skip
    return seen, paired


def _summary(label: str, runs: list) -> str:
    totals = [t for t, _ in runs]
    batches = [p.get("first batch", float("nan")) for _, p in runs]
    med = statistics.median
    return (f"{label}: first step median {med(totals):.1f} s (range {min(totals):.1f}-"
            f"{max(totals):.1f}); first batch median {med(batches):.1f} s "
            f"(range {min(batches):.1f}-{max(batches):.1f})")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--against-block-mib", type=int, default=None)
    args = ap.parse_args()
    base = ROOT / "data" / "quickstart" / "unlabeled"
    if not base.exists():
        sys.exit("run the quickstart once first (it writes data/quickstart)")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {s: scaled(base, s, Path(tmp) / f"x{s}") for s in args.scales}
        seen, paired = _runs(dirs, Path(tmp), args)
    for s in args.scales:
        print(_summary(f"{s}x", seen[s]))
        if paired[s]:
            print(_summary(f"{s}x, {args.against_block_mib} MiB blocks", paired[s]))
            diffs = [b[0] - a[0] for a, b in zip(seen[s], paired[s], strict=True)]
            print(f"   paired difference ({args.against_block_mib} MiB - ours): median "
                  f"{statistics.median(diffs):.1f} s (range {min(diffs):.1f}-{max(diffs):.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
