"""The two real training loops (engine/pretrain_loop.py, engine/finetune_loop.py) run as plain
PyTorch over an in-memory session, with no Ray; and a seeded few-step run through Ray Train's
local mode (the stage's own wiring) computes the same."""

from __future__ import annotations

import numpy as np
import pytest
import tiny
import torch
from safetensors.torch import load_file

from raypipe.config import FinetuneConfig, PretrainConfig
from raypipe.engine.finetune_loop import FinetuneJob, finetune_loop
from raypipe.engine.pretrain_loop import PretrainJob, pretrain_loop
from raypipe.engine.session import MemorySession
from raypipe.faults import ENV, InjectedFault
from raypipe.models import build_model
from raypipe.objectives import build_objective

SPEC = {"type": "transformer", "config": {**tiny.COMMON, **tiny.TEXT, "causal": True}}


def _pretrain_job(directory, *, max_steps=6, faults="") -> PretrainJob:
    cfg = PretrainConfig(
        objective="causal_lm", max_steps=max_steps, batch_size=4, seq_len=12, log_every=1,
        checkpoint_every=3, optimizer={"lr": 3e-3, "warmup_steps": 2},
    )  # fmt: skip
    return PretrainJob(
        cfg=cfg, model_spec=SPEC, tokenizer_json=None, seed=0, fingerprint="test",
        checkpoint_dir=str(directory), faults=faults,
    )  # fmt: skip


def _blocks(num_batches=3) -> list[dict[str, torch.Tensor]]:
    return [tiny.batch("causal_lm", n=4, seed=i) for i in range(num_batches)]


def _rows() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.cat([b["input_ids"] for b in _blocks()])}


def _pretrain(directory, **kw) -> tuple[MemorySession, object]:
    session = MemorySession({"train": _rows()}, checkpoint_dir=directory, prefix="step-")
    return session, pretrain_loop(_pretrain_job(directory, **kw), session)


