"""The values a fine-tuning sweep is organised by: an `Arm` (where the weights start, on what
share of the labels) and an `ArmResult` (the best trial one arm's sweep found).

Typed from the sweep up to the summary and the registry; `label` is only ever written (run
names, directories, tags), never parsed back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PRETRAINED, SCRATCH, BASELINE = "pretrained", "scratch", "baseline"


@dataclass(frozen=True)
class Arm:
    """One sweep: `base` ("pretrained" or "scratch") on `label_fraction` of the labeled rows;
    a pretrained arm starts from pretraining's checkpoint at `init_step` (None: the stage's
    own, the last or the best: finetune.init_steps)."""

    base: str
    label_fraction: float = 1.0
    init_step: int | None = None

    @property
    def label(self) -> str:
        """`pretrained`, `pretrained_0.01` on a fraction of the labels, `pretrained-step500_0.01`
        from the checkpoint of pretraining step 500."""
        name = self.base if self.init_step is None else f"{self.base}-step{self.init_step}"
        return name if self.label_fraction == 1 else f"{name}_{self.label_fraction:g}"


@dataclass(frozen=True)
class Repeat:
    """The arm's best settings trained again with another seed (`finetune.repeats`)."""

    seed: int
    trial: str  # its run name: `<arm>-seed<seed>`
    metric: float | None  # its best validation value of the sweep metric
    epoch: int | None
    checkpoint: str | None
    test_metrics: dict[str, float] | None = None


@dataclass(frozen=True)
class ArmResult:
    arm: Arm
    best_metric: float | None
    best_checkpoint: str | None
    best_trial: str | None
    best_params: dict[str, Any] = field(default_factory=dict)
    num_trials: int = 0
    num_stopped_early: int = 0
    num_failed: int = 0
    num_train_rows: int | None = None
    best_epoch: int | None = None  # the epoch of the best checkpoint (not always the last)
    #: the best checkpoint's metrics on the test split ("test/accuracy", ...); None: no test split
    test_metrics: dict[str, float] | None = None
    repeats: tuple[Repeat, ...] = ()  # the best settings again, one run per seed
    #: baseline only: chance, beside the baseline, on the test split when there is one, else
    #: on validation: the accuracy of always answering the most common training class, or for
    #: a regression task the mse of always answering the training rows' mean
    majority: float | None = None
    #: a pretrained arm: the pretraining step of the checkpoint it started from
    pretrain_step: int | None = None
    #: ... and what pretraining had seen there: samples, tokens or images, flops (known ones)
    pretrain_seen: dict[str, float] | None = None
    #: with a budget: {cut, total} (cut: trials the budget stopped mid-way or never started)
    #: and with finetune.sweep.time_budget_s {limit_s, spent_s}, with a worker-hour budget
    #: {worker_limit_s, worker_spent_s} (worker-seconds)
    budget: dict[str, float] | None = None

    @property
    def finished_repeats(self) -> list[Repeat]:
        return [r for r in self.repeats if r.metric is not None and r.checkpoint]

    def representative(self) -> tuple[float | None, Repeat | None]:
        """What stands for the arm when models are compared and registered: with repeats, their
        mean validation metric and the median-seed repeat (the lower middle for an even count;
        a run that did happen, unlike a mean); else the sweep's best, and None."""
        done = self.finished_repeats
        if not done:
            return self.best_metric, None
        ranked = sorted(done, key=lambda r: r.metric)
        return sum(r.metric for r in done) / len(done), ranked[(len(ranked) - 1) // 2]

    def to_dict(self) -> dict[str, Any]:
        """The stage marker's and the summary's form of it."""
        out = asdict(self)
        out["arm"] = self.arm.label
        out["base_arm"], out["label_fraction"] = self.arm.base, self.arm.label_fraction
        out["init_step"] = self.arm.init_step
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ArmResult:
        own = ("arm", "base_arm", "label_fraction", "init_step")
        values = {k: v for k, v in raw.items() if k not in own}
        values["repeats"] = tuple(Repeat(**r) for r in raw.get("repeats", ()))
        arm = Arm(raw["base_arm"], raw.get("label_fraction", 1.0), raw.get("init_step"))
        return cls(arm=arm, **values)
