"""The pretraining probe (`pretrain.probe`), run beside pretraining, never in its way.

On the driver, before training: each fine-tuning task's first labeled rows, encoded as
fine-tuning encodes them (`samples`). While training runs: the loop copies the checkpoint of
each probed step (every `probe.every` steps, and the last) into the stage's `probe/` folder;
a thread watches it and probes each new checkpoint with a Ray task, one at a time in step
order (on the worker a warm-up task readied), which reads its weights and fits the probe
(engine/feature_probe.py); the thread logs `probe/<task>/<metric>` on the pretrain run at
that step and deletes the copy. The Ray task asks for no CPU: it is small, and a training
worker or Ray Data holding every CPU must not make it wait (nor it them); the training loop
itself never waits for a probe. With probe.patience the thread also decides when the probe
has stopped improving (`plateau`) and writes STOP_FILE, which the loop looks for at each
checkpoint.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import ray

from raypipe import storage, tracking
from raypipe.config import PipelineConfig, ProbeConfig
from raypipe.data.pipelines import encoded_rows
from raypipe.engine.checkpoint import META_FILE, MODEL_FILE
from raypipe.engine.feature_probe import ProbeSample, probe_checkpoint
from raypipe.plan import make_plan
from raypipe.progress import progress
from raypipe.tasks.base import INPUT_COLUMNS

#: Seconds between looks at the checkpoint directory.
POLL_S = 2.0
#: In the probe directory: written when pretraining should stop (pretrain.probe.patience).
STOP_FILE = "STOP.json"


@dataclass(frozen=True)
class ProbeTask:
    """A fine-tuning task the probe estimates: its name, and its pipeline and files."""

    name: str
    cfg: PipelineConfig  # the task's view (config/tasks.py)
    train: list[str]
    validation: list[str]


def samples(tasks: list[ProbeTask], probe: ProbeConfig, *, tokenizer_json: str | None,
            model_config: dict) -> list[ProbeSample]:  # fmt: skip
    """Each labeled classification or regression task's sample (translation is not probed)."""
    out = []
    for t in tasks:
        plan = make_plan(t.cfg)
        task_cls, f, lab = plan.task, t.cfg.finetune, t.cfg.data.labeled
        if task_cls.data_kind != "labeled":
            continue
        common = {"kind": task_cls.data_kind, "input": plan.finetune_input,
                  "label_dtype": task_cls.label_dtype, "tokenizer_json": tokenizer_json,
                  "max_len": f.max_len, "model_config": model_config,
                  "truncation": f.truncation}  # fmt: skip
        train = encoded_rows(t.train, source=lab.train, rows=probe.train_rows, **common)
        held = encoded_rows(t.validation, source=lab.validation, rows=probe.eval_rows, **common)
        column = INPUT_COLUMNS[plan.finetune_input]
        out.append(ProbeSample(
            t.name, column, f.pool if plan.finetune_input == "text" else "mean",
            train[column], train["label"], held[column], held["label"],
            regression=task_cls.label_dtype != "int64",
        ))  # fmt: skip
    return out


@ray.remote(num_cpus=0)
def _probe(checkpoint: str, found: list[ProbeSample], method: str, k: int, seed: int):
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)  # one core: the training loop keeps the others
    with threadpool_limits(1):  # scikit-learn's BLAS too
        return probe_checkpoint(checkpoint, found, method=method, k=k, seed=seed)


@ray.remote(num_cpus=0)
def _warm_up() -> None:
    """Started with the watcher, before the first step: the worker that will probe imports
    what a probe needs (seconds of CPU) while pretraining is still starting, not mid-run."""
    import sklearn.linear_model  # noqa: F401

    from raypipe.engine import feature_probe  # noqa: F401


def plateau(done: dict[int, dict[str, float]], patience: int, min_delta: float) -> int | None:
    """The probed step after which `patience` probes in a row improved no task's figure on its
    best so far by more than `min_delta` (accuracy up, mse down); None while one still does.
    A failed probe (no figures) neither improves nor counts."""
    best: dict[str, float] = {}
    since = 0
    for step in sorted(done):
        if not done[step]:
            continue
        improved = False
        for key, value in done[step].items():
            sign = -1.0 if key.endswith("/mse") else 1.0
            if key not in best or sign * (value - best[key]) > min_delta:
                best[key], improved = value, True
        since = 0 if improved else since + 1
        if since >= patience:
            return step
    return None