def test_pretrain_loop_runs_without_ray_and_its_first_loss_is_the_models(tmp_path):
    session, outcome = _pretrain(tmp_path)
    losses = session.logger.series("train/loss")
    assert outcome.steps == 6 and outcome.error is None and len(losses) == 6
    assert outcome.final_loss == losses[-1] and losses[-1] < losses[0]
    # Independently: the same seeded model's loss on the first batch, before any update.
    torch.manual_seed(0)
    objective = build_objective("causal_lm", build_model(SPEC), {})
    with torch.no_grad():
        first, _ = objective(_blocks()[0])
    assert losses[0] == pytest.approx(float(first), rel=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000006"]


def test_pretrain_loop_resumes_with_the_same_losses(tmp_path, monkeypatch):
    clean, _ = _pretrain(tmp_path / "clean")
    with pytest.raises(InjectedFault):
        _pretrain(tmp_path / "cut", faults="raise:pretrain:rank=0:at=5")
    resumed, outcome = _pretrain(tmp_path / "cut")  # from step-00000003
    assert outcome.steps == 6
    assert [s for s, m in resumed.logger.metrics if "train/loss" in m] == [4, 5, 6]
    assert resumed.logger.series("train/loss") == clean.logger.series("train/loss")[3:]


def test_a_reclaim_notice_writes_a_checkpoint_at_that_step_and_a_resume_starts_there(
    tmp_path, monkeypatch
):
    """Spot preemption: the notice comes after step 4 (checkpoints every 3): a checkpoint of
    step 4 is written at once, then no step runs until the deadline (+ grace); a node still
    there then trains on. A run resumed from that checkpoint computes what a clean run does."""
    import raypipe.engine.pretrain_loop as loop
    import raypipe.engine.reclaim as reclaim

    clean, _ = _pretrain(tmp_path / "clean")
    waited = []
    monkeypatch.setattr(loop.time, "sleep", waited.append)
    monkeypatch.setattr(reclaim, "RECLAIM_GRACE_S", 5.0)
    session = MemorySession({"train": _rows()}, checkpoint_dir=tmp_path / "cut", prefix="step-")
    session.reclaims = {4: loop.time.time() + 30.0}  # after the 4th step, a 30 s deadline
    outcome = pretrain_loop(_pretrain_job(tmp_path / "cut"), session)
    assert outcome.steps == 6 and not outcome.stopped_by_probe  # not reclaimed after all
    assert len(waited) == 1 and 30 < waited[0] <= 35  # until the deadline + grace, once
    assert [r["step"] for r in session.records] == [3, 4, 6]  # step 4: the notice's
    # Resumed from step 4 (the node gone after its checkpoint): steps 5 and 6 as a clean run.
    (tmp_path / "cut" / "step-00000006").rename(tmp_path / "gone")
    resumed, outcome = _pretrain(tmp_path / "cut")
    assert resumed.logger.metrics[0] == (4, {"train/resumed_from_step": 4})
    assert [s for s, m in resumed.logger.metrics if "train/loss" in m] == [5, 6]
    assert resumed.logger.series("train/loss") == clean.logger.series("train/loss")[4:]


def _labeled(n, seed) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, tiny.VOCAB, (n, 10), generator=g)
    labels = (ids[:, 1] > tiny.VOCAB // 2).long()  # learnable from one token
    return {"input_ids": ids, "label": labels}


def _finetune_job(**kw) -> FinetuneJob:
    cfg = FinetuneConfig(task="classification", epochs=3, batch_size=8,
                         sweep={"metric": "val/accuracy", "mode": "max"})  # fmt: skip
    hp = {"lr": 3e-3, "weight_decay": 0.0, "warmup_ratio": 0.0, "batch_size": 8,
          "freeze_backbone": False, "dropout": 0.0}  # fmt: skip
    spec = {"type": "transformer", "config": {**SPEC["config"], "causal": False}}
    return FinetuneJob(
        cfg=cfg, hp=hp, task_options={"num_classes": 2, "pool": "mean", "dropout": 0.0},
        model_spec=spec, init_checkpoint=None, tokenizer_json=None, seed=0,
        fingerprint="test", arm="scratch", trial_name="scratch-00000", **kw,
    )  # fmt: skip


def test_finetune_loop_runs_without_ray_and_keeps_its_best_epoch(tmp_path):
    """Three batches an epoch, shuffled by the seed of each epoch."""
    data = {"train": _labeled(24, 1), "validation": _labeled(32, 2)}
    session = MemorySession(data, checkpoint_dir=tmp_path, prefix="epoch-")
    finetune_loop(_finetune_job(num_train_rows=24), session)
    epochs = [r["epoch"] for r in session.records]
    assert epochs == [1, 2, 3]
    train = [r["train/loss"] for r in session.records]
    assert train[-1] < train[0]
    kept = [p.name for p in tmp_path.iterdir()]
    best = max(session.records, key=lambda r: r["val/accuracy"])
    assert f"epoch-{best['epoch']:04d}" in kept
    assert all(0 <= r["val/accuracy"] <= 1 for r in session.records)


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    """A trial resumes from its folder's checkpoint only when it was trained with the same
    settings (a resumed search may put other settings under the same trial name)."""
    from dataclasses import replace

    data = {"train": _labeled(24, 1), "validation": _labeled(32, 2)}
    job = _finetune_job(num_train_rows=24)
    first = MemorySession(data, checkpoint_dir=tmp_path, prefix="epoch-")
    finetune_loop(replace(job, cfg=job.cfg.model_copy(update={"epochs": 2})), first)
    same = MemorySession(data, checkpoint_dir=tmp_path, prefix="epoch-")
    finetune_loop(job, same)
    resumed = [r["epoch"] for r in same.records]
    assert resumed and resumed[0] > 1 and resumed[-1] == 3  # continued from a kept checkpoint
    other = MemorySession(data, checkpoint_dir=tmp_path, prefix="epoch-")
    finetune_loop(replace(job, hp={**job.hp, "lr": 1e-3}), other)
    assert [r["epoch"] for r in other.records] == [1, 2, 3]  # started over


class _NodeGone(BaseException):
    """The node's end, during the wait after a reclaim notice."""


def _same_epochs(ours, theirs) -> None:
    """The same epochs with the same training and validation metrics (timings aside)."""
    assert [r["epoch"] for r in ours] == [r["epoch"] for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        kept = sorted(k for k in b if not k.startswith("perf/"))
        assert [a[k] for k in kept] == pytest.approx([b[k] for k in kept], rel=1e-6), kept


def test_a_reclaim_notice_mid_epoch_resumes_at_that_batch(tmp_path, monkeypatch):
    """Fine-tuning under spot preemption: three batches an epoch; the notice comes after the
    5th step (epoch 2, batch 2). A checkpoint of that step is written and no step runs until
    the node goes. The restarted trial reads past the two batches it had trained and ends
    where a clean run ends: the same epochs' metrics (the epoch's training loss summed over
    all its batches), logged once, and the same weights. A node still there after the
    deadline trains on, and the reclaim checkpoint is gone once its epoch is over."""
    from dataclasses import replace

    import raypipe.engine.reclaim as reclaim

    data = {"train": _labeled(24, 1), "validation": _labeled(32, 2)}
    job = replace(_finetune_job(num_train_rows=24), save_every_epoch=True)
    clean = MemorySession(
        data, checkpoint_dir=tmp_path / "clean", prefix="epoch-", num_to_keep=None
    )
    finetune_loop(job, clean)

    def gone(seconds):
        waited.append(seconds)
        raise _NodeGone

    waited, cut = [], tmp_path / "cut"
    monkeypatch.setattr(reclaim.time, "sleep", gone)
    monkeypatch.setattr(reclaim, "RECLAIM_GRACE_S", 5.0)
    first = MemorySession(data, checkpoint_dir=cut, prefix="epoch-", num_to_keep=None)
    first.reclaims = {5: reclaim.time.time() + 30.0}
    with pytest.raises(_NodeGone):
        finetune_loop(replace(job, reclaim_dir=str(cut)), first)
    assert len(waited) == 1 and 30 < waited[0] <= 35  # until the deadline + grace
    assert [r["epoch"] for r in first.records] == [1]
    assert sorted(p.name for p in cut.iterdir()) == ["epoch-0001", "reclaim-00000005"]

    resumed = MemorySession(data, checkpoint_dir=cut, prefix="epoch-", num_to_keep=None)
    finetune_loop(replace(job, reclaim_dir=str(cut)), resumed)
    assert [r["epoch"] for r in resumed.records] == [2, 3]
    _same_epochs(resumed.records, clean.records[1:])
    assert sorted(p.name for p in cut.iterdir()) == ["epoch-0001", "epoch-0002", "epoch-0003"]
    ours = load_file(cut / "epoch-0003" / "model.safetensors")
    theirs = load_file(tmp_path / "clean" / "epoch-0003" / "model.safetensors")
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-7)

    monkeypatch.setattr(reclaim.time, "sleep", waited.append)  # not reclaimed after all
    stays = MemorySession(data, checkpoint_dir=tmp_path / "stays", prefix="epoch-")
    stays.reclaims = {5: reclaim.time.time() - 60.0}
    finetune_loop(replace(job, reclaim_dir=str(tmp_path / "stays")), stays)
    _same_epochs(stays.records, clean.records)
    assert not list((tmp_path / "stays").glob("reclaim-*"))


@pytest.mark.slow
def test_pretrain_loop_equals_ray_train_local_mode(ray_session, tmp_path):
    from raypipe.stages import pretrain

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the stage trains in the driver (so sums add up alike)
    try:
        memory, outcome = _pretrain(tmp_path / "memory")
    finally:
        torch.set_num_threads(threads)
    ds = ray_session.data.from_items([{"input_ids": r} for r in _rows()["input_ids"].numpy()])
    job = _pretrain_job(tmp_path / "ray" / "train")
    pretrain._limit_to_driver({"train": ds}, job.cfg, streamed=False)
    trainer = pretrain._trainer(job, None, {"train": ds}, here=True, stage_dir=str(tmp_path / "ray"),
                                streamed=False)  # fmt: skip
    result = pretrain._fit_in_process(trainer, job.cfg)
    assert result.return_value.final_loss == pytest.approx(outcome.final_loss, rel=1e-6)
    ours = load_file(tmp_path / "memory" / "step-00000006" / "model.safetensors")
    theirs = load_file(tmp_path / "ray" / "train" / "step-00000006" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)


@pytest.mark.slow
def test_finetune_loop_equals_a_tune_trials_session(ray_session, tmp_path, monkeypatch):
    """One training batch per epoch, so Ray's local shuffle only reorders rows inside it."""
    from raypipe.stages.sessions import TrialSession

    monkeypatch.delenv(ENV, raising=False)
    data = {"train": _labeled(8, 1), "validation": _labeled(32, 2)}
    memory = MemorySession(data, checkpoint_dir=tmp_path / "memory", prefix="epoch-")
    finetune_loop(_finetune_job(num_train_rows=8), memory)

    def rows(batch):
        return [{k: v[i].numpy() for k, v in batch.items()} for i in range(len(batch["label"]))]

    datasets = {k: ray_session.data.from_items(rows(v)).materialize() for k, v in data.items()}
    session = TrialSession(
        None, run_dir=str(tmp_path / "ray"), prefix="epoch-", datasets=datasets, use_gpu=False,
        num_to_keep=1, to_tune=False,
    )  # fmt: skip
    finetune_loop(_finetune_job(num_train_rows=8), session)
    assert session.last_metrics["epoch"] == 3
    for key in ("train/loss", "val/loss", "val/accuracy"):
        assert session.last_metrics[key] == pytest.approx(memory.records[-1][key], rel=1e-4)


@pytest.mark.slow
def test_a_trial_reads_its_nodes_drain_from_ray(ray_session, monkeypatch):
    """A one-worker trial asks Ray's draining-node record (the call Ray Train's preemption
    watcher makes; here against the real GCS, where nothing drains) about its own node only,
    at most once a second, and keeps the first notice."""
    from raypipe.stages import sessions

    node = ray_session.get_runtime_context().get_node_id()
    assert sessions.draining_deadline(node) is None  # a real call: no drain here
    drains = {"another-node": 5_000}
    state = ray_session._private.state.state
    monkeypatch.setattr(state, "get_draining_nodes", lambda: dict(drains))
    assert sessions.draining_deadline(node) is None  # another node's drain is not ours
    drains[node] = 0
    assert sessions.draining_deadline(node) == float("inf")  # a drain with no deadline
    drains[node] = 1_796_000_000_000
    assert sessions.draining_deadline(node) == 1_796_000_000.0
    monkeypatch.setenv(sessions.PREEMPTION_WATCHER, "1")
    trial = sessions.TrialSession(None, run_dir="unused", prefix="epoch-", datasets={},
                                  use_gpu=False, num_to_keep=1, to_tune=False)  # fmt: skip
    assert trial.reclaim_notice() == 1_796_000_000.0
    drains.pop(node)
    assert trial.reclaim_notice() == 1_796_000_000.0  # the notice stands
    monkeypatch.setenv(sessions.PREEMPTION_WATCHER, "0")
    drains[node] = 0
    local = sessions.TrialSession(None, run_dir="unused", prefix="epoch-", datasets={},
                                  use_gpu=False, num_to_keep=1, to_tune=False)  # fmt: skip
    assert local.reclaim_notice() is None  # raypipe's embedded Ray: not asked


def test_pretrain_loop_scores_held_out_rows_and_keeps_the_best(tmp_path):
    from raypipe.engine.checkpoint import load_weights, read_meta

    held_out = {"input_ids": torch.cat([tiny.batch("causal_lm", n=4, seed=50 + i)["input_ids"]
                                        for i in range(2)])}  # fmt: skip
    job = _pretrain_job(tmp_path / "train")
    cfg = job.cfg.model_copy(update={"eval_every": 2, "keep": "best"})
    job = PretrainJob(**{**job.__dict__, "cfg": cfg, "best_dir": str(tmp_path / "best")})
    session = MemorySession({"train": _rows(), "validation": held_out},
                            checkpoint_dir=tmp_path / "train", prefix="step-")  # fmt: skip
    pretrain_loop(job, session)
    logged = {s: m["val/loss"] for s, m in session.logger.metrics if "val/loss" in m}
    assert sorted(logged) == [2, 4, 6]
    assert all(m["val/perplexity"] == pytest.approx(np.exp(m["val/loss"]))
               for _, m in session.logger.metrics if "val/loss" in m)  # fmt: skip
    # Independently: the last checkpoint's weights, scored on the held-out rows.
    objective = build_objective("causal_lm", build_model(SPEC), {}).eval()
    load_weights(tmp_path / "train" / "step-00000006", objective.model)
    with torch.no_grad():
        losses = [float(objective({"input_ids": held_out["input_ids"][i : i + 4]})[0])
                  for i in (0, 4)]  # fmt: skip
    assert logged[6] == pytest.approx(sum(losses) / 2, rel=1e-6)
    (best,) = list((tmp_path / "best").iterdir())
    step = min(logged, key=logged.get)
    assert best.name == f"step-{step:08d}" and read_meta(best)["best_val_loss"] == logged[step]
