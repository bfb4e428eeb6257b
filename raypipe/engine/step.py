"""One optimizer step, evaluation, meters and the non-finite tally: what both training loops share.

Pure PyTorch: the same step runs inside a Ray Train worker, in the unit tests and in the
benchmarks, with or without DDP around the module.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from raypipe import faults
from raypipe.engine.parallel import local_value
from raypipe.engine.precision import autocast_for
from raypipe.errors import UserError


class NonFiniteLoss(UserError):
    """The loss or the gradient norm of a step is NaN or Inf."""

    def __init__(self, loss: float, grad_norm: float, step: int | None = None):
        where = f"first at step {step}: " if step is not None else ""
        super().__init__(f"{where}loss {loss:.4g}, gradient norm {grad_norm:.4g}")
        self.loss, self.grad_norm, self.step = loss, grad_norm, step


def train_step(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    grad_clip: float | None,
    device: torch.device,
    precision: str = "auto",
    on_nonfinite: str = "stop",
    check_now: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step over `micro_batches` (gradient accumulation).

    `module(batch)` returns (mean loss, stats). DDP all-reduces gradients only on the last
    micro-batch (`no_sync` for the others). Returns the mean loss and the summed stats as
    tensors; nothing here waits for the device, except as below.

    A non-finite loss or gradient norm never reaches the weights:
    - `check_now` (the default off CUDA, where reading a tensor costs nothing): tested on the
      host before the optimizer steps; raises NonFiniteLoss (`on_nonfinite="stop"`) or skips
      the update and sets stats["skipped_steps"] to 1.
    - otherwise (the default on CUDA, with a fused optimizer): no host sync. The fused AdamW
      kernel skips the update on the device (its `found_inf` input, as under a GradScaler) and
      stats["skipped_steps"] holds 0 or 1; the caller reads it when it logs anyway, and stops
      there if it must (see `NonFiniteLoss`'s `step`).
    """
    optimizer.zero_grad(set_to_none=True)
    num_micro = len(micro_batches)
    total_loss = torch.zeros((), device=device)
    total_stats: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        last = i == num_micro - 1
        sync = (
            module.no_sync()
            if isinstance(module, DistributedDataParallel) and not last
            else contextlib.nullcontext()
        )
        with sync:
            with autocast_for(device, precision):
                loss, stats = module(batch)
            (loss / num_micro).backward()
        total_loss += loss.detach()
        for k, v in stats.items():
            total_stats[k] = total_stats.get(k, 0) + v.detach()
    if grad_clip:
        norm = local_value(torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip))
        total_stats["grad_norm"] = norm
    else:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        norm = local_value(torch.nn.utils.get_total_norm(grads)) if grads else total_loss * 0
    mean_loss = total_loss / num_micro
    # The gradient norm is the same on every rank (DDP all-reduces gradients; FSDP's norm is
    # global), so all ranks take the same branch; the loss is per rank and joins the test only
    # without a process group.
    bad = ~torch.isfinite(norm)
    if not (dist.is_available() and dist.is_initialized()):
        bad = bad | ~torch.isfinite(mean_loss)
    if check_now is None:
        check_now = device.type != "cuda"
    if not check_now and optimizer.defaults.get("fused"):
        optimizer.found_inf = bad.float()  # the fused kernel skips the update where it is 1
        optimizer.step()
        optimizer.found_inf = None
        total_stats["skipped_steps"] = bad.float()
    elif bool(bad):
        if on_nonfinite != "skip":
            raise NonFiniteLoss(float(mean_loss), float(norm))
        optimizer.zero_grad(set_to_none=True)
        total_stats["skipped_steps"] = torch.ones((), device=device)
    else:
        optimizer.step()
    scheduler.step()
    return mean_loss, total_stats


@torch.no_grad()
def evaluate(
    module: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    device: torch.device,
    precision: str = "auto",
) -> dict[str, torch.Tensor]:
    """Sum a task's per-batch stats over `batches`; the caller reduces across ranks."""
    was_training = module.training
    module.eval()
    totals: dict[str, torch.Tensor] = {}
    for batch in batches:
        with autocast_for(device, precision):
            _, stats = module(batch)
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v.detach().float()
    module.train(was_training)
    return totals


def all_reduce_sum(
    values: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Sum tensors of any shape over all ranks in one collective (identity without a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    tensors = [torch.as_tensor(values[k], device=device, dtype=torch.float64) for k in keys]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    out, at = {}, 0
    for k, t in zip(keys, tensors, strict=True):
        out[k] = flat[at : at + t.numel()].reshape(t.shape)
        at += t.numel()
    return out


@dataclass
class Meter:
    """Throughput (`unit`s per second) and data-wait accounting between two log points.

    `timed_next()` wraps fetching the next batch, so `data_wait_share` is the fraction of wall time the
    step loop spent waiting for input.
    """

    unit: str = "tokens"
    items: int = 0
    steps: int = 0
    waited: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def timed_next(self, it: Iterator):
        t0 = time.perf_counter()
        item = next(it)
        self.waited += time.perf_counter() - t0
        return item

    def read_and_reset(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.started, 1e-9)
        out = {
            f"{self.unit}_per_s": self.items / elapsed,
            "steps_per_s": self.steps / elapsed,
            "step_time_s": elapsed / max(self.steps, 1),
            "data_wait_share": self.waited / elapsed,
        }
        self.items, self.steps, self.waited, self.started = 0, 0, 0.0, now
        return out


class SkippedSteps:
    """Steps whose update was skipped for a non-finite loss or gradient (see `train_step`),
    kept as device tensors and read only when asked: no per-step host sync."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pending = torch.zeros((), device=device)
        self.first = torch.zeros((), device=device, dtype=torch.long)

    def add(self, stats: dict[str, torch.Tensor], step: int) -> None:
        """Take `stats["skipped_steps"]` (0 or 1) of step `step` out of `stats`."""
        now = stats.pop("skipped_steps", None)
        if now is not None:
            self.first = torch.where((self.pending == 0) & (now > 0), step, self.first)
            self.pending = self.pending + now

    def take(self, world: int) -> int:
        """Skipped steps summed over ranks since the last take (a collective)."""
        found = int(all_reduce_sum({"n": self.pending}, self.device)["n"].item())
        self.pending = torch.zeros((), device=self.device)
        return found

    def first_step(self, world: int) -> int:
        """The first step skipped on any rank since the last take (a collective, rarely run)."""
        firsts = all_gather(int(self.first.item()), world)
        return min(f for f in firsts if f > 0)


def all_gather(value, world: int) -> list:
    """Every rank's picklable `value`, in rank order (a collective; itself without a group)."""
    if world == 1:
        return [value]
    out: list = [None] * world
    dist.all_gather_object(out, value)
    return out


def inject_fault(injected: list, module: nn.Module, *, place: str, rank: int, at: int) -> None:
    """Test-only faults (RAYPIPE_FAULTS, see raypipe/faults.py): "crash" ends this process,
    "raise" raises, "nan" poisons a weight so the next loss is NaN."""
    if faults.check(injected, place=place, rank=rank, at=at) == "nan":
        with torch.no_grad():
            next(module.parameters()).fill_(float("nan"))
