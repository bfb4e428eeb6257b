"""The pipeline config's schema: one strict, typed tree, every field with its description.

RUN_ONLY marks the settings that change how a run is carried out rather than what it computes
(`run_only_exclusions` turns them into what a stage fingerprint leaves out). The shared base is
in `base.py`, the data section in `data_schema.py`.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, model_validator

from raypipe.config.base import (  # noqa: F401 - re-exported: the schema's one import path
    RUN_ONLY,
    ConfigError,
    Fraction,
    PositiveFloat,
    PositiveInt,
    Strict,
)
from raypipe.config.data_schema import (  # noqa: F401 - re-exported
    DataConfig,
    LabeledData,
    LabeledSource,
    PreprocessConfig,
    Source,
    TokenizerConfig,
    UnlabeledSource,
)

# --- model and optimisation ---------------------------------------------------------------------


class ModelConfig(Strict):
    type: str = Field("transformer", description="Registered model name or 'pkg.module:Class'.")
    dim: PositiveInt = Field(128, le=65_536, description="Hidden size.")
    layers: PositiveInt = Field(4, le=1024, description="Number of transformer blocks.")
    heads: PositiveInt = Field(4, le=1024, description="Attention heads; must divide dim.")
    max_len: PositiveInt = Field(
        128, le=1_048_576, description="Longest sequence the model accepts."
    )
    mlp_ratio: PositiveInt = Field(4, le=64, description="MLP hidden size as a multiple of dim.")
    dropout: Fraction = Field(0.0, description="Dropout in the backbone.")
    image_size: PositiveInt = Field(
        32, le=8192, description="Image models: images are resized to this."
    )
    patch_size: PositiveInt = Field(4, description="ViT: patch side in pixels.")
    channels: Literal[1, 3] = Field(3, description="Image models: 1 (grayscale) or 3 (RGB).")


class OptimizerBase(Strict):
    lr: PositiveFloat = Field(3e-4, description="Peak learning rate (AdamW).")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.1, description="AdamW weight decay.")
    betas: tuple[Fraction, Fraction] = Field((0.9, 0.95), description="AdamW betas.")
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = Field(
        0.1, description="Cosine decay ends at this fraction of lr."
    )
    grad_clip: PositiveFloat | None = Field(
        1.0, description="Clip the global grad norm; null: off."
    )


class PretrainOptimizer(OptimizerBase):
    warmup_steps: Annotated[int, Field(ge=0)] = Field(0, description="Linear warmup steps.")


class FinetuneOptimizer(OptimizerBase):
    lr: PositiveFloat = Field(1e-4, description="Peak learning rate (AdamW).")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.01, description="AdamW weight decay.")
    warmup_ratio: Fraction = Field(0.1, description="Warmup as a fraction of all steps.")
    backbone_lr_ratio: Annotated[float, Field(gt=0, le=1)] = Field(
        1.0,
        description="The backbone's learning rate as a fraction of lr (the head's): below 1, "
        "fine-tuning moves pretrained weights less than the new head.",
    )


class ScalingConfig(Strict):
    num_workers: PositiveInt = Field(1, le=100_000, description="Training workers (DDP ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: PositiveFloat = Field(
        1.0, description="CPUs reserved per worker; leave some for Ray Data."
    )
    resources_per_worker: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="Extra custom resources per worker."
    )


class PretrainScaling(ScalingConfig):
    in_process: Literal["auto"] | bool = Field(
        "auto",
        description="Train in the `raypipe run` process itself (Ray Train's local mode) rather "
        "than in a Ray worker process: seconds less to start, but a crash of the training ends "
        "the run (the same command resumes it from the latest checkpoint). auto: when one CPU "
        "worker trains on the embedded local Ray (never on a cluster).",
        json_schema_extra=RUN_ONLY,
    )

    @model_validator(mode="after")
    def _one_cpu_worker(self):
        if self.in_process is True and (self.num_workers != 1 or self.use_gpu):
            raise ValueError(
                "in_process: true trains one CPU worker in this process; set num_workers: 1 "
                "and use_gpu: false, or in_process: auto"
            )
        return self


Precision = Literal["auto", "fp32", "bf16"]


class ProbeConfig(Strict):
    every: PositiveInt = Field(
        description="Probe every this many steps (a multiple of pretrain.checkpoint_every: each "
        "probe reads that step's checkpoint), and at the last step."
    )
    method: Literal["linear", "knn"] = Field(
        "linear",
        description="linear: logistic regression on standardized frozen features (ridge "
        "regression for a regression task); knn: k nearest neighbours by cosine similarity.",
    )
    train_rows: PositiveInt = Field(
        1000, le=100_000, description="Each task's first training rows the probe fits on."
    )
    eval_rows: PositiveInt = Field(
        1000, le=100_000, description="Each task's first validation rows the probe scores."
    )
    k: PositiveInt = Field(10, description="knn: the neighbours that vote.")
    patience: PositiveInt | None = Field(
        None,
        description="Stop pretraining once this many probes in a row have improved no task's "
        "figure by more than min_delta (at the first checkpoint after the probe says so; the "
        "probe runs beside training, so a few steps later). None: train to max_steps.",
    )
    min_delta: float = Field(
        0.0, ge=0, description="With patience: the least change that counts as improving."
    )


class PretrainConfig(Strict):
    objective: str = Field("causal_lm", description="Registered objective or 'pkg.module:Class'.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Objective settings, e.g. {mask_prob: 0.15} or {temperature: 0.1}.",
    )
    max_steps: PositiveInt = Field(le=10**9, description="Optimizer steps to train for.")
    batch_size: PositiveInt = Field(32, le=1_048_576, description="Micro-batch size per worker.")
    grad_accum_steps: PositiveInt = Field(1, description="Micro-batches per optimizer step.")
    seq_len: PositiveInt | None = Field(None, description="Tokens per sequence; default max_len.")
    optimizer: PretrainOptimizer = Field(default_factory=PretrainOptimizer)
    scaling: PretrainScaling = Field(default_factory=PretrainScaling)
    precision: Precision = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: a full copy of the model per worker; fsdp: parameters, gradients and "
        "optimizer state sharded over the workers (FSDP2), for models beyond one GPU's memory.",
    )
    log_every: PositiveInt = Field(
        20, description="Steps between metric reports.", json_schema_extra=RUN_ONLY
    )
    checkpoint_every: PositiveInt = Field(100, description="Steps between checkpoints.")
    num_checkpoints_to_keep: PositiveInt = Field(
        2, description="Checkpoints kept in storage.", json_schema_extra=RUN_ONLY
    )
    max_failures: Annotated[int, Field(ge=0)] = Field(
        2,
        description="Worker-group restarts (from the latest checkpoint) before giving up.",
        json_schema_extra=RUN_ONLY,
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="A NaN/Inf loss or gradient: stop naming the step (the last good checkpoint "
        "stays), or skip that batch's update and count it.",
        json_schema_extra=RUN_ONLY,
    )
    prefetch_batches: PositiveInt = Field(
        2, description="Batches Ray Data prepares ahead.", json_schema_extra=RUN_ONLY
    )
    compile: bool = Field(
        False,
        description="torch.compile the objective's forward (worth it on GPU for large models; "
        "the first steps then wait for compilation).",
        json_schema_extra=RUN_ONLY,
    )
    shuffle_buffer: Annotated[int, Field(ge=0)] = Field(
        0, description="Rows in each worker's local shuffle buffer; 0: stream order."
    )
    eval_every: PositiveInt | None = Field(
        None,
        description="Steps between scores on data.unlabeled_validation (and at the last step); "
        "default: checkpoint_every when there is validation data.",
    )
    keep: Literal["last", "best"] = Field(
        "last",
        description="The checkpoint fine-tuning starts from: the last, or the one with the lowest "
        "validation loss (needs data.unlabeled_validation).",
    )
    probe: ProbeConfig | None = Field(
        None,
        description="While pretraining runs: a cheap downstream estimate of each fine-tuning "
        "task (frozen features of a small labeled sample, a linear probe or k-NN), computed off "
        "the training workers and logged as probe/<task>/accuracy (or mse) on the pretrain run.",
        json_schema_extra=RUN_ONLY,
    )

    def fingerprinted(self) -> dict[str, Any]:
        """What the pretrain stage's fingerprint covers: the settings that change what it
        computes (not the RUN_ONLY ones), leaving out eval_every and keep at their defaults so
        stages fingerprinted before they existed are still reused."""
        exclude = run_only_exclusions(type(self))
        defaults = {"eval_every": None, "keep": "last"}
        exclude |= {k: True for k, v in defaults.items() if getattr(self, k) == v}
        out = self.model_dump(exclude=exclude)
        if self.probe is not None and self.probe.patience is not None:
            # The probe decides where pretraining stops: what it computes, then.
            out["probe"] = self.probe.model_dump()
        return out

    @model_validator(mode="after")
    def _fsdp_needs_workers(self):
        if self.strategy == "fsdp" and self.scaling.in_process is True:
            raise ValueError(
                "strategy: fsdp shards the model over worker processes, and in_process: true "
                "starts none; set pretrain.scaling.in_process: auto (or false), or strategy: ddp"
            )
        return self


# --- fine-tuning sweep --------------------------------------------------------------------------


class Distribution(Strict):
    """Exactly one of these keys, e.g. {loguniform: [1.0e-5, 1.0e-3]}."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[PositiveFloat, PositiveFloat] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {list(type(self).model_fields)}, got {given or 'none'}"
            )
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind} needs [low, high] with low < high, got {list(value)}")
        if kind in ("choice", "grid") and not value:
            raise ValueError(f"{kind} needs at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)


class SweepConfig(Strict):
    num_samples: PositiveInt = Field(4, description="Trials per arm (times each grid point).")
    search: Literal["random", "optuna"] = Field(
        "random", description="random (and grid) sampling, or Optuna's TPE."
    )
    scheduler: Literal["asha", "fifo", "pbt"] = Field(
        "asha", description="asha: stop weak trials early; pbt: population based training."
    )
    perturbation_interval: PositiveInt = Field(
        1, description="PBT: epochs between exploit/explore steps."
    )
    grace_period: PositiveInt = Field(1, description="ASHA: epochs before a trial can be stopped.")
    reduction_factor: Annotated[float, Field(gt=1)] = Field(2.0, description="ASHA halving rate.")
    metric: str | None = Field(
        None, description="Metric that picks the best trial; default the task's first metric."
    )
    mode: Literal["min", "max"] | None = Field(
        None, description="Whether metric is minimised; default min for losses and errors."
    )
    space: dict[str, Distribution] = Field(
        default_factory=dict, description="Search space over fine-tune settings."
    )
    max_concurrent_trials: PositiveInt = Field(2, description="Trials running at once.")
    max_failures: Annotated[int, Field(ge=0)] = Field(
        1,
        description="Retries of a crashed trial (it resumes from its latest checkpoint); a trial "
        "that still fails is recorded as failed and the sweep goes on without it.",
        json_schema_extra=RUN_ONLY,
    )
    time_budget_s: PositiveFloat | None = Field(
        None,
        description="Wall-clock seconds each arm's sweep may take, counted across driver "
        "restarts (the time before a crash counts). When it runs out, running trials stop at "
        "their last epoch and pending ones never start; the best epoch of the trials that ran "
        "is registered, and the summary says what was cut. Repeats are not counted.",
    )


#: Fine-tune settings a sweep may search over (keys of `finetune.sweep.space`).
TUNABLE = ("lr", "weight_decay", "batch_size", "freeze_backbone", "dropout", "warmup_ratio",
           "backbone_lr_ratio")  # fmt: skip


class InitEvery(Strict):
    every: PositiveInt = Field(
        description="Every this many pretraining checkpoints (pretrain.checkpoint_every steps "
        "apart), and the last."
    )


class FinetuneConfig(Strict):
    task: str = Field("classification", description="Registered task or 'pkg.module:Class'.")
    num_classes: Annotated[int, Field(ge=2)] = Field(2, description="Number of label classes.")
    init: str = Field(
        "pretrain", description="'pretrain' (this run's), 'scratch', or a checkpoint directory."
    )
    init_steps: list[Annotated[int, Field(gt=0)] | Literal["last"]] | InitEvery | None = Field(
        None,
        description="With init: pretrain, fine-tune from each of these pretraining checkpoints "
        "(steps, multiples of pretrain.checkpoint_every; 'last' is the one fine-tuning starts "
        "from by default), each its own arm: the summary shows the downstream metric against "
        "pretraining steps (and tokens or images seen). E.g. [250, 500, last], or {every: 2} "
        "for every second checkpoint and the last.",
    )
    compare_scratch: bool | None = Field(
        None, description="Run every trial from random init too (default: on, unless init=scratch)."
    )
    epochs: PositiveInt = Field(
        3, le=100_000, description="Epochs per trial (the scheduler may stop earlier)."
    )
    batch_size: PositiveInt = Field(32, le=1_048_576, description="Micro-batch size per worker.")
    max_len: PositiveInt | None = Field(
        None,
        description="Tokens per example (with <bos>); default model.max_len. Longer texts are "
        "cut (the summary says how many): see truncation.",
    )
    truncation: Literal["head", "tail", "head+tail"] = Field(
        "head",
        description="Which tokens a text longer than max_len keeps: its start, its end, or a "
        "quarter from the start and the rest from the end.",
    )
    input: Literal["text", "image"] | None = Field(
        None, description="Which input the task reads; default the model's first modality."
    )
    pool: Literal["mean", "last"] = Field("mean", description="How token states become one vector.")
    freeze_backbone: bool = Field(False, description="Linear probe: train the head only.")
    dropout: Fraction = Field(0.1, description="Dropout before the head.")
    optimizer: FinetuneOptimizer = Field(default_factory=FinetuneOptimizer)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    precision: Precision = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    min_epoch_rows: PositiveInt | None = Field(
        None,
        description="An epoch trains on at least this many rows: a smaller labeled set (say a 1 % "
        "label fraction) is repeated, reshuffled, within each epoch, so that it still gets enough "
        "optimizer steps to learn; null: one pass.",
    )
    label_fractions: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [1.0],
        description="Sweep on each fraction of the labeled training rows (seeded, stratified "
        "by class; the same rows for both arms), e.g. [0.01, 0.1, 1.0].",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Task settings, e.g. {max_new_tokens: 48}."
    )
    repeats: PositiveInt = Field(
        1,
        description="After each arm's sweep, train its best settings again with this many seeds "
        "(head initialisation, data order, dropout; the same seeds and rows for every arm, so "
        "the comparison is paired): the summary shows mean ± sd and the gap's 95 % interval.",
    )
    resample_labels: bool = Field(
        False,
        description="With repeats and a label fraction below 1: each repeat's seed also draws its "
        "own subset of the labeled rows (the same subset for every arm, so the comparison stays "
        "paired); the sweep itself runs on the pipeline seed's subset.",
    )
    baseline: Literal["linear", "none"] | None = Field(
        None,
        description="A classical model fitted on the same labeled rows as the neural arms and "
        "scored on the same validation and test data: linear (TF-IDF word n-grams + logistic "
        "regression on text, logistic regression on pooled pixels for images). Default: the "
        "task's own (linear for classification, ridge regression for regression, none for "
        "translation).",
    )

    @model_validator(mode="after")
    def _distinct_fractions(self) -> FinetuneConfig:
        if not self.label_fractions:
            raise ValueError("label_fractions needs at least one fraction, e.g. [1.0]")
        if len(set(self.label_fractions)) != len(self.label_fractions):
            raise ValueError(f"label_fractions lists a fraction twice: {self.label_fractions}")
        if isinstance(self.init_steps, list):
            if not self.init_steps:
                raise ValueError("init_steps needs at least one step, e.g. [500, last]")
            if len(set(self.init_steps)) != len(self.init_steps):
                raise ValueError(f"init_steps lists a step twice: {self.init_steps}")
        return self

    @property
    def pretrain_steps(self) -> list[int | None]:
        """The pretraining checkpoints the pretrained arms start from: a step, or None for the
        stage's own (the last, or with keep: best the best); [None] without init_steps. The
        {every: N} form is a list once the rules have read it (rules.py)."""
        if self.init_steps is None:
            return [None]
        assert isinstance(self.init_steps, list), "init_steps {every: N} is expanded at load"
        return sorted((s for s in self.init_steps if s != "last"), key=int) + (
            [None] if "last" in self.init_steps else []
        )

    # --- top level ----------------------------------------------------------------------------------

    @property
    def init_directory(self) -> str | None:
        """The checkpoint directory fine-tuning starts from when `init` names one (then the
        pipeline has no pretrain stage); None for 'pretrain' and 'scratch'."""
        return None if self.init in ("pretrain", "scratch") else self.init