class Watcher:
    """Probes each checkpoint that appears in `directory`, logging on `run`; with
    probe.patience, writes `stop_file` once the probe has stopped improving."""

    def __init__(self, directory: str, prefix: str, probe: ProbeConfig,
                 found: list[ProbeSample], run: tracking.RunRef | None, seed: int,
                 stop_file: str | None = None):  # fmt: skip
        self.dir, self.prefix, self.probe, self.stop_file = directory, prefix, probe, stop_file
        self.stopped_at: int | None = None  # the probed step that stopped pretraining
        self.samples, self.run, self.seed = ray.put(found), run, seed
        self.pending: dict[int, tuple[str, ray.ObjectRef]] = {}
        self.done: dict[int, dict[str, float]] = {}
        self._warm: ray.ObjectRef | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="raypipe-probe", daemon=True)

    def start(self) -> Watcher:
        self._warm = _warm_up.remote()
        self._thread.start()
        return self

    def _ready(self) -> list[tuple[int, str]]:
        """(step, checkpoint) of each whole checkpoint now in storage not yet probed."""
        out = []
        for meta in storage.list_files(self.dir, META_FILE):
            path = meta.rsplit("/", 1)[0]
            name = path.rsplit("/", 1)[-1]
            if not name.startswith(self.prefix):
                continue
            step = int(name[len(self.prefix) :])
            if (step not in self.done and step not in self.pending
                    and storage.is_file(storage.join(path, MODEL_FILE))):  # fmt: skip
                out.append((step, path))
        return sorted(out)

    def _collect(self, timeout: float) -> None:
        if not self.pending:
            return
        refs = [ref for _, ref in self.pending.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for step in [s for s, (_, r) in self.pending.items() if r in ready]:
            path, ref = self.pending.pop(step)
            try:
                self.done[step] = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a probe never stops pretraining
                progress(f"probe at step {step} failed ({type(e).__name__}: {e}); skipped")
                self.done[step] = {}
                continue
            finally:
                storage.delete_dir(path)  # probed (or not to be): the copy goes
            if self.run is not None:
                tracking.RunLogger(self.run).log_metrics(self.done[step], step)
        self._maybe_stop()

    def _maybe_stop(self) -> None:
        if self.stop_file is None or self.stopped_at is not None or self.probe.patience is None:
            return
        found = plateau(self.done, self.probe.patience, self.probe.min_delta)
        if found is not None:
            self.stopped_at = found
            storage.write_text(self.stop_file, json.dumps({"probe_step": found}))
            progress(f"probe: no task improved in the last {self.probe.patience} probe(s) "
                     f"(to step {found}); pretraining stops at its next checkpoint")  # fmt: skip

    def _scan(self) -> bool:
        """Start the probe of the earliest checkpoint waiting, unless one is running: one at
        a time, in step order, so one warm worker probes them all (probes started together
        would each start a Ray worker, importing torch, on the CPUs training uses) and the
        figures arrive in order. True if one is running now."""
        warming = self._warm is not None and not ray.wait([self._warm], timeout=0)[0]
        if not self.pending and not warming:  # after the warm-up: its worker probes
            self._warm = None
            for step, path in self._ready()[:1]:
                p = self.probe
                ref = _probe.remote(path, self.samples, p.method, p.k, self.seed)
                self.pending[step] = (path, ref)
        return bool(self.pending)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                if self._scan():
                    self._collect(timeout=POLL_S)
                    continue
            except Exception as e:  # noqa: BLE001 - storage hiccup: look again later
                progress(f"probe: could not read {self.dir} ({type(e).__name__}); trying again")
            self._stop.wait(POLL_S)

    def finish(self) -> dict[int, dict[str, float]]:
        """After training: probe what is left (the last checkpoint among them), waiting for
        each, and return {step: metrics}."""
        self._stop.set()
        self._thread.join()
        if self._warm is not None:
            ray.wait([self._warm])
        while self._scan():
            self._collect(timeout=None)
        return dict(sorted(self.done.items()))
