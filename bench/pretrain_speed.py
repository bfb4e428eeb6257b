"""P1 step throughput, P2 data wait, P3 cold start, and what Ray's own processes cost.

One run, side by side:
  1. `raypipe run pipelines/quickstart.yaml` with pretraining only (a first, short run writes the
     data and warms the page cache; its cold start is reported too), then the same short run
     with its one worker in a Ray Train worker process instead of the driver (its cold start);
  2. a plain PyTorch loop: the same model, the same pre-tokenized blocks (packed by the same
     code from the same Parquet shards, held in memory), same seed, same torch threads as the
     raypipe worker, a hand-written forward / backward / clip / AdamW / schedule step;
  3. the measured raypipe run: its throughput, step time and data wait are read back from the
     MLflow store (the `perf/*` metrics every run logs), its cold start from `startup/*`;
     the CPU seconds of every process of the run's tree, grouped by role, over the steady
     window;
  4. the plain loop again. The plain rate is the better of 2 and 4 (the machine is shared and
     noisy; the better run is the fairer baseline).

Warm-up (the first `--warmup` steps) is left out of both. Prints ratios, not single timings.

    python bench/pretrain_speed.py [--steps 400] [--warmup 100] [--log-every 25]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from procs import cmdline, cpu_seconds, descendants

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "pipelines" / "quickstart.yaml"

#: Process roles, by what Ray names the process (`ps` command line), first match wins.
ROLES = [
    ("train worker", ("RayTrainWorker",)),
    ("train controller", ("TrainController", "TrainControllerActor")),
    ("ray data tasks", ("ReadParquet", "MapBatches", "SplitCoordinator", "ray::_", "Read")),
    ("raylet", ("raylet",)),
    ("gcs", ("gcs_server",)),
    ("dashboard + agents", ("dashboard", "agent", "log_monitor", "monitor.py")),
    ("driver (raypipe run)", ("raypipe",)),
]


def _role(cmdline: str) -> str:
    for role, needles in ROLES:
        if any(n in cmdline for n in needles):
            return role
    if cmdline.startswith("ray::"):
        return cmdline.split()[0]  # e.g. ray::IDLE, ray::PlacementGroupCleaner
    return "other"


def _raypipe(args: list[str], cwd: Path, on_line=None) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "raypipe", "run", str(PIPELINE), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env["RAYPIPE_PROGRESS_EVERY_S"] = "0"  # every status line: the CPU window starts on one
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if on_line is not None:
            on_line(proc.pid, line)
    proc.wait()
    return proc.returncode, "".join(lines), time.perf_counter() - t0


class CpuByRole:
    """CPU seconds of a process tree per role between `start()` and `stop()`, from /proc
    (sampled every 0.5 s; a process that ends inside the window counts up to its last sample)."""

    def __init__(self, root: int):
        self.root = root
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.role: dict[int, str] = {}
        self.running = False
        self.seconds = 0.0

    def _sample(self) -> None:
        for pid in descendants(self.root):
            cpu = cpu_seconds(pid)
            if cpu is None:
                continue
            if pid not in self.role:
                self.role[pid] = _role(cmdline(pid))
            self.first.setdefault(pid, cpu)
            self.last[pid] = cpu

    def start(self) -> None:
        self.running, self.t0 = True, time.perf_counter()
        self._sample()
        self.first = dict(self.last)  # processes already running count from now

        def loop():
            while self.running:
                self._sample()
                time.sleep(0.5)

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._sample()
        self.running = False
        self.seconds = time.perf_counter() - self.t0

    def by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, cpu in self.last.items():
            role = self.role.get(pid, "other")
            out[role] = out.get(role, 0.0) + cpu - self.first.get(pid, 0.0)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _pretrain_run(storage: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db")
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([exp.experiment_id], "tags.`raypipe.stage` = 'pretrain'")
    return client, runs[0]


def _history(client, run_id: str, key: str, after: int) -> list[float]:
    return [m.value for m in client.get_metric_history(run_id, key) if m.step > after]


def plain_loop(ckpt: str, files: list[str], *, steps: int, warmup: int, threads: int, seed: int):
    """Tokens/s of a hand-written loop over in-memory blocks, steps after `warmup`."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F

    from raypipe.data.text import pack_blocks
    from raypipe.engine.checkpoint import read_spec, read_tokenizer
    from raypipe.models import build_model
    from raypipe.objectives.losses import IGNORE

    spec = read_spec(ckpt)
    cfg = spec["config"]
    block = cfg["max_len"] + 1
    batch_size, lr, clip = 32, 3.0e-3, 1.0
    tokenizer = read_tokenizer(ckpt)
    blocks = []
    for f in files:  # the same packing, per 1024-row batch, as the Ray Data transform
        table = pq.read_table(f, columns=["text"])
        for at in range(0, table.num_rows, 1024):
            part = {"text": table.column("text").slice(at, 1024).to_numpy(zero_copy_only=False)}
            blocks.append(
                pack_blocks(part, tokenizer_json=tokenizer, text_column="text", block_size=block)[
                    "input_ids"
                ]
            )
    data = torch.from_numpy(np.concatenate(blocks)).long()
    need = steps * batch_size
    data = data.repeat((need + len(data) - 1) // len(data), 1)[:need]

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_model({"type": spec["type"], "config": cfg})
    model.train()
    # The fastest AdamW PyTorch has here (one fused kernel), as raypipe uses.
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    t_start = None
    for step in range(steps):
        if step == warmup:
            t_start = time.perf_counter()
        ids = data[step * batch_size : (step + 1) * batch_size]
        logits = model.lm_logits(model(ids[:, :-1]))
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
    elapsed = time.perf_counter() - t_start
    return (steps - warmup) * batch_size * (block - 1) / elapsed, elapsed / (steps - warmup)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="raypipe-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["--set", "finetune=null", "--set", f"pretrain.log_every={args.log_every}"]

    # 1. data + page cache; a first cold start (its checks include writing the data)
    rc, out, wall = _raypipe(
        [*common, "--set", "pretrain.max_steps=25", "--set", f"storage={work}/warm"], work
    )
    if rc:
        print(out)
        return rc
    first_cold = re.search(r"first step ([\d.]+) s", out).group(1)
    # 1b. the same short run with its worker in a Ray Train worker process, not in the driver
    rc, out, _ = _raypipe(
        [
            *common,
            "--set",
            "pretrain.max_steps=25",
            "--set",
            "pretrain.scaling.in_process=false",
            "--set",
            f"storage={work}/worker",
        ],
        work,
    )
    if rc:
        print(out)
        return rc
    worker_cold = re.search(r"first step .*", out).group(0)
    files = sorted(str(p) for p in (work / "data/quickstart/unlabeled").glob("*.parquet"))
    ckpt = next((work / "warm").rglob("step-00000025"))

    # 2. plain loop (threads: what the raypipe worker uses, read back after the first run),
    # once the first run's Ray processes have gone
    time.sleep(10)
    client, warm_run = _pretrain_run(f"{work}/warm")
    threads = int(warm_run.data.params["torch_threads"])
    plain_a, _ = plain_loop(
        str(ckpt), files, steps=args.steps, warmup=args.warmup, threads=threads, seed=0
    )

    # 3. raypipe, measured; CPU by role over the steady window (after the warm-up step's line)
    meter: dict[str, CpuByRole] = {}

    def on_line(pid: int, line: str) -> None:
        if f"pretrain step {args.warmup}/" in line and "cpu" not in meter:
            meter["cpu"] = CpuByRole(pid)
            meter["cpu"].start()
        if f"pretrain step {args.steps}/" in line and "cpu" in meter:
            meter["cpu"].stop()

    rc, out, wall = _raypipe(
        [
            *common,
            "--set",
            f"pretrain.max_steps={args.steps}",
            "--set",
            f"pretrain.checkpoint_every={args.steps}",
            "--set",
            f"storage={work}/measured",
        ],
        work,
        on_line,
    )
    if rc:
        print(out)
        return rc
    client, run = _pretrain_run(f"{work}/measured")
    step_times = _history(client, run.info.run_id, "perf/step_time_s", args.warmup)
    waits = _history(client, run.info.run_id, "perf/data_wait_share", args.warmup)
    rates = _history(client, run.info.run_id, "perf/tokens_per_s", args.warmup)
    startup = {
        k.removeprefix("startup/").removesuffix("_s"): v
        for k, v in run.data.metrics.items()
        if k.startswith("startup/")
    }
    tokens_per_step = 32 * 64
    raypipe_rate = tokens_per_step / (sum(step_times) / len(step_times))

    # 4. plain loop again
    time.sleep(10)
    plain_b, plain_step = plain_loop(
        str(ckpt), files, steps=args.steps, warmup=args.warmup, threads=threads, seed=0
    )
    plain = max(plain_a, plain_b)  # the better of the two: the baseline at its best

    print(f"--- pretrain speed (workdir {work}; torch threads {threads}; {args.steps} steps, ")
    print(f"    the first {args.warmup} left out; quickstart model, batch 32 x 64 tokens)")
    print(f"P1 raypipe {raypipe_rate:,.0f} tokens/s (windows {min(rates):,.0f}-{max(rates):,.0f})")
    print(f"   plain   {plain:,.0f} tokens/s (before {plain_a:,.0f}, after {plain_b:,.0f})")
    print(f"   ratio   {raypipe_rate / plain:.3f}")
    print(
        f"P2 data wait {100 * sum(waits) / len(waits):.2f} % of step time "
        f"(windows {100 * min(waits):.2f}-{100 * max(waits):.2f} %), from MLflow perf/data_wait_share"
    )
    total = startup.pop("total")
    parts = ", ".join(f"{k} {v:.1f}" for k, v in startup.items())
    print(
        f"P3 cold start {total:.1f} s to the first step ({parts}); first run (writes data) {first_cold} s"
    )
    print(f"   with a Ray Train worker process (in_process: false): {worker_cold}")
    cpu = meter.get("cpu")
    if cpu is not None:
        print(f"CPU seconds over the steady window ({cpu.seconds:.1f} s wall, 2 cores):")
        for role, sec in cpu.by_role().items():
            print(f"   {role:22s} {sec:7.1f} s  ({100 * sec / cpu.seconds:5.1f} % of one core)")
    print(f"whole run {wall:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
