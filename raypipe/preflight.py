"""Preflight: everything resolved and checked before a cluster is touched.

`RunContext` is what a run works with (storage, tracking store and experiment, the plan, the
data files of each split); `preflight` builds it, raising a UserError that names the cause and
the fix for anything wrong in the config, the data, the storage or the tracking store; nothing
is written before the last check but the storage probe. `check_offline` is `raypipe validate`:
the same checks of the config and data, writing nothing. This module imports no Ray.

Also here: the tokenizer a run uses (given, from the init checkpoint, or trained on a sample
of the data) and the model spec that follows from it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace

from raypipe import plugins, storage, tracking
from raypipe.config import PipelineConfig
from raypipe.config.tasks import has_tasks, rekeyed, task_views
from raypipe.data import files as datafiles
from raypipe.data.synthetic import generate_quickstart
from raypipe.data.text import check_tokenizer, load_tokenizer, train_tokenizer
from raypipe.engine.checkpoint import TOKENIZER_FILE, has_file, read_tokenizer
from raypipe.errors import UserError
from raypipe.plan import Plan, make_plan, model_spec
from raypipe.progress import console

#: "unlabeled" | "train" | "validation" -> each location listed, with its files
Sources = dict[str, list[tuple[str, list[str]]]]


@dataclass(frozen=True)
class RunContext:
    """What a run works with, resolved and checked before Ray starts."""

    storage: str  # a local path made absolute, or a URI (s3://…)
    tracking_uri: str
    experiment_id: str
    plan: Plan
    sources: Sources = field(default_factory=dict)
    #: with several named fine-tuning tasks, each task's own context (its plan, its labeled
    #: files); this context is then the first task's
    tasks: dict[str, RunContext] = field(default_factory=dict)

    def task(self, name: str) -> RunContext:
        """The context of fine-tuning task `name` (this one in the single-section form)."""
        return self.tasks.get(name, self)

    @property
    def every_file(self) -> list[str]:
        """Every data file the pipeline reads, each task's labeled files included."""
        labeled = [f for c in (self.tasks.values() or [self]) for f in c.train + c.validation
                   + c.test]  # fmt: skip
        return self.unlabeled + labeled

    @property
    def unlabeled(self) -> list[str]:
        return datafiles.all_files(self.sources.get("unlabeled", []))

    @property
    def train(self) -> list[str]:
        return datafiles.all_files(self.sources.get("train", []))

    @property
    def validation(self) -> list[str]:
        return datafiles.all_files(self.sources.get("validation", []))

    @property
    def unlabeled_validation(self) -> list[str]:
        """Held-out unlabeled files pretraining is scored on ([] when there are none)."""
        return datafiles.all_files(self.sources.get("unlabeled_validation", []))

    @property
    def test(self) -> list[str]:
        """The labeled test split's files ([] when there is none)."""
        return datafiles.all_files(self.sources.get("test", []))


def _each_task(cfg: PipelineConfig, check):
    """`check(view's config)` for each named fine-tuning task, its errors in the task's keys:
    {task: result}."""
    out = {}
    for view in task_views(cfg):
        try:
            out[view.name] = check(view.cfg)
        except UserError as e:
            raise rekeyed(view, e) from None
    return out


def check_offline(cfg: PipelineConfig) -> tuple[Plan, Sources]:
    """`raypipe validate`: check the data without writing anything (generated data may be
    absent: then no sources). Returns the plan and the data's sources (with several named
    tasks, each is checked, and the first task's are returned)."""
    if has_tasks(cfg):
        return next(iter(_each_task(cfg, check_offline).values()))
    plugins.activate(cfg.plugins)
    plan = make_plan(cfg)
    sources: Sources = {}
    if all(storage.exists(p) for p in generated_paths(cfg)):
        sources = _data_files(cfg, plan)
    _check_init_tokenizer(cfg)
    if cfg.tracking.uri:
        tracking.check_uri(cfg.tracking.uri, key="tracking.uri")
    return plan, sources


@dataclass(frozen=True)
class Checked:
    """What `check_inputs` found good: everything but the tracking store's experiment."""

    storage: str
    tracking_uri: str
    default_store: bool  # MLflow's store is the local one inside storage
    plan: Plan
    sources: Sources
    tasks: dict[str, Checked] = field(default_factory=dict)  # each named task's (see RunContext)


