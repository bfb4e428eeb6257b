"""Failures, for real: a training worker that dies, a NaN, a crashing trial, a killed driver.

Faults are injected through RAYPIPE_FAULTS (see raypipe/faults.py): the driver reads it and
hands it to the workers, which end their own process (`os._exit`) or poison a weight at the
named step. Everything else is the real pipeline on the session's Ray, or a real `raypipe run`
process that is SIGKILLed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_pipeline_e2e import tiny_config

from raypipe.config import parse_config
from raypipe.errors import UserError
from raypipe.faults import ENV
from raypipe.pipeline import run_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture
def faults(monkeypatch):
    def inject(spec: str) -> None:
        monkeypatch.setenv(ENV, spec)

    return inject


def _pretrain_only(data, storage, **pretrain) -> dict:
    raw = tiny_config(data, storage, finetune=None)
    del raw["data"]["labeled"]
    raw["pretrain"].update(
        max_steps=12,
        log_every=1,
        checkpoint_every=4,
        scaling={"num_workers": 2, "cpus_per_worker": 0.5},
        **pretrain,
    )
    return raw


def _stage_run(summary, name):
    client = MlflowClient(summary.tracking_uri)
    (run,) = [
        r
        for r in client.search_runs(
            [client.get_run(summary.run_id).info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{summary.run_id}'",
        )
        if r.info.run_name == name
    ]
    return client, run


def _losses(client, run_id) -> dict[int, float]:
    """Per step, the last logged loss (a resumed run logs the redone steps again)."""
    return {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}


def test_worker_death_resumes_exactly_where_it_stopped(
    ray_session, quickstart_data, tmp_path, faults
):
    """Rank 1 dies before step 7; the group restarts from the step-4 checkpoint with model,
    optimizer, schedule, RNG and each worker's place in its data, and every later loss equals
    the uninterrupted run's."""
    clean = run_pipeline(parse_config(_pretrain_only(quickstart_data, tmp_path / "clean")))
    faults(f"crash:pretrain:rank=1:at=7:once={tmp_path / 'crashed'}")
    crashed = run_pipeline(parse_config(_pretrain_only(quickstart_data, tmp_path / "crash")))

    assert (tmp_path / "crashed").exists()  # the fault fired
    client, run = _stage_run(crashed, "pretrain")
    resumed = [
        m.value for m in client.get_metric_history(run.info.run_id, "train/resumed_from_step")
    ]
    assert resumed == [4.0]
    assert 7 - resumed[0] <= 4  # steps redone: at most the checkpoint interval
    clean_client, clean_run = _stage_run(clean, "pretrain")  # its own store
    want, got = _losses(clean_client, clean_run.info.run_id), _losses(client, run.info.run_id)
    assert sorted(got) == list(range(1, 13))
    # Samples neither replayed nor skipped: each step after the restart sees the same batch.
    for step in range(5, 13):
        assert got[step] == pytest.approx(want[step], rel=1e-4), step
    final_clean, final_crash = clean.stages[0].metrics, crashed.stages[0].metrics
    assert final_crash["final loss"] == pytest.approx(final_clean["final loss"], rel=0.01)