class TrackingConfig(Strict):
    uri: str | None = Field(
        None, description="MLflow tracking URI; default MLFLOW_TRACKING_URI, else a local store."
    )
    experiment: str | None = Field(None, description="MLflow experiment; default the name.")
    registered_model: str | None = Field(
        None, description="Registry name of the best model; default the name."
    )
    system_metrics_s: PositiveFloat | None = Field(
        10.0,
        description="Every this many seconds, MLflow's system metrics (CPU, memory, disk, "
        "network; GPU utilisation and memory with nvidia-ml-py) of each pretraining node on the "
        "pretrain run, as system/<node>/…; null: none.",
        json_schema_extra=RUN_ONLY,
    )


TaskName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]


class FinetuneTask(FinetuneConfig):
    """One of several named fine-tuning tasks (`finetune: {sst2: {...}, mr: {...}}`): the
    fine-tuning settings, plus the task's own labeled data and registered model."""

    data: LabeledData = Field(description="This task's labeled data (train, validation, test).")
    registered_model: str | None = Field(
        None, description="Registry name of this task's best model; default <pipeline>-<task>."
    )


def _finetune_form(value: Any) -> str:
    """'tasks' for a mapping of named tasks (no key of its own is a fine-tuning setting),
    'one' for the single-section form."""
    if isinstance(value, FinetuneConfig):
        return "one"
    if isinstance(value, dict) and value and all(isinstance(v, (dict, FinetuneTask))
                                                 for v in value.values()):  # fmt: skip
        if not set(value) & set(FinetuneConfig.model_fields):
            return "tasks"
    return "one"


