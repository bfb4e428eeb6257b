"""What `pretrain.probe` costs pretraining: throughput with and without it, side by side.

Runs the text recipe (`pipelines/sst2_label_efficiency.yaml` on SST-2, shortened: pretraining
of `--steps` steps, a checkpoint and a probe every quarter of them, one small fine-tuning trial)
as `raypipe run`, in interleaved pairs (probe off/on, then on/off, ...), each in a fresh storage.
A run's throughput is pretraining's steps per second over its logged windows after the first
(the first holds the start-up): 1 / mean(perf/step_time_s), wall time between log points, so
the checkpoint copies the probe reads and the probe's own CPU time count. Prints each pair's
ratio (with / without) and their median and range. Target: the median >= 0.97 (<= 3 %).

    python bench/probe_overhead.py [--data ../shared/data] [--pairs 5] [--steps 600]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from acceptance import RAYPIPE, ROOT, _prepare


def _rate(storage: Path) -> float:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    (pre,) = client.search_runs(experiments, filter_string="attributes.run_name = 'pretrain'")
    times = [m.value for m in client.get_metric_history(pre.info.run_id, "perf/step_time_s")]
    steady = times[1:] or times
    return 1.0 / statistics.mean(steady)


def _run(workdir: Path, steps: int, probe: bool, i: int) -> float:
    storage = workdir / f"runs-{i}-{'probe' if probe else 'plain'}"
    shutil.rmtree(storage, ignore_errors=True)
    quarter = steps // 4
    sets = [f"storage={storage}", f"pretrain.max_steps={steps}",
            f"pretrain.checkpoint_every={quarter}", f"pretrain.log_every={quarter // 3}",
            "finetune.label_fractions=[0.01]", "finetune.repeats=1",
            "finetune.compare_scratch=false", "finetune.baseline=none",
            "finetune.sweep.space={lr: {grid: [3.0e-3]}}"]  # fmt: skip
    if probe:
        sets.append(f"pretrain.probe.every={quarter}")
    cmd = RAYPIPE + ["run", str(ROOT / "pipelines" / "sst2_label_efficiency.yaml"),
                     *[x for s in sets for x in ("--set", s)]]  # fmt: skip
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-2000:])
        sys.exit(f"run failed (exit {proc.returncode})")
    if probe and "probe sst2-label-efficiency/accuracy" not in proc.stdout:
        sys.exit("the probe did not report:\n" + proc.stdout[-2000:])
    rate = _rate(storage)
    shutil.rmtree(storage, ignore_errors=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--workdir", default="/tmp/raypipe-probe-overhead")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _prepare("sst2", Path(args.data).resolve(), workdir)
    ratios = []
    for i in range(args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        rates = {probe: _run(workdir, args.steps, probe, i) for probe in order}
        ratios.append(rates[True] / rates[False])
        print(f"pair {i + 1}: plain {rates[False]:.2f} steps/s, with probe {rates[True]:.2f} "
              f"steps/s, ratio {ratios[-1]:.3f}", flush=True)  # fmt: skip
    print(f"median ratio {statistics.median(ratios):.3f} (range {min(ratios):.3f}-"
          f"{max(ratios):.3f}) over {len(ratios)} pairs; target >= 0.97")  # fmt: skip


if __name__ == "__main__":
    main()