def check_inputs(cfg: PipelineConfig, *, address: str | None = None) -> Checked:
    """Every check of the config, the data, the storage and the tracking store that can be
    made without opening it, as `raypipe run` makes them before it starts the embedded Ray.
    Nothing is written but the storage probe (and missing quickstart data). With several
    named tasks, each task's pipeline is checked."""
    if has_tasks(cfg):
        each = _each_task(cfg, lambda one: check_inputs(one, address=address))
        return replace(next(iter(each.values())), tasks=each)
    plugins.activate(cfg.plugins)
    plan = make_plan(cfg)
    _refuse_storage_in_job_copy(cfg.storage)
    _warn_relative_data_in_job_copy(cfg)
    _generate_if_missing(cfg)
    sources = _data_files(cfg, plan)
    _check_init_tokenizer(cfg)
    if not address:
        check_resources(cfg, _local_resources(cfg), "this machine")
    where = _check_storage(cfg.storage)
    default_store = not (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"))
    if default_store and storage.is_remote(where):
        raise UserError(
            f"storage: '{cfg.storage}' is an object store, which cannot hold the default local "
            "MLflow store; set tracking.uri to an MLflow server (or MLFLOW_TRACKING_URI)"
        )
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri, where)
    tracking.check_uri(uri, key="tracking.uri")
    tracking.check_reachable(uri)
    return Checked(where, uri, default_store, plan, sources)


def preflight(
    cfg: PipelineConfig, *, address: str | None = None, checked: Checked | None = None
) -> RunContext:
    """All the checks that need no cluster (`check_inputs`, unless `checked` has them), then
    the tracking store's experiment; raises UserError naming the cause and the fix."""
    c = checked or check_inputs(cfg, address=address)
    experiment_id = tracking.open_experiment(
        c.tracking_uri,
        cfg.tracking.experiment,
        artifact_root=storage.join(c.storage, "mlartifacts") if c.default_store else None,
    )
    tasks = {name: RunContext(t.storage, t.tracking_uri, experiment_id, t.plan, t.sources)
             for name, t in c.tasks.items()}  # fmt: skip
    return RunContext(c.storage, c.tracking_uri, experiment_id, c.plan, c.sources, tasks)


def generated_paths(cfg: PipelineConfig) -> list[str]:
    """The paths `data.generate` writes ([] when nothing is generated)."""
    d = cfg.data
    if d.generate is None:
        return []
    if d.unlabeled is None or d.labeled is None:
        raise UserError(
            "data.generate: quickstart writes data.unlabeled and data.labeled; set both paths"
        )
    sources = [d.unlabeled, d.labeled.train, d.labeled.validation]
    if any(len(source.paths) != 1 for source in sources):
        raise UserError(
            "data.generate: quickstart writes one folder for each of data.unlabeled.path and "
            "data.labeled's paths; give each one path, not a list"
        )
    return [source.paths[0] for source in sources]


def _generate_if_missing(cfg: PipelineConfig) -> None:
    paths = generated_paths(cfg)
    if all(storage.exists(p) for p in paths):
        return
    remote = [p for p in paths if storage.is_remote(p)]
    if remote:
        raise UserError(
            f"data.generate: writes local files, but '{remote[0]}' is in an object store and "
            "missing; generate the data locally and upload it, or set data.generate to null"
        )
    rows = generate_quickstart(
        unlabeled_dir=paths[0], train_dir=paths[1], validation_dir=paths[2], seed=cfg.seed
    )
    console.line(f"[data] generated quickstart data: {rows}")


def _in_job_copy() -> bool:
    """Whether this is a `ray job submit` driver run in Ray's unpacked copy of the job's
    working_dir (Ray's job supervisor passes the job's runtime env in this variable)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        runtime_env = (json.loads(raw) if raw else {}).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return False
    return bool(runtime_env.get("working_dir"))


def _refuse_storage_in_job_copy(location: str) -> None:
    """A relative storage under `ray job submit --working-dir` would land in Ray's temporary
    copy of that directory: checkpoints and the MLflow store gone with the job's files."""
    if storage.is_remote(location) or os.path.isabs(os.path.expanduser(location)):
        return
    if _in_job_copy():
        raise UserError(
            f"storage: '{location}' is relative, and this Ray job runs in Ray's temporary copy "
            f"of its working_dir ({os.getcwd()}), which is deleted with the job's files; give "
            "an absolute path every node shares, or a URI (s3://…)"
        )