FinetuneSection = Annotated[
    Annotated[FinetuneConfig, Tag("one")] | Annotated[dict[TaskName, FinetuneTask], Tag("tasks")],
    Discriminator(_finetune_form),
]


class BudgetConfig(Strict):
    """What the pipeline may spend, in worker-hours: one training worker (a Ray Train worker,
    or a trial training itself) held for one hour. Enforced across driver restarts (the time
    before a crash counts) and reported in the summary: spent against the budget, and what it
    cut."""

    worker_hours: PositiveFloat | None = Field(
        None,
        description="The whole pipeline: pretraining and every task's fine-tuning sweeps. With "
        "both stages, also set pretrain_worker_hours or finetune_worker_hours to say how it "
        "splits.",
    )
    pretrain_worker_hours: PositiveFloat | None = Field(
        None,
        description="Pretraining (num_workers x its wall-clock hours). When it is spent, "
        "pretraining checkpoints at that step and stops; fine-tuning starts from there.",
    )
    finetune_worker_hours: PositiveFloat | None = Field(
        None,
        description="Each task's fine-tuning sweeps, shared equally by its arms (pretrained, "
        "scratch, per label fraction) so that they compare on the same spend. When an arm's "
        "share is spent, its running trials stop at their last epoch and pending ones never "
        "start; the best finished epoch is registered. Repeats are not counted.",
    )


