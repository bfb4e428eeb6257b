"""`pretrain.strategy: fsdp` (FSDP2) against DDP on 2 gloo workers: the same losses step after
step, and a checkpoint of the unsharded weights in the same format as DDP's."""

from __future__ import annotations

import os
import socket

import pytest
import tiny
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from raypipe.engine.checkpoint import (
    load_train_state,
    load_weights,
    save_checkpoint,
    split_objective_state,
)
from raypipe.engine.optim import build_optimizer, warmup_cosine
from raypipe.engine.parallel import (
    full_optimizer_state,
    full_state_dict,
    load_optimizer_state,
    shard,
)
from raypipe.engine.step import train_step

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(strategy: str, rank: int, steps: int, state=None, first: int = 0):
    """A tiny causal LM; each rank trains on its own batches, seeded alike for both strategies."""
    objective = tiny.build("causal_lm", seed=0)
    if state is not None:
        objective.load_state_dict(state["weights"])
    module = shard(objective) if strategy == "fsdp" else DistributedDataParallel(objective)
    optimizer = build_optimizer(
        objective.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95)
    )
    scheduler = warmup_cosine(optimizer, warmup_steps=1, total_steps=8, min_lr_ratio=0.1)
    if state is not None:
        load_optimizer_state(objective, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    losses = []
    for step in range(steps):
        batch = tiny.batch("causal_lm", seed=100 * rank + first + step)
        loss, _ = train_step(
            module, optimizer, scheduler, [batch], grad_clip=1.0, device=torch.device("cpu")
        )
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / dist.get_world_size())
    return objective, optimizer, scheduler, losses


def _worker(rank: int, world: int, port: int, directory: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for strategy in ("ddp", "fsdp"):
            objective, optimizer, scheduler, losses = _train(strategy, rank, STEPS)
            weights = full_state_dict(objective)  # collective: every rank calls it
            optim = full_optimizer_state(objective, optimizer)
            if rank == 0:
                out[f"{strategy}-losses"] = losses
                out[f"{strategy}-weights"] = {k: v.clone() for k, v in weights.items()}
                if strategy == "fsdp":
                    save_checkpoint(
                        directory,
                        weights=split_objective_state(weights)[0],
                        spec={"type": "transformer", "config": {}},
                        meta={"step": STEPS},
                        train_state={"optimizer": optim, "scheduler": scheduler.state_dict()},
                    )
            dist.barrier()
        # Resume the sharded run from its checkpoint: every rank reads the full state.
        resumed = tiny.build("causal_lm", seed=1)
        load_weights(directory, resumed.model)
        train_state = load_train_state(directory)
        state = {
            "weights": resumed.state_dict(),
            "optimizer": train_state["optimizer"],
            "scheduler": train_state["scheduler"],
        }
        _, _, _, resumed_losses = _train("fsdp", rank, 2, state=state, first=STEPS)
        _, _, _, straight = _train("fsdp", rank, STEPS + 2)  # the same run, uninterrupted
        if rank == 0:
            out["fsdp-resumed"] = resumed_losses
            out["fsdp-straight"] = straight[STEPS:]
    finally:
        dist.destroy_process_group()


def test_fsdp_matches_ddp_and_checkpoints_unsharded_weights(tmp_path):
    directory = str(tmp_path / "ckpt")
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), directory, out), nprocs=2, join=True)

    ddp, fsdp = out["ddp-losses"], out["fsdp-losses"]
    assert len(ddp) == STEPS and ddp[-1] < ddp[0]  # it trained
    for a, b in zip(ddp, fsdp, strict=True):
        assert abs(a - b) < 1e-5, (ddp, fsdp)
    # The gathered FSDP weights are the full tensors, equal to DDP's after the same steps.
    ddp_w, fsdp_w = out["ddp-weights"], out["fsdp-weights"]
    assert ddp_w.keys() == fsdp_w.keys()
    for k in ddp_w:
        assert ddp_w[k].shape == fsdp_w[k].shape
        assert torch.allclose(ddp_w[k], fsdp_w[k], atol=1e-5), k
    # The checkpoint loads into a plain, unsharded model like any DDP checkpoint.
    model = tiny.build("causal_lm", seed=3).model
    load_weights(directory, model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fsdp_w[f"model.{k}"])
    # Resumed from the checkpoint (weights, optimizer moments, schedule), the sharded run takes
    # the same steps as the run that never stopped.
    resumed, straight = out["fsdp-resumed"], out["fsdp-straight"]
    assert len(resumed) == 2
    for a, b in zip(resumed, straight, strict=True):
        assert abs(a - b) < 1e-5, (resumed, straight)


def test_fsdp_refuses_an_objective_that_runs_its_own_step():
    from raypipe.config import parse_config
    from raypipe.errors import UserError
    from raypipe.plan import make_plan

    raw = {
        "name": "g",
        "data": {"unlabeled": {"path": "x"}},
        "model": {"type": "cnn", "dim": 16, "layers": 1},
        "pretrain": {"objective": "gan", "max_steps": 1, "strategy": "fsdp"},
    }
    with pytest.raises(UserError, match="pretrain.strategy: fsdp does not support the 'gan'"):
        make_plan(parse_config(raw))
    raw["pretrain"]["strategy"] = "ddp"
    make_plan(parse_config(raw))


def test_training_asks_for_gpus_and_preprocessing_for_cpus_only():
    from raypipe.config import PreprocessConfig
    from raypipe.config import ScalingConfig as Section
    from raypipe.data.pipelines import preprocess_args
    from raypipe.stages.sessions import scaling_config

    gpu = scaling_config(Section(num_workers=2, use_gpu=True, cpus_per_worker=2))
    assert gpu.use_gpu and gpu.resources_per_worker == {"CPU": 2, "GPU": 1}
    cpu = scaling_config(Section(num_workers=1))
    assert "GPU" not in cpu.resources_per_worker and not cpu.use_gpu
    assert preprocess_args(None) == {"num_cpus": 1.0, "num_gpus": 0}
    capped = preprocess_args(PreprocessConfig(cpus_per_task=0.5, concurrency=4))
    assert capped == {"num_cpus": 0.5, "num_gpus": 0, "concurrency": 4}
