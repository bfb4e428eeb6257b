"""The pipeline config: one strict, typed tree loaded from YAML, with dotted overrides.

Every problem is reported with its key path, all at once, before anything starts.
Imports no torch and no Ray, so `raypipe validate` is fast.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from raypipe import registry, storage
from raypipe.errors import UserError

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class ConfigError(UserError):
    """One or more problems in a pipeline config, each naming its key path."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"{source}: {problems[0]}")
        else:
            lines = "\n".join(f"  - {p}" for p in problems)
            super().__init__(f"{source}: {len(problems)} problems\n{lines}")


#: On a field that changes how a run is carried out, not what it computes: left out of the
#: stage fingerprints (see `run_only_exclusions`), so changing it resumes a stage.
RUN_ONLY = {"run_only": True}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# --- data ---------------------------------------------------------------------------------------


def _path_or_paths(value: Any) -> Any:
    ok = isinstance(value, str) or (
        isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    )
    if not ok:
        raise ValueError(f"must be a path or a non-empty list of paths (got {value!r})")
    return value


class Source(Strict):
    path: Annotated[str | list[str], BeforeValidator(_path_or_paths)] = Field(
        description="A Parquet file, a directory of shards, or a glob; or a list of them, read "
        "in the order listed (say a general corpus, then the task's own text)."
    )
    text_column: str = Field("text", description="Column holding text (or a caption).")
    image_column: str = Field(
        "image", description="Column holding images: encoded bytes (PNG/JPEG) or uint8 arrays."
    )
    max_rows: PositiveInt | None = Field(
        None, description="Read only the first this many rows (a quick run on big data)."
    )

    @property
    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


class LabeledSource(Source):
    label_column: str = Field(
        "label", description="Column holding the label (an integer class, or a number)."
    )
    target_column: str = Field("target", description="Translation: column holding the target text.")


class LabeledData(Strict):
    train: LabeledSource = Field(description="Labeled training shards.")
    validation: LabeledSource = Field(
        description="Labeled validation shards (evaluated every epoch; they pick the trials)."
    )
    test: LabeledSource | None = Field(
        None,
        description="Labeled test shards, untouched by model selection: each arm's best "
        "checkpoint is scored on them once, after its sweep, and the gap is reported on them.",
    )

    @property
    def splits(self) -> list[str]:
        """The labeled splits given: train, validation and, when there is one, test."""
        return ["train", "validation"] + (["test"] if self.test is not None else [])

    def fingerprinted(self) -> dict[str, Any]:
        """What a fine-tune stage's fingerprint covers (no test key when there is none, so
        stages fingerprinted before test splits existed are still reused)."""
        return self.model_dump(exclude=None if self.test is not None else {"test"})


class PreprocessConfig(Strict):
    cpus_per_task: PositiveFloat = Field(
        1.0,
        description="CPUs each Ray Data preprocessing task reserves. Preprocessing never asks "
        "for GPUs, so on a mixed cluster it runs wherever CPUs are offered.",
    )
    concurrency: PositiveInt | None = Field(
        None,
        description="At most this many preprocessing tasks at once (default: Ray Data scales "
        "with the cluster's free CPUs).",
    )


class DataConfig(Strict):
    generate: Literal["quickstart"] | None = Field(
        None, description="Write this built-in synthetic dataset to the paths below when missing."
    )
    unlabeled: Source | None = Field(
        None, description="Unlabeled data for pretraining (text, images or image-text pairs)."
    )
    labeled: LabeledData | None = Field(None, description="Labeled data for fine-tuning.")
    preprocess: PreprocessConfig = Field(
        default_factory=PreprocessConfig,
        description="Resources of the Ray Data tasks that decode, augment and tokenize.",
    )
    bad_images: Literal["fail", "skip"] = Field(
        "fail",
        description="An image that does not decode: fail naming the column, or skip its row "
        "and count it (reported as data/skipped_images).",
    )


class TokenizerConfig(Strict):
    type: Literal["bpe", "byte"] = Field("bpe", description="Byte-level BPE, or raw bytes.")
    vocab_size: Annotated[int, Field(ge=300, le=1_000_000)] = Field(
        4096, description="Target vocabulary size for BPE."
    )
    lowercase: bool = Field(False, description="Lowercase text before tokenizing.")
    sample_rows: PositiveInt = Field(100_000, description="Rows read to train the tokenizer.")
    path: str | None = Field(None, description="Use this tokenizer.json instead of training one.")


# --- model and optimisation ---------------------------------------------------------------------


class ModelConfig(Strict):
    type: str = Field("transformer", description="Registered model name or 'pkg.module:Class'.")
    dim: PositiveInt = Field(128, description="Hidden size.")
    layers: PositiveInt = Field(4, description="Number of transformer blocks.")
    heads: PositiveInt = Field(4, description="Attention heads; must divide dim.")
    max_len: PositiveInt = Field(128, description="Longest sequence the model accepts.")
    mlp_ratio: PositiveInt = Field(4, description="MLP hidden size as a multiple of dim.")
    dropout: Fraction = Field(0.0, description="Dropout in the backbone.")
    image_size: PositiveInt = Field(32, description="Image models: images are resized to this.")
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


