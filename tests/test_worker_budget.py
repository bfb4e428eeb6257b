"""`budget`: worker-hours for the pipeline and per stage: how they split, the clocks that
count them, and a real pipeline cut by them across a killed driver."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_faults import _Driver
from test_pipeline_e2e import tiny_config

from raypipe.config import ConfigError, parse_config
from raypipe.errors import UserError
from raypipe.stages import budget as sweep_budget
from raypipe.stages.budget import WORKER_FILE, Budget, BudgetClock, SpentStopper, budget_line
from raypipe.stages.worker_budget import StageClock, finetune_share_s, pretrain_share_s


def _cfg(tmp_path: Path, budget: dict, **overrides):
    data = {k: str(tmp_path / k) for k in ("unlabeled", "train", "validation")}
    return parse_config(tiny_config(data, tmp_path / "runs", budget=budget, **overrides))


def test_a_budget_that_ends_every_sweep_before_an_epoch_is_one_line_naming_it():
    """Registration with no checkpoint to register: a budget that cut the sweeps says so and
    names the settings to raise; without a cut it is a failure of the trials, not a budget."""
    from raypipe.stages.arms import Arm, ArmResult
    from raypipe.stages.publish import _candidates

    def arm(base, budget=None, checkpoint=None):
        return ArmResult(Arm(base), best_metric=None, best_checkpoint=checkpoint,
                         best_trial=None, budget=budget)  # fmt: skip

    cut = [arm("pretrained", {"cut": 2, "total": 2}), arm("scratch", {"cut": 0, "total": 2})]
    with pytest.raises(UserError, match=r"budget ran out before any trial finished an epoch; "
                                        r"raise budget\.finetune_worker_hours"):  # fmt: skip
        _candidates(cut)
    with pytest.raises(RuntimeError, match="no fine-tune trial produced a checkpoint"):
        _candidates([arm("pretrained", {"cut": 0, "total": 2}), arm("scratch")])
    kept = arm("scratch", {"cut": 1, "total": 2}, checkpoint="/runs/x/epoch-0001")
    assert _candidates([*cut, kept]) == [kept]


def test_the_pipeline_budget_splits_between_pretraining_and_each_task(tmp_path):
    # Pretraining gets what the tasks' own budgets leave; each task its own, at most an
    # equal share of what pretraining left.
    cfg = _cfg(tmp_path, {"worker_hours": 1.0, "finetune_worker_hours": 0.25})
    assert pretrain_share_s(cfg, tasks=2) == pytest.approx(1800)
    assert finetune_share_s(cfg, 2, pretrain_spent_s=1000) == pytest.approx(900)
    assert finetune_share_s(cfg, 2, pretrain_spent_s=2400) == pytest.approx(600)
    cfg = _cfg(tmp_path, {"worker_hours": 1.0, "pretrain_worker_hours": 0.5})
    assert pretrain_share_s(cfg, tasks=1) == pytest.approx(1800)
    assert finetune_share_s(cfg, 1, pretrain_spent_s=2000) == pytest.approx(1600)
    with pytest.raises(UserError, match="nothing is left to fine-tune"):
        finetune_share_s(cfg, 1, pretrain_spent_s=3600)
    cfg = _cfg(tmp_path, {})
    assert pretrain_share_s(cfg, 1) is None and finetune_share_s(cfg, 1, 0.0) is None


def test_a_pipeline_budget_must_say_how_it_splits(tmp_path):
    with pytest.raises(ConfigError, match="budget.worker_hours: say how it splits"):
        _cfg(tmp_path, {"worker_hours": 1.0})
    with pytest.raises(ConfigError, match="budget.pretrain_worker_hours: this pipeline does not"):
        _cfg(tmp_path, {"pretrain_worker_hours": 1.0}, pretrain=None)


def test_a_sweep_clock_counts_each_running_trials_workers(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(sweep_budget.time, "monotonic", lambda: now[0])
    clock = BudgetClock(Budget(limit_s=60, spent_s=20), str(tmp_path), file=WORKER_FILE,
                        workers=2)  # fmt: skip
    stopper = SpentStopper(clock)
    clock.setup()

    class T:
        def __init__(self, status):
            self.status = status

    trials = [T("RUNNING"), T("RUNNING"), T("PENDING"), T("TERMINATED")]
    now[0] += 5  # two running trials of two workers for 5 s: 20 worker-seconds
    clock.on_step_end(1, trials)
    assert clock.spent_s() == pytest.approx(40) and not stopper.stop_all()
    now[0] += 10
    clock.on_step_end(2, trials[1:])  # one running: 20 more
    assert clock.spent_s() == pytest.approx(60) and stopper.stop_all()
    clock.on_experiment_end(trials)
    saved = json.loads((tmp_path / WORKER_FILE).read_text())
    assert saved == {"spent_s": pytest.approx(60), "limit_s": 60}
    line = budget_line("scratch", cut=2, total=4, worker_limit_s=60, worker_spent_s=61)
    assert line == "scratch 0.0169 worker-h of 0.0167 worker-h, 2 of 4 trial(s) cut"


def test_a_stage_clock_is_saved_while_it_runs_and_sets_the_deadline(tmp_path):
    with StageClock(Budget(limit_s=10, spent_s=4), str(tmp_path), workers=2) as clock:
        # 6 worker-seconds left with 2 workers: 3 s from now.
        assert clock.deadline() - time.time() == pytest.approx(3, abs=0.2)
        time.sleep(1.3)
        during = json.loads((tmp_path / WORKER_FILE).read_text())["spent_s"]
        assert during > 4
    after = json.loads((tmp_path / WORKER_FILE).read_text())["spent_s"]
    assert clock.spent_s() == after  # what the stage reports is what it saved
    assert after >= during and after == pytest.approx(4 + 2 * 1.3, abs=0.5)


def _spent(runs: Path, pattern: str) -> float:
    return sum(json.loads(p.read_text())["spent_s"] for p in runs.glob(pattern))


def test_worker_hours_cut_pretraining_and_the_sweeps_across_a_killed_driver(quickstart_data,
                                                                            tmp_path):  # fmt: skip
    """budget.pretrain_worker_hours and finetune_worker_hours: the driver is killed during
    pretraining; the same command again counts the time before the crash, pretraining stops
    at its budget with a checkpoint that fine-tuning starts from, each arm's sweep stops at
    its share, the best finished trial is registered, and the summary and the pipeline run
    say what was spent."""
    raw = tiny_config(quickstart_data, tmp_path / "runs")
    raw["pretrain"].update(max_steps=100_000, checkpoint_every=10)
    raw["finetune"].update(epochs=40, min_epoch_rows=192)  # ~15 s a trial
    raw["finetune"]["sweep"].update(num_samples=3, max_concurrent_trials=1, scheduler="fifo")
    raw["budget"] = {"pretrain_worker_hours": 12 / 3600, "finetune_worker_hours": 16 / 3600}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    runs = tmp_path / "runs" / "tiny"
    pre_clock = f"pretrain-*/{WORKER_FILE}"

    first = _Driver(["run", "p.yaml"], tmp_path)
    first.wait_for(lambda: _spent(runs, pre_clock) >= 4, 600)
    first.kill()
    before = _spent(runs, pre_clock)
    assert 4 <= before < 12

    second = _Driver(["run", "p.yaml"], tmp_path)
    assert second.finish(timeout=600) == 0, "\n".join(second.lines[-40:])
    (line,) = [x for x in second.lines if "[pretrain] its worker-hour budget:" in x]
    spent_before = float(re.search(r"\(([\d.e-]+) worker-h spent before", line).group(1))
    assert spent_before * 3600 == pytest.approx(before, abs=1.5)
    (stop,) = [x for x in second.lines if "worker-hour budget is spent" in x]
    step = int(re.search(r"stopped at step (\d+) of 100000", stop).group(1))
    assert 0 < step < 100_000
    # The clock went on from where the first driver left it and stopped near the budget
    # (one step and the loop's teardown past it).
    assert 12 <= _spent(runs, pre_clock) < 12 + 10
    (stage_line,) = [x for x in second.lines if re.match(r"\s+pretrain\s+done", x)]
    assert f"steps {step}," in stage_line and "stopped by its budget, of 100000" in stage_line
    # Each arm's sweep had half the fine-tuning budget (8 s): the first ~15 s trial was cut.
    assert second.seen("worker-hour budget 0.00444 worker-h: 0.00222 worker-h for each of 2")
    for arm in ("pretrained", "scratch"):
        assert second.seen(f"[finetune] budget spent: {arm} ")
        assert 8 <= _spent(runs, f"finetune-*/**/sweep-{arm}/{WORKER_FILE}") < 8 + 10
    assert second.seen("registered 'tiny' version 1")
    (total,) = [x for x in second.lines if x.strip().startswith("budget ")]
    spent = _spent(runs, pre_clock) + _spent(runs, f"finetune-*/**/{WORKER_FILE}")
    assert f"{spent / 3600:.3g} worker-hours spent" in total
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (pipeline,) = client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id], "tags.`raypipe.kind` = 'pipeline'"
    )
    assert pipeline.data.metrics["budget/spent_worker_hours"] == pytest.approx(spent / 3600)
    (version,) = client.search_model_versions("name='tiny'")
    assert re.search(
        r"budget \([\d.]+ worker-h of 0.00222 worker-h\) cut \d of 3", version.description
    )