def test_in_process_pretraining_matches_a_worker_and_restarts_after_an_error(
    ray_session, quickstart_data, tmp_path, faults
):
    """One worker trained in the driver (Ray Train's local mode) computes what a Ray Train
    worker computes, step for step; an error at step 7 restarts it from its own step-4
    checkpoint (local mode persists none) and every later loss equals the clean run's; only
    the newest checkpoints stay."""
    one = {"num_workers": 1, "cpus_per_worker": 1}

    def run(name, where, **pretrain):
        raw = _pretrain_only(quickstart_data, tmp_path / name, **pretrain)
        raw["pretrain"]["scaling"] = {**one, "in_process": where}
        return run_pipeline(parse_config(raw))

    worker = run("worker", False)
    here = run("here", True)
    faults(f"raise:pretrain:rank=0:at=7:once={tmp_path / 'fired'}")
    raised = run("raised", True, max_failures=1)

    assert (tmp_path / "fired").exists()
    losses = {}
    for name, summary in (("worker", worker), ("here", here), ("raised", raised)):
        client, stage_run = _stage_run(summary, "pretrain")
        losses[name] = _losses(client, stage_run.info.run_id)
        assert sorted(losses[name]) == list(range(1, 13)), name
    for step in range(1, 13):
        assert losses["here"][step] == pytest.approx(losses["worker"][step], rel=1e-5), step
        assert losses["raised"][step] == pytest.approx(losses["worker"][step], rel=1e-5), step
    client, stage_run = _stage_run(raised, "pretrain")
    resumed = client.get_metric_history(stage_run.info.run_id, "train/resumed_from_step")
    assert [m.value for m in resumed] == [4.0]
    (train,) = (tmp_path / "raised").glob("tiny/pretrain-*/train")
    kept = sorted(p.name for p in train.iterdir() if not p.name.startswith("."))
    assert kept == ["step-00000008", "step-00000012"]  # num_checkpoints_to_keep: 2


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    ray_session, quickstart_data, tmp_path, faults
):
    faults("nan:pretrain:rank=0:at=6")
    cfg = parse_config(_pretrain_only(quickstart_data, tmp_path))
    with pytest.raises(UserError) as err:
        run_pipeline(cfg)
    message = str(err.value)
    assert "the loss became non-finite at step 6" in message
    assert "step-00000004" in message and "on_nonfinite: skip" in message
    (stage,) = (tmp_path / "tiny").glob("pretrain-*")
    kept = sorted(p.name for p in (stage / "train").glob("step-*"))
    assert kept == ["step-00000004"]  # nothing written after the bad step
    assert not (stage / "stage.json").exists()  # the stage is not complete


def test_a_gans_nonfinite_loss_is_found_at_the_next_read_and_stops_before_any_write(
    ray_session, quickstart_data, media_data, tmp_path, faults
):
    # A GAN steps its own optimizers, so a NaN can only stop the run. The flag stays on the
    # device until the loop next reads it (log or checkpoint step): here step 4, for a NaN at 3.
    from test_pipelines import ROOT, overrides

    from raypipe.config import load_config

    faults("nan:pretrain:rank=0:at=3")
    cfg = load_config(
        ROOT / "pipelines" / "gan.yaml",
        [f"storage={tmp_path}", *overrides("gan.yaml", quickstart_data, media_data),
         "finetune=null", "pretrain.max_steps=8", "pretrain.log_every=4",
         "pretrain.checkpoint_every=2"],
    )  # fmt: skip
    with pytest.raises(UserError) as err:
        run_pipeline(cfg)
    message = str(err.value)
    assert (
        "the loss became non-finite at step 3 (found when the step count was next read" in message
    )
    assert "step-00000002" in message
    (stage,) = tmp_path.glob("*/pretrain-*")
    assert sorted(p.name for p in (stage / "train").glob("step-*")) == ["step-00000002"]