def _source_paths(section, key: str):
    """(config key, path) of every data source under `section` (a config model)."""
    from pydantic import BaseModel

    from raypipe.config.data_schema import Source

    if isinstance(section, Source):
        yield from ((f"{key}.path", p) for p in section.paths)
    elif isinstance(section, BaseModel):
        for name in type(section).model_fields:
            yield from _source_paths(getattr(section, name), f"{key}.{name}" if key else name)
    elif isinstance(section, list | tuple):
        for i, item in enumerate(section):
            yield from _source_paths(item, f"{key}[{i}]")
    elif isinstance(section, dict):
        for name, item in section.items():
            yield from _source_paths(item, f"{key}.{name}")


def _warn_relative_data_in_job_copy(cfg: PipelineConfig) -> None:
    """A relative data path under `ray job submit --working-dir` reads (or, for generated
    data, writes) Ray's temporary copy of that directory: say so once, since the data a user
    meant may be elsewhere."""
    if not _in_job_copy():
        return
    relative = [f"{k} '{p}'" for k, p in _source_paths(cfg, "")
                if not storage.is_remote(p) and not os.path.isabs(os.path.expanduser(p))]  # fmt: skip
    if relative:
        console.line(
            f"[data] warning: {', '.join(relative[:3])}{' …' if len(relative) > 3 else ''} "
            f"relative: read from this Ray job's temporary copy of its working_dir "
            f"({os.getcwd()}), i.e. what `ray job submit` uploaded; give absolute paths every "
            "node shares, or URIs, for data that lives elsewhere"
        )


def _check_storage(location: str) -> str:
    """Write and delete a probe file: fail now, not after an hour of training."""
    where = storage.normalize(location)
    try:
        storage.makedirs(where)
        probe = storage.join(where, ".raypipe-write-test")
        storage.write_text(probe, "ok")
        storage.delete_file(probe)
    except OSError as e:
        reason = e.strerror or str(e).splitlines()[0]
        fix = (
            "check the bucket name and the credentials in the environment (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for S3-compatible stores)"
            if storage.is_remote(where)
            else "choose a writable directory"
        )
        raise UserError(f"storage: '{location}' is not writable ({reason}); {fix}") from None
    return where


def _data_files(cfg: PipelineConfig, plan: Plan) -> dict[str, list[tuple[str, list[str]]]]:
    """Resolve and check every shard a stage will read: each split's listed locations, each
    with its files (`datafiles.resolve_sources`)."""
    d = cfg.data
    sources: dict[str, list[tuple[str, list[str]]]] = {}
    out: dict[str, list[str]] = {}
    if cfg.pretrain is not None and d.unlabeled is not None:
        sources["unlabeled"] = datafiles.resolve_sources(
            d.unlabeled.path, key="data.unlabeled.path"
        )
        out["unlabeled"] = datafiles.all_files(sources["unlabeled"])
        columns = plan.pretrain_columns(d.unlabeled)
        datafiles.check_columns(out["unlabeled"], columns, key="data.unlabeled", source=d.unlabeled)
        datafiles.check_not_empty(out["unlabeled"], key="data.unlabeled")
        datafiles.check_values(out["unlabeled"], columns, key="data.unlabeled")
        if d.unlabeled_validation is not None:
            key = "data.unlabeled_validation"
            sources["unlabeled_validation"] = datafiles.resolve_sources(
                d.unlabeled_validation.path, key=f"{key}.path"
            )
            files = datafiles.all_files(sources["unlabeled_validation"])
            held = plan.pretrain_columns(d.unlabeled_validation)
            datafiles.check_columns(files, held, key=key, source=d.unlabeled_validation)
            datafiles.check_not_empty(files, key=key)
            datafiles.check_values(files, held, key=key)
    if cfg.finetune is not None and d.labeled is not None:
        sources |= _labeled_files(cfg, plan)
    if cfg.tokenizer.path and not storage.is_file(cfg.tokenizer.path):
        raise UserError(f"tokenizer.path: '{cfg.tokenizer.path}' does not exist")
    return sources