class PipelineConfig(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")] = Field(
        description="Pipeline name: experiment, run and directory names derive from it."
    )
    storage: str = Field("./raypipe-runs", description="Where checkpoints and outputs go.")
    seed: int = Field(
        0, ge=0, le=2**31 - 1, description="Seed for model init, data order and sampling."
    )
    plugins: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        max_length=20,
        description="Package folders of your own code (objectives, tasks, models), relative to "
        "the current directory; raypipe imports them and ships them to every Ray process. "
        "Name their classes as 'package.module:Class'.",
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig | None = None
    finetune: FinetuneSection | None = Field(
        None,
        description="The fine-tuning stage; or a mapping of named tasks, each with its own "
        "`data` (labeled splits), all fine-tuned from the same pretraining.",
    )
    budget: BudgetConfig = Field(default_factory=BudgetConfig)


def _config_class(annotation: Any) -> type[BaseModel] | None:
    """The config class inside Optional[...] / Annotated[...], if any."""
    while typing.get_origin(annotation) in (typing.Union, types.UnionType, Annotated):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def run_only_exclusions(cls: type[BaseModel]) -> dict[str, Any]:
    """The fields marked RUN_ONLY in `cls` and the sections under it, as a pydantic `exclude`
    mapping: what a stage fingerprint leaves out."""
    out: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        if (info.json_schema_extra or {}).get("run_only"):
            out[name] = True
        elif (inner := _config_class(info.annotation)) and (sub := run_only_exclusions(inner)):
            out[name] = sub
    return out
