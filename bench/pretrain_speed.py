"""P1 step throughput, P2 data wait, P3 cold start, and what Ray's own processes cost.

Pairs, interleaved: `--pairs` rounds, each measuring every configuration once against its own
plain loop, run right before or right after it (the order alternates pair to pair):
  - raypipe: `raypipe run pipelines/quickstart.yaml` with pretraining only, read back from its
    MLflow store (`perf/step_time_s`, `perf/data_wait_share`, `startup/*`), and the CPU seconds
    of every process of its tree by role over the steady window. The configurations
    (`--configs`): the quickstart's data read once on the driver (below the in-memory
    threshold) or a copy above the threshold streamed from its shards, each with the worker
    training in the driver process or in a Ray Train worker process;
  - plain: a hand-written PyTorch loop, the same model, the same pre-tokenized blocks (packed
    by the same code from the same Parquet shards, held in memory), same seed, same torch
    threads as the raypipe worker: forward / backward / clip / fused AdamW / schedule.

A short first run writes the data and warms the page cache. The first `--warmup` steps of each
run are left out. Prints each pair's ratio raypipe/plain, then per configuration the median
and range of the ratios.

    python bench/pretrain_speed.py [--pairs 5] [--steps 300] [--warmup 100] [--configs ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
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


#: The configurations measured: where the data is read, and where the worker trains.
CONFIGS = {
    "driver-read, in the driver": ("driver", True),
    "driver-read, worker process": ("driver", False),
    "streamed, in the driver": ("stream", True),
    "streamed, worker process": ("stream", False),
}


def streamed_copy(base: Path, into: Path) -> Path:
    """The quickstart's unlabeled rows repeated until their text is above the in-memory
    threshold (`CACHE_MAX_BYTES`), in 8 shards: pretraining streams it from the shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raypipe.data.pipelines import CACHE_MAX_BYTES

    table = pq.read_table(base)
    copies = CACHE_MAX_BYTES // max(table.column("text").nbytes, 1) + 2
    big = pa.concat_tables([table] * copies)
    per = -(-big.num_rows // 8)
    into.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        pq.write_table(big.slice(i * per, per), into / f"part-{i}.parquet")
    return into


def raypipe_rate(work: Path, name: str, cfg: tuple[str, bool], stream: Path, args) -> dict:
    """One measured `raypipe run` (pretraining only): its tokens/s after the warm-up, read back
    from the MLflow store, its data wait, cold start, and CPU seconds by role."""
    path, here = cfg
    meter: dict[str, CpuByRole] = {}

    def on_line(pid: int, line: str) -> None:
        if f"pretrain step {args.warmup}/" in line and "cpu" not in meter:
            meter["cpu"] = CpuByRole(pid)
            meter["cpu"].start()
        if f"pretrain step {args.steps}/" in line and "cpu" in meter:
            meter["cpu"].stop()

    sets = {
        "finetune": "null",
        "pretrain.log_every": args.log_every,
        "pretrain.max_steps": args.steps,
        "pretrain.checkpoint_every": args.steps,
        "pretrain.scaling.in_process": str(here).lower(),
        "storage": work / name,
    }
    if path == "stream":
        sets["data.unlabeled.path"] = stream
    rc, out, _ = _raypipe(
        [a for k, v in sets.items() for a in ("--set", f"{k}={v}")], work, on_line
    )
    if rc:
        raise SystemExit(out)
    client, run = _pretrain_run(str(work / name))
    step_times = _history(client, run.info.run_id, "perf/step_time_s", args.warmup)
    waits = _history(client, run.info.run_id, "perf/data_wait_share", args.warmup)
    cpu = meter.get("cpu")
    return {
        "rate": 32 * 64 / (sum(step_times) / len(step_times)),
        "wait": sum(waits) / len(waits),
        "cold": run.data.metrics.get("startup/total_s", float("nan")),
        "cpu": (cpu.by_role(), cpu.seconds) if cpu is not None else None,
    }


def _warm(work: Path, log_every: int) -> tuple[str, list[str], int]:
    """A short first run: writes the data, warms the page cache, leaves a checkpoint whose
    model the plain loop builds, and says how many torch threads the worker got."""
    sets = ["--set", "finetune=null", "--set", f"pretrain.log_every={log_every}",
            "--set", "pretrain.max_steps=25", "--set", f"storage={work}/warm"]  # fmt: skip
    rc, out, _ = _raypipe(sets, work)
    if rc:
        raise SystemExit(out)
    files = sorted(str(p) for p in (work / "data/quickstart/unlabeled").glob("*.parquet"))
    ckpt = str(next((work / "warm").rglob("step-00000025")))
    _, warm_run = _pretrain_run(f"{work}/warm")
    return ckpt, files, int(warm_run.data.params["torch_threads"])


def _report(seen: dict[str, list[tuple[dict, float]]], args) -> None:
    med = statistics.median
    print(f"--- pretrain speed: {args.pairs} interleaved raypipe/plain pairs per configuration, ")
    print(f"    {args.steps} steps each, the first {args.warmup} left out; quickstart model, "
          "batch 32 x 64 tokens")  # fmt: skip
    for name, pairs in seen.items():
        ratios = [r["rate"] / plain for r, plain in pairs]
        print(f"P1 {name}: ratio median {med(ratios):.3f} (range {min(ratios):.3f}-"
              f"{max(ratios):.3f}; pairs {', '.join(f'{x:.3f}' for x in ratios)})")  # fmt: skip
        print(f"   raypipe {med([r['rate'] for r, _ in pairs]):,.0f} tokens/s, plain "
              f"{med([p for _, p in pairs]):,.0f} tokens/s (medians)")  # fmt: skip
        waits = [100 * r["wait"] for r, _ in pairs]
        colds = [r["cold"] for r, _ in pairs]
        print(f"P2 data wait median {med(waits):.2f} % (range {min(waits):.2f}-{max(waits):.2f} %)"
              f"; P3 first step median {med(colds):.1f} s ({min(colds):.1f}-{max(colds):.1f})")  # fmt: skip
        cpu = pairs[-1][0]["cpu"]
        if cpu is not None:
            roles, wall = cpu
            print(
                f"   CPU over the last run's steady window ({wall:.1f} s wall, 2 cores): "
                + ", ".join(f"{k} {100 * v / wall:.0f} %" for k, v in roles.items() if v > 0.5)
            )


def _pair(work, run_name, name, *, plain_first, args, plain, stream) -> tuple[dict, float]:
    """One raypipe run of configuration `name` and one plain loop, in the given order (it
    alternates pair to pair, so neither always has the quieter machine)."""
    ckpt, files, threads = plain

    def plain_rate() -> float:
        time.sleep(5)  # the last run's Ray processes gone
        rate, _ = plain_loop(ckpt, files, steps=args.steps, warmup=args.warmup, threads=threads,
                             seed=0)  # fmt: skip
        return rate

    if plain_first:
        p = plain_rate()
        return raypipe_rate(work, run_name, CONFIGS[name], stream, args), p
    m = raypipe_rate(work, run_name, CONFIGS[name], stream, args)
    return m, plain_rate()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="raypipe-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, files, threads = _warm(work, args.log_every)
    stream = streamed_copy(work / "data/quickstart/unlabeled", work / "streamed")
    seen: dict[str, list[tuple[dict, float]]] = {c: [] for c in args.configs}
    for r in range(args.pairs):
        for i, name in enumerate(args.configs):
            m, p = _pair(work, f"run-{r}-{i}", name, plain_first=(r + i) % 2 == 0, args=args,
                         plain=(ckpt, files, threads), stream=stream)  # fmt: skip
            seen[name].append((m, p))
            print(f"pair {r + 1} {name}: raypipe {m['rate']:,.0f}, plain {p:,.0f} tokens/s, "
                  f"ratio {m['rate'] / p:.3f}", flush=True)  # fmt: skip
    _report(seen, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