class ScalingConfig(Strict):
    num_workers: PositiveInt = Field(1, description="Training workers (DDP ranks).")
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


class PretrainConfig(Strict):
    objective: str = Field("causal_lm", description="Registered objective or 'pkg.module:Class'.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Objective settings, e.g. {mask_prob: 0.15} or {temperature: 0.1}.",
    )
    max_steps: PositiveInt = Field(description="Optimizer steps to train for.")
    batch_size: PositiveInt = Field(32, description="Micro-batch size per worker.")
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


#: Fine-tune settings a sweep may search over (keys of `finetune.sweep.space`).
TUNABLE = ("lr", "weight_decay", "batch_size", "freeze_backbone", "dropout", "warmup_ratio")


class FinetuneConfig(Strict):
    task: str = Field("classification", description="Registered task or 'pkg.module:Class'.")
    num_classes: Annotated[int, Field(ge=2)] = Field(2, description="Number of label classes.")
    init: str = Field(
        "pretrain", description="'pretrain' (this run's), 'scratch', or a checkpoint directory."
    )
    compare_scratch: bool | None = Field(
        None, description="Run every trial from random init too (default: on, unless init=scratch)."
    )
    epochs: PositiveInt = Field(3, description="Epochs per trial (the scheduler may stop earlier).")
    batch_size: PositiveInt = Field(32, description="Micro-batch size per worker.")
    max_len: PositiveInt | None = Field(None, description="Tokens per example; default max_len.")
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
    baseline: Literal["linear", "none"] | None = Field(
        None,
        description="A classical model fitted on the same labeled rows as the neural arms and "
        "scored on the same validation and test data: linear (TF-IDF word n-grams + logistic "
        "regression on text, logistic regression on pooled pixels for images). Default: the "
        "task's own (linear for classification, none for the others).",
    )

    @model_validator(mode="after")
    def _distinct_fractions(self) -> FinetuneConfig:
        if not self.label_fractions:
            raise ValueError("label_fractions needs at least one fraction, e.g. [1.0]")
        if len(set(self.label_fractions)) != len(self.label_fractions):
            raise ValueError(f"label_fractions lists a fraction twice: {self.label_fractions}")
        return self

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