def test_crashing_trials_are_retried_then_recorded_failed(
    ray_session, quickstart_data, tmp_path, faults
):
    """Trial 0 crashes once and is retried to the end; trial 1 crashes every time, is recorded
    as failed in MLflow, and the sweep picks the best of the rest."""
    raw = tiny_config(quickstart_data, tmp_path)
    del raw["pretrain"]
    del raw["data"]["unlabeled"]
    raw["finetune"].update(init="scratch", epochs=2)
    raw["finetune"]["sweep"].update(num_samples=2, max_failures=1, max_concurrent_trials=2)
    faults(
        f"crash:scratch-00000:rank=0:at=2:once={tmp_path / 'once'};crash:scratch-00001:rank=0:at=1"
    )
    summary = run_pipeline(parse_config(raw))

    assert (tmp_path / "once").exists()
    arm = summary.arms["scratch"]
    assert arm["num_trials"] == 2 and arm["num_failed"] == 1
    assert arm["best_trial"] == "scratch-00000"
    client, stage = _stage_run(summary, "finetune")
    trials = client.search_runs(
        [stage.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{stage.info.run_id}' and "
        "tags.`raypipe.kind` = 'trial'",
    )
    status = {r.info.run_name: r.info.status for r in trials}
    assert status == {"scratch-00000": "FINISHED", "scratch-00001": "FAILED"}  # one run each
    epochs = client.get_metric_history(
        next(r for r in trials if r.info.run_name == "scratch-00000").info.run_id, "epoch"
    )
    assert sorted({m.value for m in epochs}) == [1.0, 2.0]


class _Driver:
    """`raypipe run` in its own process, its output collected line by line as it comes."""

    def __init__(self, args: list[str], cwd: Path, **extra_env: str):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.pop("RAY_ADDRESS", None)
        env.update(extra_env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "raypipe", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, predicate, timeout: float):
        """The predicate's first true value, asked until then while raypipe runs."""
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if self.proc.poll() is not None:
                raise AssertionError("raypipe ended early:\n" + "\n".join(self.lines[-40:]))
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError("timed out:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.2)
        return value

    def seen(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return code


class _Planted:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # the file appears if this is ever unpickled


def test_killed_driver_resumes_without_recomputing(quickstart_data, tmp_path):
    """SIGKILL the driver during pretraining, then during the sweep; the same command again
    finishes the pipeline, redoing no finished step or trial, in one MLflow run tree."""
    raw = tiny_config(quickstart_data, tmp_path / "runs")
    raw["pretrain"].update(max_steps=16, log_every=4, checkpoint_every=4)
    raw["finetune"].update(compare_scratch=False, epochs=2)
    raw["finetune"]["sweep"].update(num_samples=2, max_concurrent_trials=1, scheduler="fifo")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    args = ["run", "p.yaml"]
    runs = tmp_path / "runs" / "tiny"

    # Pretraining hangs as step 9 begins (once), after the step-8 checkpoint: the driver is
    # killed there, and its orphaned workers cannot run on meanwhile.
    first = _Driver(args, tmp_path, **{ENV: f"stall:pretrain:rank=0:at=9:once={tmp_path / 'p'}"})
    first.wait_for(lambda: list(runs.glob("pretrain-*/train/step-00000008/meta.json")), 600)
    first.wait_for(lambda: (tmp_path / "p").exists(), 60)
    first.kill()

    # Trial 1 hangs as its epoch 2 begins (once): the driver is killed in the middle of it.
    stall = f"stall:pretrained-00001:rank=0:at=2:once={tmp_path / 'stalled'}"
    second = _Driver(args, tmp_path, **{ENV: stall})
    second.wait_for(lambda: (tmp_path / "stalled").exists(), 600)
    assert list(runs.glob("finetune-*/trials/pretrained-00001/epoch-0001"))  # written before
    second.kill()
    (resumed,) = [line for line in second.lines if "pretrain resumed at step" in line]
    # Workers may finish the checkpoint they were writing as the driver died: at least step 8.
    at = int(resumed.split("pretrain resumed at step ")[1].split()[0])
    assert at >= 8
    for step in range(4, at + 1, 4):
        assert not second.seen(f"pretrain step {step}/16")  # nothing finished is redone
    assert second.seen("pretrain step 16/16")  # a stage's last status always reaches the log
    assert list(runs.glob("finetune-*/trials/pretrained-00000/done.json"))  # trial 0 finished

    # An attacker with write access to storage plants pickles where Tune keeps its sweep state
    # (tuner.pkl and the rest): resuming must not load them.
    planted = [*runs.glob("finetune-*/sweep-pretrained/**/*.pkl")]
    assert any(p.name == "tuner.pkl" for p in planted)
    for path in planted:
        path.write_bytes(pickle.dumps(_Planted(tmp_path / "code-ran")))

    third = _Driver(args, tmp_path)
    assert third.finish(timeout=600) == 0, "\n".join(third.lines[-40:])
    assert not (tmp_path / "code-ran").exists()  # nothing of Tune's saved state was unpickled
    assert third.seen("[pretrain] reusing the completed stage")
    assert third.seen("[finetune] resuming the pretrained sweep")
    assert third.seen("registered 'tiny' version 1")

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "tiny"]
    runs_by_name = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    # One tree, no duplicates: the three processes wrote to the same runs.
    assert len(client.search_runs([experiment.experiment_id])) == len(runs_by_name) == 6
    assert sorted(runs_by_name) == [
        "baseline", "finetune", "pretrain", "pretrained-00000", "pretrained-00001", "tiny"
    ]  # fmt: skip
    assert {r.info.status for r in runs_by_name.values()} == {"FINISHED"}
    # Nothing finished was computed twice: trial 0 finished in the second process and each of
    # its epochs was logged once; trial 1's epoch 1 was checkpointed there and not redone. (Its
    # epoch 2 may be logged twice: the killed driver's workers live on for a few seconds.)
    epochs = {
        trial: sorted(
            m.value for m in client.get_metric_history(runs_by_name[trial].info.run_id, "epoch")
        )
        for trial in ("pretrained-00000", "pretrained-00001")
    }
    assert epochs["pretrained-00000"] == [1.0, 2.0]
    assert epochs["pretrained-00001"].count(1.0) == 1 and 2.0 in epochs["pretrained-00001"]
    steps = [
        m.step
        for m in client.get_metric_history(runs_by_name["pretrain"].info.run_id, "train/loss")
    ]
    assert [s for s in steps if s <= at] == list(range(4, at + 1, 4))
    assert max(steps) == 16


def _spent(runs: Path) -> float:
    found = list(runs.glob("finetune-*/**/sweep-scratch/budget.json"))
    return json.loads(found[0].read_text())["spent_s"] if found else 0.0


def test_a_time_budget_cuts_the_sweep_and_counts_the_time_before_a_crash(quickstart_data,
                                                                          tmp_path):  # fmt: skip
    """finetune.sweep.time_budget_s: the driver is killed part-way through the budget; the
    same command again gets only what is left, the budget stops the sweep, the best epoch of
    the trials that ran is registered, and the summary says what was cut."""
    raw = tiny_config(quickstart_data, tmp_path / "runs")
    raw["finetune"].update(init="scratch", epochs=40, min_epoch_rows=192)  # ~15 s a trial
    raw["finetune"]["sweep"].update(num_samples=4, max_concurrent_trials=1, scheduler="fifo",
                                    time_budget_s=30)  # fmt: skip
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    runs = tmp_path / "runs" / "tiny"

    first = _Driver(["run", "p.yaml"], tmp_path)
    first.wait_for(lambda: _spent(runs) >= 8, 600)
    first.kill()
    before = _spent(runs)
    assert 8 <= before < 30

    second = _Driver(["run", "p.yaml"], tmp_path)
    assert second.finish(timeout=600) == 0, "\n".join(second.lines[-40:])
    (line,) = [x for x in second.lines if "sweep's time budget:" in x]
    left, spent_before = re.search(r"(\d+) s left of 30 s \((\d+) s spent before", line).groups()
    assert abs(int(spent_before) - before) <= 1.5 and abs(int(left) - (30 - before)) <= 1.5
    assert second.seen("[finetune] budget spent: scratch")
    assert second.seen("registered 'tiny' version 1")
    (summary_line,) = [x for x in second.lines if " budget scratch" in x]
    cut, total = map(int, re.search(r"(\d+) of (\d+) trial\(s\) cut", summary_line).groups())
    assert total == 4 and cut >= 1
    # The clock went on from where the first driver left it, and stopped at the budget.
    assert 30 <= _spent(runs) < 30 + 30
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (version,) = client.search_model_versions("name='tiny'")
    assert re.search(r"budget \(\d+ s of 30 s\) cut \d+ of 4 trials", version.description)
