"""Wall time and peak memory of `raypipe run pipelines/quickstart.yaml`, whole process tree.

Memory is the peak of the summed PSS (proportional set size) of the CLI process and all its
descendants (Ray's GCS, raylet, dashboard, workers), sampled every 0.5 s from /proc. PSS
splits shared pages between the processes that map them, so the sum does not double count
torch's libraries loaded in every worker. Linux only.

    python bench/quickstart_footprint.py [--workdir DIR] [-- extra raypipe args]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from procs import descendants

ROOT = Path(__file__).resolve().parent.parent


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_bytes(root: int) -> tuple[int, int]:
    pids = descendants(root)
    return sum(_pss_kib(pid) for pid in pids) * 1024, len(pids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="run here (default: a fresh temp dir)")
    parser.add_argument("extra", nargs="*", help="extra arguments for `raypipe run`")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="raypipe-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "raypipe", "run", str(ROOT / "pipelines" / "quickstart.yaml")]
    cmd += args.extra
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}

    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, text=True)
    peak = {"bytes": 0, "procs": 0}

    def sample() -> None:
        while proc.poll() is None:
            used, count = tree_pss_bytes(proc.pid)
            if used > peak["bytes"]:
                peak.update(bytes=used, procs=count)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read()
    proc.wait()
    wall = time.perf_counter() - started
    sampler.join(timeout=2)
    print(output, end="")
    print(f"--- quickstart footprint (workdir {workdir})")
    print(f"exit code        {proc.returncode}")
    print(f"wall time        {wall:.1f} s")
    print(f"peak memory      {peak['bytes'] / 2**30:.2f} GiB PSS over {peak['procs']} processes")
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