class PipelineConfig(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")] = Field(
        description="Pipeline name: experiment, run and directory names derive from it."
    )
    storage: str = Field("./raypipe-runs", description="Where checkpoints and outputs go.")
    seed: int = Field(0, description="Seed for model init, data order and sampling.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig | None = None
    finetune: FinetuneConfig | None = None


# --- loading ------------------------------------------------------------------------------------


def _cross_checks(cfg: PipelineConfig) -> list[str]:
    """Rules that span several keys; filled-in defaults are resolved here too."""
    problems: list[str] = []
    m = cfg.model
    if not registry.is_known("model", m.type):
        problems.append(f"model.type: {registry.unknown_message('model', m.type)}")
    if m.type != "cnn" and m.dim % m.heads:
        problems.append(f"model.heads: must divide model.dim ({m.dim}), got {m.heads}")
    if cfg.pretrain is None and cfg.finetune is None:
        problems.append("pretrain, finetune: give at least one stage")
    if cfg.pretrain is not None:
        p = cfg.pretrain
        if cfg.data.unlabeled is None:
            problems.append("data.unlabeled: required by the pretrain stage")
        if not registry.is_known("objective", p.objective):
            problems.append(
                f"pretrain.objective: {registry.unknown_message('objective', p.objective)}"
            )
        p.seq_len = p.seq_len or m.max_len
        # Causal LM blocks hold seq_len + 1 tokens; the model sees seq_len of them.
        if p.seq_len > m.max_len:
            problems.append(
                f"pretrain.seq_len: must be <= model.max_len ({m.max_len}), got {p.seq_len}"
            )
    if cfg.finetune is not None:
        f = cfg.finetune
        if cfg.data.labeled is None:
            problems.append("data.labeled: required by the finetune stage")
        if not registry.is_known("task", f.task):
            problems.append(f"finetune.task: {registry.unknown_message('task', f.task)}")
        if f.init == "pretrain" and cfg.pretrain is None:
            problems.append(
                "finetune.init: 'pretrain' needs a pretrain stage; add one, or set init to "
                "'scratch' or a checkpoint directory"
            )
        if f.init_directory is not None:
            # A checkpoint in an object store is checked when the plan reads its model.json.
            if not storage.is_remote(f.init) and not Path(f.init).is_dir():
                problems.append(
                    f"finetune.init: checkpoint directory '{f.init}' does not exist; point it "
                    "at a checkpoint raypipe wrote (<storage>/<name>/pretrain-*/train/step-*)"
                )
            if cfg.pretrain is not None:
                problems.append(
                    "finetune.init: a checkpoint directory takes the place of this pipeline's "
                    "pretrain stage; remove the pretrain section or set init to 'pretrain'"
                )
        if f.compare_scratch and f.init == "scratch":
            problems.append(
                "finetune.compare_scratch: has no effect when init is 'scratch'; remove it"
            )
        if f.compare_scratch is None:
            f.compare_scratch = f.init != "scratch"
        f.max_len = f.max_len or m.max_len
        if f.max_len > m.max_len:
            problems.append(
                f"finetune.max_len: must be <= model.max_len ({m.max_len}), got {f.max_len}"
            )
        problems.extend(_sweep_checks(f))
        known = registry.task_baseline(f.task)
        if f.baseline == "linear" and known != "linear":
            problems.append(
                f"finetune.baseline: task '{f.task}' has no classical baseline; remove it or "
                "set it to none"
            )
        f.baseline = f.baseline or known or "none"
    cfg.tracking.experiment = cfg.tracking.experiment or cfg.name
    cfg.tracking.registered_model = cfg.tracking.registered_model or cfg.name
    return problems


def _sweep_checks(f: FinetuneConfig) -> list[str]:
    """The sweep's space, search and metric; the metric and mode default from the task."""
    problems: list[str] = []
    for key in f.sweep.space:
        if key not in TUNABLE:
            close = difflib.get_close_matches(key, TUNABLE, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(
                f"finetune.sweep.space.{key}: not a tunable setting; {hint}tunable: {list(TUNABLE)}"
            )
            continue
        problems.extend(_check_space_values(key, f.sweep.space[key]))
    s = f.sweep
    grids = [k for k, d in s.space.items() if d.kind == "grid"]
    if s.search == "optuna" and grids:
        problems.append(
            f"finetune.sweep.space: optuna cannot search grid dimensions {grids}; use choice"
        )
    if s.scheduler == "pbt" and not s.space:
        problems.append("finetune.sweep.space: pbt needs a search space to perturb")
    if s.scheduler == "pbt" and s.search == "optuna":
        problems.append(
            "finetune.sweep.search: pbt picks its own settings; use search: random with pbt"
        )
    metrics = registry.task_metrics(f.task)
    s.metric = s.metric or (metrics[0] if metrics else "val/loss")
    if s.mode is None:
        lower_is_better = s.metric.endswith(("loss", "mse", "mae", "error"))
        s.mode = "min" if lower_is_better else "max"
    if metrics is not None and f.sweep.metric not in metrics:
        problems.append(
            f"finetune.sweep.metric: '{f.sweep.metric}' is not reported by task "
            f"'{f.task}'; choose one of {metrics}"
        )
    return problems


def _check_space_values(key: str, dist: Distribution) -> list[str]:
    """Each value a sweep may pick for `key` must be a valid value of that setting; values are
    coerced as the setting itself would be (YAML reads `1e-3`, without a dot, as a string)."""
    owner = FinetuneOptimizer if key in FinetuneOptimizer.model_fields else FinetuneConfig
    values = list(getattr(dist, dist.kind))
    coerced = []
    for value in values:
        try:
            coerced.append(getattr(owner.model_validate({key: value}), key))
        except ValidationError as e:
            why = e.errors()[0]["msg"]
            return [f"finetune.sweep.space.{key}: {value!r} is not a valid {key} ({why})"]
    if dist.kind in ("choice", "grid"):
        setattr(dist, dist.kind, coerced)
    return []


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the config class at `loc` (for 'did you mean' on unknown keys)."""
    cls: Any = PipelineConfig
    for part in loc:
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            if part not in cls.model_fields:
                return []
            cls = cls.model_fields[part].annotation
        elif typing.get_origin(cls) is dict:
            cls = typing.get_args(cls)[1]
        else:
            return []
        # Unwrap Optional[...] / Annotated[...] to the config class inside.
        while typing.get_origin(cls) in (typing.Union, types.UnionType, Annotated):
            args = [a for a in typing.get_args(cls) if a is not type(None)]
            cls = args[0]
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return []


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


def _format_error(err: dict) -> str:
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {known}"
        return f"{path}: unknown key; {hint}"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error":
        return f"{path}: {msg}"
    return f"{path}: {msg} (got {err['input']!r})"


def apply_overrides(raw: dict, overrides: list[str], *, source: str) -> dict:
    """`key.path=value` pairs; the value is parsed as YAML (`3e-4`, `true`, `[1, 2]`)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(source, [f"--set {item!r}: use key.path=value"])
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(source, [f"--set {key}: '{part}' is not a section"])
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(source, [f"--set {key}: value is not valid YAML ({e})"]) from None
    return raw


def parse_config(raw: Any, *, source: str = "config") -> PipelineConfig:
    if not isinstance(raw, dict):
        raise ConfigError(
            source, [f"expected a mapping of keys at the top, got {type(raw).__name__}"]
        )
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(source, [_format_error(err) for err in e.errors()]) from None
    problems = _cross_checks(cfg)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise UserError(f"pipeline file '{path}' not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"{source}: invalid YAML{where}: {problem}") from None
    if overrides and isinstance(raw, dict):
        raw = apply_overrides(raw, overrides, source=source)
    return parse_config(raw, source=source)


def to_yaml(cfg: PipelineConfig) -> str:
    """The fully resolved config (defaults filled in), as saved with every run."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