def _labeled_files(cfg: PipelineConfig, plan: Plan) -> Sources:
    """Each labeled split's sources, checked from the footers: columns, types, rows, values;
    then whether a training batch fits the smallest label fraction."""
    sources: Sources = {}
    labeled, task = plan.finetune_data.labeled, plan.task
    train_rows = 0
    for split in cfg.data.labeled.splits:
        src = getattr(cfg.data.labeled, split)
        key = f"data.labeled.{split}"
        sources[split] = datafiles.resolve_sources(src.path, key=f"{key}.path")
        files = datafiles.all_files(sources[split])
        columns = plan.labeled_columns(src)
        datafiles.check_columns(files, columns, key=key, source=src)
        rows = datafiles.check_not_empty(files, key=key)
        datafiles.check_values(
            files, columns, key=key,
            label_column=src.label_column if labeled else None,
            label_dtype=task.label_dtype if labeled else None,
            num_classes=cfg.finetune.num_classes if "num_classes" in task.option_names else None,
        )  # fmt: skip
        if split == "train":
            train_rows = min(rows, src.max_rows or rows)
    if labeled and "num_classes" in task.option_names:
        datafiles.check_one_label_map(
            {s: datafiles.all_files(v) for s, v in sources.items()}, key="data.labeled"
        )
    _check_batch_fits(cfg, train_rows)
    return sources


def given_tokenizer(path: str, *, key: str = "tokenizer.path"):
    """A tokenizer file (HF `tokenizers` JSON) read and checked, or one line saying why not."""
    try:
        tok = load_tokenizer(storage.read_text(path))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"{key}: cannot read '{path}' ({getattr(e, 'strerror', None) or e})"
        ) from None
    except Exception as e:  # tokenizers raises its own Exception for a malformed file
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(
            f"{key}: '{path}' is not a tokenizer.json of HF tokenizers ({first}); give one "
            "raypipe (or `tokenizers`) saved, or remove tokenizer.path to train one"
        ) from None
    try:
        check_tokenizer(tok)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None
    return tok


def _check_batch_fits(cfg: PipelineConfig, train_rows: int) -> None:
    """Each worker's epoch must hold one whole batch at the smallest label fraction (batches
    are whole: the last partial one is dropped), or fine-tuning would take no step at all."""
    f = cfg.finetune
    sizes = [f.batch_size]
    space = f.sweep.space.get("batch_size")
    if space is not None and space.kind in ("grid", "choice"):
        sizes = list(getattr(space, space.kind))
    fraction = min(f.label_fractions)
    rows = max(1, int(train_rows * fraction))
    if f.min_epoch_rows and rows < f.min_epoch_rows:
        rows *= math.ceil(f.min_epoch_rows / rows)
    each = rows // f.scaling.num_workers
    if max(sizes) > each:
        where = f" at label fraction {fraction:g}" if fraction < 1 else ""
        raise UserError(
            f"finetune.batch_size: {max(sizes)} is more than the {each} training rows each of "
            f"{f.scaling.num_workers} worker(s) gets per epoch{where}; lower the batch size, or "
            "set finetune.min_epoch_rows to repeat a small subset within an epoch"
        )


def _check_init_tokenizer(cfg: PipelineConfig) -> None:
    """A given tokenizer must load, and be the one the init checkpoint was trained with."""
    if cfg.tokenizer.path:
        given = given_tokenizer(cfg.tokenizer.path)
    init = cfg.finetune.init_directory if cfg.finetune else None
    if not (cfg.tokenizer.path and init and has_file(init, TOKENIZER_FILE)):
        return
    theirs = load_tokenizer(read_tokenizer(init))
    if given.get_vocab() != theirs.get_vocab():
        raise UserError(
            f"tokenizer.path: '{cfg.tokenizer.path}' is not the tokenizer checkpoint '{init}' "
            f"was trained with (vocabularies of {given.get_vocab_size()} and "
            f"{theirs.get_vocab_size()} tokens differ); remove tokenizer.path to use the "
            "checkpoint's own"
        )


