"""What a pipeline needs, worked out on the driver before Ray starts.

Resolves the objective, task and model classes; builds them once on the `meta` device (no
memory, no compute) so a bad option or a model that does not fit the objective is a one-line
config error, not a worker traceback; and decides which columns each stage reads and whether
a tokenizer is needed.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

from raypipe import probe, registry
from raypipe.config import FinetuneConfig, LabeledSource, PipelineConfig, Source
from raypipe.data.kinds import PRETRAIN_KINDS, DataKind, labeled_kind, pretrain_kind
from raypipe.errors import UserError
from raypipe.vocab import PAD_ID

# Task settings of `finetune` that only some tasks take (the others are shared by all).
_TASK_SETTINGS = ("num_classes", "pool", "input")


@dataclass
class Plan:
    objective: Any = None  # the Objective class
    task: Any = None  # the Task class
    finetune_input: str | None = None  # "text" | "image" for labeled tasks

    @property
    def pretrain_kind(self) -> str | None:
        return self.objective.data_kind if self.objective else None

    @property
    def pretrain_data(self) -> DataKind | None:
        return pretrain_kind(self.pretrain_kind) if self.objective else None

    @property
    def finetune_data(self) -> DataKind | None:
        return labeled_kind(self.task.data_kind, self.finetune_input) if self.task else None

    def needs_tokenizer(self) -> bool:
        return any(k is not None and k.needs_tokenizer
                   for k in (self.pretrain_data, self.finetune_data))  # fmt: skip

    def tokenizer_columns(self, cfg: PipelineConfig) -> tuple[str, list[str]]:
        """Where to sample text for training a tokenizer: ("unlabeled" | "train", columns)."""
        if self.pretrain_data is not None and self.pretrain_data.needs_tokenizer:
            return "unlabeled", [cfg.data.unlabeled.text_column]
        return "train", self.finetune_data.text_column_names(cfg.data.labeled.train)

    def pretrain_columns(self, src: Source) -> list[str]:
        return self.pretrain_data.column_names(src)

    def labeled_columns(self, src: LabeledSource) -> list[str]:
        return self.finetune_data.column_names(src)


def _resolve(kind: str, name: str, key: str):
    try:
        return registry.resolve(kind, name)
    except KeyError as e:
        raise UserError(f"{key}: {e.args[0]}") from None


#: model section keys -> the model config field they set (the others keep their names)
_MODEL_FIELDS = {"layers": "num_layers", "heads": "num_heads"}


def model_spec(cfg: PipelineConfig, objective=None, *, vocab_size: int | None) -> dict[str, Any]:
    """{"type", "config"}: the model section mapped onto the model class's own config fields,
    plus what the objective requires (a causal LM sets causal=True).

    Fine-tuning from a checkpoint directory takes that checkpoint's model instead.
    """
    init = cfg.finetune.init_directory if cfg.finetune else None
    if init is not None:
        from raypipe.engine.checkpoint import check_weights_file, read_spec

        spec = read_spec(init)
        check_weights_file(init)
        _check_against_checkpoint(cfg, spec)
        return {"type": spec["type"], "config": spec["config"]}
    m = cfg.model
    cls = _resolve("model", m.type, "model.type")
    known = {
        **{_MODEL_FIELDS.get(k, k): v for k, v in m.model_dump(exclude={"type"}).items()},
        "vocab_size": vocab_size,
        "pad_id": PAD_ID,
        **(objective.model_overrides if objective else {}),
    }
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    config = {k: v for k, v in known.items() if k in fields}
    if "vocab_size" in fields and config.get("vocab_size") is None:
        # Build checks run before any tokenizer exists; a run without text (an image task on a
        # two-tower model) never feeds this text tower.
        config["vocab_size"] = 300
    return {"type": m.type, "config": config}


def _check_against_checkpoint(cfg: PipelineConfig, spec: dict[str, Any]) -> None:
    """Model settings given next to `finetune.init: <checkpoint>` must match the checkpoint's
    model (its weights only fit that one): name every field that differs."""
    m = cfg.model
    theirs = {"type": spec["type"], **spec["config"]}
    differ = [
        f"{k} {getattr(m, k)!r} vs {theirs[_MODEL_FIELDS.get(k, k)]!r}"
        for k in sorted(m.model_fields_set)
        if _MODEL_FIELDS.get(k, k) in theirs and getattr(m, k) != theirs[_MODEL_FIELDS.get(k, k)]
    ]
    if differ:
        raise UserError(
            f"finetune.init: checkpoint '{cfg.finetune.init}' holds a different model: "
            f"{'; '.join(differ)} (config vs checkpoint); remove those model settings (the "
            "checkpoint's model is used) or point finetune.init at a matching checkpoint"
        )


def _check_model_fields(cfg: PipelineConfig) -> None:
    """A model setting the chosen model does not take is an error, not a silent no-op."""
    cls = _resolve("model", cfg.model.type, "model.type")
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unused = sorted(
        k for k in cfg.model.model_fields_set - {"type"} if _MODEL_FIELDS.get(k, k) not in fields
    )
    if unused:
        raise UserError(
            f"model.{unused[0]}: model '{cfg.model.type}' does not use "
            f"{', '.join(unused)}; remove {'it' if len(unused) == 1 else 'them'}"
        )


def _option_error(key: str, cls, options: dict, err: Exception) -> UserError:
    params = [
        p
        for p in list(inspect.signature(cls.__init__).parameters)[2:]
        if p not in ("tokenizer_json",)
    ]
    unknown = [k for k in options if k not in params]
    if isinstance(err, TypeError) and unknown:
        return UserError(
            f"{key}: unknown option(s) {unknown} for {cls.__name__}; it takes {params}"
        )
    return UserError(f"{key}: {err}")


def _placeholder_tokenizer() -> str:
    from tokenizers import Tokenizer, models

    return Tokenizer(models.BPE()).to_str()


def _check_data_kind(cls, key: str, kinds) -> None:
    if cls.data_kind not in kinds:
        raise UserError(
            f"{key}: {cls.__name__}.data_kind is {cls.data_kind!r}; it must be one of {list(kinds)}"
        )


def task_options(f: FinetuneConfig, task_cls, input_: str | None, dropout: float) -> dict:
    values = {"num_classes": f.num_classes, "pool": f.pool, "dropout": dropout, "input": input_}
    return {k: values[k] for k in task_cls.option_names} | dict(f.options)


def make_plan(cfg: PipelineConfig) -> Plan:
    """Resolve and build-check everything; raise UserError naming the config key to fix."""
    import torch

    from raypipe.models import build_model

    plan = Plan()
    objective = None
    # The model section builds the model unless fine-tuning starts from a checkpoint directory.
    if cfg.pretrain is not None or cfg.finetune.init_directory is None:
        _check_model_fields(cfg)
    if cfg.pretrain is not None:
        plan.objective = _resolve("objective", cfg.pretrain.objective, "pretrain.objective")
        spec = model_spec(cfg, plan.objective, vocab_size=None)
        with torch.device("meta"):
            try:
                model = build_model(spec)
            except (TypeError, ValueError) as e:
                raise UserError(f"model: {e}") from None
            try:
                objective = plan.objective(model, **cfg.pretrain.options)
            except (TypeError, ValueError) as e:
                raise _option_error(
                    "pretrain.options", plan.objective, cfg.pretrain.options, e
                ) from None
            _check_data_kind(plan.objective, "pretrain.objective", PRETRAIN_KINDS)
            seq_len = cfg.pretrain.seq_len or cfg.model.max_len
            probe.check_objective(objective, spec["config"], seq_len, "pretrain.objective")
        if cfg.pretrain.strategy == "fsdp" and plan.objective.owns_step:
            raise UserError(
                f"pretrain.strategy: fsdp does not support the '{cfg.pretrain.objective}' "
                "objective (it runs its own alternating updates); use strategy: ddp"
            )
    if cfg.finetune is not None:
        f = cfg.finetune
        plan.task = _resolve("task", f.task, "finetune.task")
        _check_data_kind(plan.task, "finetune.task", ("labeled", "pairs"))
        unused = [
            k for k in _TASK_SETTINGS if k in f.model_fields_set and k not in plan.task.option_names
        ]
        if unused:
            raise UserError(f"finetune.{unused[0]}: task '{f.task}' does not use it; remove it")
        spec = model_spec(cfg, plan.objective, vocab_size=None)
        spec["config"].update(
            {k: v for k, v in plan.task.model_overrides.items() if k in spec["config"]}
        )
        model_cls = _resolve("model", spec["type"], "model.type")
        modalities = getattr(model_cls, "modalities", ("text",))
        if plan.task.data_kind == "pairs":
            plan.finetune_input = "text"
        else:
            plan.finetune_input = f.input or modalities[0]
        if plan.finetune_input not in modalities:
            raise UserError(
                f"finetune.input: model '{spec['type']}' reads {list(modalities)}, not "
                f"'{plan.finetune_input}'"
            )
        if plan.finetune_input == "image" and "pool" in f.model_fields_set and f.pool != "mean":
            raise UserError("finetune.pool: image models pool by 'mean' only; remove it")
        with torch.device("meta"):
            backbone = build_model(spec) if objective is None else objective.model
            options = task_options(f, plan.task, plan.finetune_input, f.dropout)
            try:
                from raypipe.tasks import build_task

                task = build_task(
                    f.task, backbone, options, tokenizer_json=_placeholder_tokenizer()
                )
            except (TypeError, ValueError) as e:
                raise _option_error("finetune.options", plan.task, f.options, e) from None
        _fit_max_len(f, spec["config"])
        with torch.device("meta"):
            probe.check_task(task, spec["config"], f.max_len, f.sweep.metric, "finetune.task")
    return plan


def _fit_max_len(f: FinetuneConfig, model_config: dict) -> None:
    """finetune.max_len from a checkpoint's model (its max_len, unless a smaller one is set)."""
    most = model_config.get("max_len")
    if f.max_len is None:
        f.max_len = most or 1
    elif most is not None and f.max_len > most:
        raise UserError(
            f"finetune.max_len: {f.max_len} is more than the checkpoint's model takes "
            f"(max_len {most}); set it to {most} or less, or leave it out"
        )