def check_resources(cfg: PipelineConfig, have: dict[str, float], where: str) -> None:
    """Training workers that ask for more than the cluster can ever have would wait forever
    for a placement: say so instead."""
    for name, stage in (("pretrain", cfg.pretrain), ("finetune", cfg.finetune)):
        if stage is None:
            continue
        sc = stage.scaling
        per_worker = {"CPU": sc.cpus_per_worker, **sc.resources_per_worker}
        if sc.use_gpu:
            per_worker["GPU"] = 1
        for resource, amount in per_worker.items():
            need = amount * sc.num_workers
            if need > have.get(resource, 0):
                fix = (
                    f"set {name}.scaling.use_gpu: false, or run on a cluster with GPU nodes"
                    if resource == "GPU"
                    else f"lower {name}.scaling.num_workers or its per-worker {resource}"
                )
                raise UserError(
                    f"{name}.scaling: {sc.num_workers} worker(s) need {need:g} {resource} but "
                    f"{where} can have at most {have.get(resource, 0):g}; {fix}"
                )


def _local_resources(cfg: PipelineConfig) -> dict[str, float]:
    """What an embedded Ray on this machine will have (Ray counts the same way)."""
    have: dict[str, float] = {"CPU": float(os.cpu_count() or 1), "GPU": 0.0}
    if any(s is not None and s.scaling.use_gpu for s in (cfg.pretrain, cfg.finetune)):
        import torch

        have["GPU"] = float(torch.cuda.device_count())
    return have


def tokenizer_json(cfg: PipelineConfig, ctx: RunContext) -> str | None:
    """The tokenizer for a pipeline's first stage: given, from the init checkpoint, or trained.
    None when no stage reads text."""
    if not ctx.plan.needs_tokenizer():
        return None
    if cfg.tokenizer.path:  # prepare() checked it against the init checkpoint's
        text = storage.read_text(cfg.tokenizer.path)
        check_tokenizer(load_tokenizer(text))
        return text
    init = cfg.finetune.init_directory if cfg.finetune else None
    if init is not None:
        if not has_file(init, TOKENIZER_FILE):
            raise UserError(
                f"finetune.init: checkpoint '{init}' has no tokenizer (it was pretrained on "
                "images); fine-tune it on images, or give tokenizer.path"
            )
        return read_tokenizer(init)
    split, columns = ctx.plan.tokenizer_columns(cfg)
    files = ctx.unlabeled if split == "unlabeled" else ctx.train
    texts: list[str] = []
    for column in columns:
        texts += datafiles.read_column_sample(files, column, cfg.tokenizer.sample_rows)
    t = cfg.tokenizer
    return train_tokenizer(
        texts, kind=t.type, vocab_size=t.vocab_size, lowercase=t.lowercase
    ).to_str()


def model_spec_for(cfg: PipelineConfig, ctx: RunContext, tokenizer_json: str | None) -> dict:
    """The model to build: the model section (sized to the tokenizer) or the init checkpoint's."""
    vocab = load_tokenizer(tokenizer_json).get_vocab_size() if tokenizer_json else None
    return model_spec(cfg, ctx.plan.objective, vocab_size=vocab)


def dataset_inputs(
    cfg: PipelineConfig, ctx: RunContext, *, only=None, prefix: str | None = None
) -> list[tuple[str, str, str, str]]:
    """The pipeline's data as MLflow dataset inputs: (name, location, digest, context); a
    list of locations gives one input each (NAME-pretrain-1, -2, ...); `prefix` in place of
    NAME (a named task's `<pipeline>-<task>`)."""
    out = []
    for context, split in (("pretrain", "unlabeled"),
                           ("pretrain-validation", "unlabeled_validation"), ("train", "train"),
                           ("validation", "validation"), ("test", "test")):  # fmt: skip
        if only is not None and context not in only:
            continue
        found = ctx.sources.get(split, [])
        for i, (location, files) in enumerate(found):
            name = f"{prefix or cfg.name}-{context}" + (f"-{i + 1}" if len(found) > 1 else "")
            digest = datafiles.manifest_digest(files)
            out.append((name, storage.normalize(location), digest, context))
    return out
