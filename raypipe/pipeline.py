"""Plan and run a pipeline: checks up front, then stages under one MLflow run tree.

Every check that needs no cluster (config, data paths, columns, storage, tracking store) runs
before Ray starts. Each stage has a fingerprint (its resolved config, its input data and its
upstream fingerprint); a completed stage writes `stage.json` last and is reused on re-run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raypipe import localray, progress, storage, timing, tracking
from raypipe.config import PipelineConfig, to_yaml
from raypipe.data import files as datafiles
from raypipe.errors import UserError
from raypipe.plan import Plan, make_plan
from raypipe.progress import PROGRESS_MARK, STATUS_MARK, console
from raypipe.summary import ARTIFACT as SUMMARY_ARTIFACT
from raypipe.summary import StageReport, Summary, label_efficiency
from raypipe.summary import to_json as summary_to_json

STAGE_MARKER = "stage.json"
#: Pretrain settings that change how a run is carried out, not what it computes: left out of
#: the fingerprint, so changing one (say, on_nonfinite after a NaN stop) resumes the stage.
RUN_ONLY_PRETRAIN = {
    "scaling": {"in_process": True},  # where one worker trains (results are the same)
    **dict.fromkeys(
        [
            "max_failures",
            "on_nonfinite",
            "log_every",
            "prefetch_batches",
            "num_checkpoints_to_keep",
            "compile",
        ],
        True,
    ),
}


@dataclass
class Inputs:
    """Everything resolved before Ray starts."""

    storage: str  # a local path made absolute, or a URI (s3://…)
    tracking_uri: str
    experiment_id: str
    plan: Plan
    #: "unlabeled", "train", "validation" -> each location listed with its files
    sources: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)

    @property
    def unlabeled(self) -> list[str]:
        return datafiles.all_files(self.sources.get("unlabeled", []))

    @property
    def train(self) -> list[str]:
        return datafiles.all_files(self.sources.get("train", []))

    @property
    def validation(self) -> list[str]:
        return datafiles.all_files(self.sources.get("validation", []))


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _generated_paths(cfg: PipelineConfig) -> list[str]:
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
    paths = _generated_paths(cfg)
    if all(storage.exists(p) for p in paths):
        return
    remote = [p for p in paths if storage.is_remote(p)]
    if remote:
        raise UserError(
            f"data.generate: writes local files, but '{remote[0]}' is in an object store and "
            "missing; generate the data locally and upload it, or set data.generate to null"
        )
    from raypipe.data.synthetic import generate_quickstart

    rows = generate_quickstart(
        unlabeled_dir=paths[0], train_dir=paths[1], validation_dir=paths[2], seed=cfg.seed
    )
    console.line(f"[data] generated quickstart data: {rows}")


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
        datafiles.check_columns(out["unlabeled"], columns, key="data.unlabeled")
        datafiles.check_values(out["unlabeled"], columns, key="data.unlabeled")
    if cfg.finetune is not None and d.labeled is not None:
        for split in ("train", "validation"):
            src = getattr(d.labeled, split)
            key = f"data.labeled.{split}"
            sources[split] = datafiles.resolve_sources(src.path, key=f"{key}.path")
            out[split] = datafiles.all_files(sources[split])
            columns = plan.labeled_columns(src)
            datafiles.check_columns(out[split], columns, key=key)
            task = plan.task
            labeled = task.data_kind != "pairs"
            datafiles.check_values(
                out[split],
                columns,
                key=key,
                label_column=src.label_column if labeled else None,
                label_dtype=task.label_dtype if labeled else None,
                num_classes=(
                    cfg.finetune.num_classes if "num_classes" in task.option_names else None
                ),
            )
    if cfg.tokenizer.path and not storage.is_file(cfg.tokenizer.path):
        raise UserError(f"tokenizer.path: '{cfg.tokenizer.path}' does not exist")
    return sources


def _init_checkpoint(cfg: PipelineConfig) -> str | None:
    """The checkpoint directory a fine-tune-only pipeline starts from, if any."""
    f = cfg.finetune
    if cfg.pretrain is None and f is not None and f.init not in ("pretrain", "scratch"):
        return f.init
    return None


def _check_init_tokenizer(cfg: PipelineConfig) -> None:
    """A given tokenizer must be the one the init checkpoint was trained with."""
    from raypipe.data.text import load_tokenizer
    from raypipe.engine.checkpoint import TOKENIZER_FILE, has_file, read_tokenizer

    init = _init_checkpoint(cfg)
    if not (cfg.tokenizer.path and init and has_file(init, TOKENIZER_FILE)):
        return
    given = load_tokenizer(storage.read_text(cfg.tokenizer.path))
    theirs = load_tokenizer(read_tokenizer(init))
    if given.get_vocab() != theirs.get_vocab():
        raise UserError(
            f"tokenizer.path: '{cfg.tokenizer.path}' is not the tokenizer checkpoint '{init}' "
            f"was trained with (vocabularies of {given.get_vocab_size()} and "
            f"{theirs.get_vocab_size()} tokens differ); remove tokenizer.path to use the "
            "checkpoint's own"
        )


def prepare_offline(cfg: PipelineConfig) -> None:
    """`raypipe validate`: check the data without writing anything (generated data may be absent)."""
    plan = make_plan(cfg)
    if all(storage.exists(p) for p in _generated_paths(cfg)):
        _data_files(cfg, plan)


def prepare(cfg: PipelineConfig, *, address: str | None = None) -> Inputs:
    """All the checks that need no cluster; raises UserError naming the cause and the fix.
    Nothing is written before the last of them but the storage probe."""
    plan = make_plan(cfg)
    _generate_if_missing(cfg)
    sources = _data_files(cfg, plan)
    _check_init_tokenizer(cfg)
    if not address:
        _check_resources(cfg, _local_resources(cfg), "this machine")
    where = _check_storage(cfg.storage)
    default_store = not (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"))
    if default_store and storage.is_remote(where):
        raise UserError(
            f"storage: '{cfg.storage}' is an object store, which cannot hold the default local "
            "MLflow store; set tracking.uri to an MLflow server (or MLFLOW_TRACKING_URI)"
        )
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri, where)
    experiment_id = tracking.open_experiment(
        uri,
        cfg.tracking.experiment,
        artifact_root=storage.join(where, "mlartifacts") if default_store else None,
    )
    return Inputs(where, uri, experiment_id, plan, sources)


def _forward_progress_only() -> None:
    """Show only raypipe's progress lines from Ray workers on this console.

    Ray forwards every worker's stdout/stderr to the driver (hundreds of lines per run); they
    all stay in Ray's session log directory. Uses Ray's log dispatcher, which is internal: if
    it moves, Ray's default forwarding stays in place.
    """
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return

    def forward(data: dict) -> None:
        for line in data.get("lines", ()):
            if (at := line.find(STATUS_MARK)) >= 0:
                console.status(line[at + len(STATUS_MARK) :].strip())
            elif (at := line.find(PROGRESS_MARK)) >= 0:
                console.line(line[at + len(PROGRESS_MARK) :].strip())

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("raypipe_progress", forward)


def _check_reachable(address: str) -> None:
    """Fail in seconds on a cluster address nothing listens on (Ray itself retries for minutes)."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or "/" in target:
        return  # "auto", "local" and other forms Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(
            f"cannot reach the Ray cluster at '{address}' ({e.strerror or e}); check --address "
            "or RAY_ADDRESS, or leave both unset to start a local Ray"
        ) from None


def _check_resources(cfg: PipelineConfig, have: dict[str, float], where: str) -> None:
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


def _cluster_resources() -> dict[str, float] | None:
    """The most the connected cluster can grow to: from its autoscaler's node types when the
    autoscaler publishes them (autoscaler v2, KubeRay), what it has now when no autoscaler
    runs, and None (unknown) under an autoscaler that does not say."""
    import ray

    try:  # internal APIs: if they move, no check rather than a wrong one
        from ray._private import ray_constants
        from ray._private.state import state
        from ray.experimental.internal_kv import _internal_kv_get

        most = state.get_max_resources_from_cluster_config()
        if most:
            return {k: float(v) for k, v in most.items()}
        if _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) is not None:
            return None
    except Exception:  # noqa: BLE001
        return None
    return {k: float(v) for k, v in ray.cluster_resources().items()}


def _init_ray(address: str | None, *, verbose: bool) -> bool:
    """Connect to `address` / RAY_ADDRESS, or start an embedded local Ray (or take over the one
    `localray.start_in_background` began). True if we started it."""
    import ray

    begun_early = not address and localray.join()
    if not begun_early:
        if ray.is_initialized():
            return False
        if address:
            _check_reachable(address)
        try:
            localray.init(address, verbose=verbose)
        except ConnectionError as e:
            raise UserError(
                f"cannot connect to the Ray cluster at '{address}' ({e}); check --address or "
                "RAY_ADDRESS, or leave both unset to start a local Ray"
            ) from None
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if not verbose:
        _forward_progress_only()
    if address:
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        total = ray.cluster_resources()
        console.line(
            f"[ray] connected to the Ray cluster at {address}: {nodes} node(s), "
            f"{total.get('CPU', 0):g} CPU(s), {total.get('GPU', 0):g} GPU(s) now "
            "(an autoscaler may add more)"
        )
    else:
        console.line("[ray] started a local Ray on this machine")
    return True


def _tokenizer_json(cfg: PipelineConfig, inputs: Inputs) -> str | None:
    """The tokenizer for a pipeline's first stage: given, from the init checkpoint, or trained.
    None when no stage reads text."""
    from raypipe.data.text import check_tokenizer, load_tokenizer, train_tokenizer
    from raypipe.engine.checkpoint import TOKENIZER_FILE, has_file, read_tokenizer

    if not inputs.plan.needs_tokenizer():
        return None
    if cfg.tokenizer.path:  # prepare() checked it against the init checkpoint's
        text = storage.read_text(cfg.tokenizer.path)
        check_tokenizer(load_tokenizer(text))
        return text
    init = _init_checkpoint(cfg)
    if init is not None:
        if not has_file(init, TOKENIZER_FILE):
            raise UserError(
                f"finetune.init: checkpoint '{init}' has no tokenizer (it was pretrained on "
                "images); fine-tune it on images, or give tokenizer.path"
            )
        return read_tokenizer(init)
    split, columns = inputs.plan.tokenizer_columns(cfg)
    files = inputs.unlabeled if split == "unlabeled" else inputs.train
    texts: list[str] = []
    for column in columns:
        texts += datafiles.read_column_sample(files, column, cfg.tokenizer.sample_rows)
    t = cfg.tokenizer
    return train_tokenizer(
        texts, kind=t.type, vocab_size=t.vocab_size, lowercase=t.lowercase
    ).to_str()


def _model_spec(cfg: PipelineConfig, inputs: Inputs, tokenizer_json: str | None) -> dict:
    from raypipe.data.text import load_tokenizer
    from raypipe.plan import model_spec

    vocab = load_tokenizer(tokenizer_json).get_vocab_size() if tokenizer_json else None
    return model_spec(cfg, inputs.plan.objective, vocab_size=vocab)


@dataclass
class _Stage:
    """One stage's directory, its MLflow run, and the marker of a previous completed run."""

    name: str
    dir: str  # local path or URI
    fingerprint: str
    run: tracking.RunRef
    marker: dict[str, Any] | None
    started: float = field(default_factory=time.perf_counter)

    def complete(self, outputs: dict[str, Any]) -> None:
        """Write the marker last: only a stage that finished has one."""
        payload = {"fingerprint": self.fingerprint, "mlflow_run_id": self.run.run_id, **outputs}
        storage.write_text(
            storage.join(self.dir, STAGE_MARKER), json.dumps(payload, indent=2, default=str)
        )

    @property
    def computed_by(self) -> tracking.RunRef:
        """The run that logged the stage's metrics: this one, or the run a reused stage's
        outputs came from."""
        if self.marker is None:
            return self.run
        return tracking.RunRef(
            self.run.tracking_uri, self.run.experiment_id, self.marker["mlflow_run_id"]
        )

    def report(self, summary: Summary, metrics: dict[str, Any]) -> None:
        status = "reused" if self.marker is not None else "done"
        elapsed = time.perf_counter() - self.started
        summary.stages.append(StageReport(self.name, status, elapsed, metrics))


@contextlib.contextmanager
def _stage(
    cfg: PipelineConfig, inputs: Inputs, parent: tracking.RunRef, name: str, fp: str, need_ray
):
    """Open a stage: reuse it when its marker exists, else prepare its directory and make sure
    Ray is up (`need_ray()`). The stage's MLflow run ends FINISHED, or FAILED if the body
    raises."""
    stage_dir = storage.join(inputs.storage, cfg.name, f"{name}-{fp[:12]}")
    marker_path = storage.join(stage_dir, STAGE_MARKER)
    marker = json.loads(storage.read_text(marker_path)) if storage.is_file(marker_path) else None
    tags = {"raypipe.stage": name, "raypipe.fingerprint": fp}
    # A resumed pipeline run already has this stage's run: continue it, never add a second.
    found = tracking.find_run(
        tracking_uri=inputs.tracking_uri,
        experiment_id=inputs.experiment_id,
        kind="stage",
        tags=tags,
        parent=parent,
    )
    if marker is not None:
        console.line(f"[{name}] reusing the completed stage {tracking.redact(stage_dir)}")
    else:
        storage.makedirs(stage_dir)
        storage.write_text(storage.join(stage_dir, "config.yaml"), to_yaml(cfg))
        if found is not None:
            console.line(f"[{name}] resuming the interrupted stage {tracking.redact(stage_dir)}")
        need_ray()
    if found is not None:
        run, status = found
        if status != "FINISHED":
            tracking.reopen_run(run)
    else:
        tags["raypipe.reused"] = str(marker is not None).lower()
        if marker is not None:
            tags["raypipe.reused_from_run"] = marker["mlflow_run_id"]
        run = tracking.start_run(
            tracking_uri=inputs.tracking_uri,
            experiment_id=inputs.experiment_id,
            name=name,
            kind="stage",
            parent=parent,
            tags=tags,
        )
    try:
        yield _Stage(name, stage_dir, fp, run, marker)
    except BaseException:
        console.end_status()
        tracking.end_run(run, "FAILED")
        raise
    console.end_status()
    tracking.end_run(run)


def _run_pretrain(
    cfg, inputs, parent, summary, need_ray, *, local_ray: bool
) -> tuple[str, str, dict, str]:
    """Returns (checkpoint dir, tokenizer json, model spec, stage fingerprint)."""
    from raypipe.engine.checkpoint import TOKENIZER_FILE, has_file, read_spec, read_tokenizer

    p = cfg.pretrain
    fp = _fingerprint(
        "pretrain",
        cfg.model.model_dump(),
        cfg.tokenizer.model_dump(),
        p.model_dump(exclude=RUN_ONLY_PRETRAIN),
        cfg.data.unlabeled.model_dump(),
        cfg.data.bad_images,
        cfg.seed,
        datafiles.manifest_digest(inputs.unlabeled),
    )
    with _stage(cfg, inputs, parent, "pretrain", fp, need_ray) as stage:
        out = stage.marker
        if out is None:
            from raypipe.stages.pretrain import run_pretrain

            tokenizer_json = _tokenizer_json(cfg, inputs)
            spec = _model_spec(cfg, inputs, tokenizer_json)
            logger = tracking.RunLogger(stage.run)
            logger.log_params({"fingerprint": fp, "model": spec["config"], **p.model_dump()})
            result = run_pretrain(
                cfg=p,
                model_spec=spec,
                files=inputs.unlabeled,
                source=cfg.data.unlabeled,
                data_kind=inputs.plan.pretrain_kind,
                text_extra=inputs.plan.objective.text_extra,
                tokenizer_json=tokenizer_json,
                stage_dir=stage.dir,
                run=stage.run,
                seed=cfg.seed,
                fingerprint=fp,
                preprocess=cfg.data.preprocess,
                skip_undecodable=cfg.data.bad_images == "skip",
                local_ray=local_ray,
            )
            out = {
                "checkpoint": result.checkpoint,
                "steps": result.steps,
                "final_loss": result.final_loss,
            }
            if result.skipped_images is not None:
                out["skipped_images"] = result.skipped_images
            stage.complete(out)
        # A reused stage's run carries the same outcome as the run that computed it.
        tracking.RunLogger(stage.run).log_metrics(
            {
                "final/loss": out["final_loss"],
                **(
                    {"data/skipped_images": out["skipped_images"]}
                    if "skipped_images" in out
                    else {}
                ),
            },
            out["steps"],
        )
        tracking.RunLogger(stage.run).set_tags({"raypipe.checkpoint": out["checkpoint"]})
        tracking.log_datasets(stage.run, _datasets(cfg, inputs, only=("pretrain",)))
        _plot_pretraining(cfg, stage)
    stage.report(
        summary,
        {
            "steps": out["steps"],
            "final loss": round(out["final_loss"], 4),
            **({"skipped images": out["skipped_images"]} if "skipped_images" in out else {}),
        },
    )
    ckpt = out["checkpoint"]
    spec = read_spec(ckpt)
    tokenizer_json = read_tokenizer(ckpt) if has_file(ckpt, TOKENIZER_FILE) else None
    return ckpt, tokenizer_json, {"type": spec["type"], "config": spec["config"]}, fp


def _datasets(cfg: PipelineConfig, inputs: Inputs, *, only=None) -> list[tuple[str, str, str, str]]:
    """The pipeline's data as MLflow dataset inputs: (name, location, digest, context); a
    list of locations gives one input each (NAME-pretrain-1, -2, ...)."""
    out = []
    for context, split in (("pretrain", "unlabeled"), ("train", "train"),
                           ("validation", "validation")):  # fmt: skip
        if only is not None and context not in only:
            continue
        found = inputs.sources.get(split, [])
        for i, (location, files) in enumerate(found):
            name = f"{cfg.name}-{context}" + (f"-{i + 1}" if len(found) > 1 else "")
            digest = datafiles.manifest_digest(files)
            out.append((name, storage.normalize(location), digest, context))
    return out


def _lineage(init_ckpt: str | None) -> dict[str, Any]:
    """Tags that tie fine-tuning to the pretraining it started from: the checkpoint, its step
    and the MLflow run that trained it (when the checkpoint names one)."""
    if not init_ckpt:
        return {}
    from raypipe.engine.checkpoint import read_meta

    meta = read_meta(init_ckpt)
    tags = {"raypipe.init_checkpoint": init_ckpt}
    if meta.get("step") is not None:
        tags["raypipe.pretrain_step"] = meta["step"]
    if meta.get("mlflow_run_id"):
        tags["raypipe.pretrain_run_id"] = meta["mlflow_run_id"]
    return tags


def _run_finetune(
    cfg, inputs, parent, summary, need_ray, *, tokenizer_json, spec, init_ckpt, upstream,
    pipeline_fp,
):  # fmt: skip
    import ray

    from raypipe.stages.common import Tally
    from raypipe.stages.finetune import labeled_dataset, num_trials, run_arm

    f = cfg.finetune
    lab = cfg.data.labeled
    task_cls = inputs.plan.task
    # The task may require a form of the backbone (translation decodes causally).
    overrides = {k: v for k, v in task_cls.model_overrides.items() if k in spec["config"]}
    spec = {"type": spec["type"], "config": {**spec["config"], **overrides}}
    fp = _fingerprint(
        "finetune",
        f.model_dump(exclude={"sweep": {"max_failures"}}),
        lab.model_dump(),
        cfg.data.bad_images,
        cfg.seed,
        spec,
        upstream,
        datafiles.manifest_digest(inputs.train + inputs.validation),
        cfg.tracking.registered_model,
    )
    with _stage(cfg, inputs, parent, "finetune", fp, need_ray) as stage:
        out = stage.marker
        if out is None:
            logger = tracking.RunLogger(stage.run)
            logger.log_params(
                {
                    "fingerprint": fp,
                    **f.model_dump(exclude={"sweep"}),
                    "sweep": f.sweep.model_dump(),
                }
            )
            skip = cfg.data.bad_images == "skip" and inputs.plan.finetune_input == "image"
            tally = Tally.remote() if skip else None

            def encoded(files, src, max_rows=True):
                return labeled_dataset(
                    files,
                    source=src if max_rows else src.model_copy(update={"max_rows": None}),
                    kind=task_cls.data_kind,
                    input=inputs.plan.finetune_input,
                    label_dtype=task_cls.label_dtype,
                    tokenizer_json=tokenizer_json,
                    max_len=f.max_len,
                    model_config=spec["config"],
                    preprocess=cfg.data.preprocess,
                    bad_image_tally=tally,
                )

            full_train = encoded(inputs.train, lab.train)
            val_ds = encoded(inputs.validation, lab.validation)
            if tally is not None:  # materialized: the tally is final here
                skipped = ray.get(tally.get.remote())
                logger.log_metrics({"data/skipped_images": skipped}, 0)
                console.line(f"[finetune] skipped {skipped} undecodable image(s)")
            plan = ([("pretrained", init_ckpt)] if init_ckpt else []) + (
                [("scratch", None)] if f.compare_scratch or not init_ckpt else []
            )
            lineage = _lineage(init_ckpt)
            # Class labels are stratified; regression targets and translation pairs are not.
            stratify = (
                lab.train.label_column
                if task_cls.data_kind == "labeled" and task_cls.label_dtype == "int64"
                else None
            )
            arms = {}
            for fraction in sorted(f.label_fractions, reverse=True):
                where, train_ds = stage.dir, full_train
                if fraction < 1:
                    # The same seeded rows for every arm, kept with the stage.
                    where = storage.join(stage.dir, f"labels-{fraction:g}")
                    subset = datafiles.label_subset(
                        inputs.train,
                        fraction=fraction,
                        seed=cfg.seed,
                        stratify_by=stratify,
                        max_rows=lab.train.max_rows,
                        out=where,
                    )
                    train_ds = encoded(subset, lab.train, max_rows=False)
                num_train = train_ds.count()
                epoch_rows, repeat = num_train, 1
                if f.min_epoch_rows and 0 < num_train < f.min_epoch_rows:
                    repeat = math.ceil(f.min_epoch_rows / num_train)
                    epoch_rows = num_train * repeat
                    train_ds = train_ds.union(*[train_ds] * (repeat - 1)).materialize()
                for arm, ckpt in plan:
                    label = arm if fraction == 1 else f"{arm}_{fraction:g}"
                    console.line(
                        f"[finetune] sweeping the {label} arm: {num_trials(f.sweep)} trial(s) "
                        f"on {num_train} labeled rows ({fraction:.0%})"
                        + (f", repeated {repeat}x in each epoch" if repeat > 1 else "")
                    )
                    result = run_arm(
                        arm=label,
                        cfg=f,
                        init_checkpoint=ckpt,
                        model_spec=spec,
                        finetune_input=inputs.plan.finetune_input,
                        tokenizer_json=tokenizer_json,
                        train_ds=train_ds,
                        val_ds=val_ds,
                        num_train_rows=epoch_rows,
                        stage_dir=where,
                        parent=stage.run,
                        seed=cfg.seed,
                        fingerprint=fp,
                        lineage={**(lineage if ckpt else {}), "raypipe.label_fraction": fraction},
                    )
                    arms[label] = {
                        **asdict(result),
                        "base_arm": arm,
                        "label_fraction": fraction,
                        "num_train_rows": num_train,
                    }
            model = _register_best(
                cfg,
                stage.run,
                arms,
                tokenizer_json,
                tags={
                    "raypipe.pipeline_fingerprint": pipeline_fp,
                    "raypipe.pipeline_run_id": parent.run_id,
                    tracking.DATA_DIGEST_TAG: datafiles.manifest_digest(inputs.validation),
                },
                lineage=lineage,
            )
            out = {"arms": arms, "model": model}
            stage.complete(out)
        best = {
            f"best/{arm}/{f.sweep.metric}": a["best_metric"]
            for arm, a in out["arms"].items()
            if a["best_metric"] is not None
        }
        tracking.RunLogger(stage.run).log_metrics(best, 0)
        tracking.RunLogger(stage.run).set_tags(
            {"raypipe.best_checkpoint": out["model"]["checkpoint"]}
        )
        tracking.log_datasets(stage.run, _datasets(cfg, inputs, only=("train", "validation")))
        _plot_finetuning(cfg, stage, out["arms"])
    arms = out["arms"]
    summary.metric = f.sweep.metric
    summary.arms = arms
    summary.model = out["model"]
    _log_label_efficiency(cfg, parent, arms)
    stage.report(
        summary,
        {
            "trials": sum(a["num_trials"] for a in arms.values()),
            "stopped early": sum(a["num_stopped_early"] for a in arms.values()),
            "failed": sum(a["num_failed"] for a in arms.values()),
        },
    )


def _log_label_efficiency(cfg: PipelineConfig, parent: tracking.RunRef, arms: dict) -> None:
    """On the pipeline run: label_efficiency.json (the summary's table) and its plot, the best
    metric against the fraction of labeled rows, one curve per arm."""
    table = label_efficiency(arms)
    if not table:
        return
    tracking.log_text(parent, json.dumps(table, indent=2), "label_efficiency.json")
    metric = cfg.finetune.sweep.metric
    series = {
        arm: [(row["fraction"], row[arm]) for row in table if row.get(arm) is not None]
        for arm in ("pretrained", "scratch")
        if any(row.get(arm) is not None for row in table)
    }
    tracking.log_plot(
        parent,
        "label_efficiency.png",
        series,
        title=f"{cfg.name}: best {metric} against labeled rows used",
        xlabel="fraction of the labeled training rows (log scale)",
        ylabel=metric,
        log_x=True,
    )


def _plot_pretraining(cfg: PipelineConfig, stage: _Stage) -> None:
    """plots/pretrain_loss.png on the stage's run: the training loss at each logged step."""
    loss = tracking.metric_history(stage.computed_by, "train/loss")
    if loss:
        tracking.log_plot(
            stage.run,
            "pretrain_loss.png",
            {"train/loss": loss},
            title=f"{cfg.name}: pretraining loss ({cfg.pretrain.objective})",
            xlabel="step",
            ylabel="loss",
        )


def _plot_finetuning(cfg: PipelineConfig, stage: _Stage, arms: dict) -> None:
    """plots/finetune_curves.png on the stage's run: the sweep metric epoch by epoch for the
    best trial of each arm (pretrained against scratch)."""
    metric = cfg.finetune.sweep.metric
    trials = {r.info.run_name: r.info.run_id for r in tracking.child_runs(stage.computed_by)}
    series = {}
    for arm, result in arms.items():
        if result["best_trial"] in trials:
            ref = tracking.RunRef(
                stage.run.tracking_uri, stage.run.experiment_id, trials[result["best_trial"]]
            )
            series[f"{arm} ({result['best_trial']})"] = tracking.metric_history(ref, metric)
    if series:
        tracking.log_plot(
            stage.run,
            "finetune_curves.png",
            series,
            title=f"{cfg.name}: best trial per arm, {metric} on the validation split",
            xlabel="epoch",
            ylabel=metric,
        )


def _register_best(
    cfg, run: tracking.RunRef, arms: dict, tokenizer_json: str | None, *, tags: dict, lineage: dict
) -> dict:
    """Log the best trial's model (pt2, no pickled code) into the finetune run, register it with
    its lineage (`tags`; the pretraining it started from when it is the pretrained arm's), and
    move the champion alias to it if it beats the champion on the same validation data."""
    import torch

    from raypipe.engine.checkpoint import TOKENIZER_FILE, load_task, read_meta

    f = cfg.finetune
    sign = 1 if f.sweep.mode == "max" else -1
    candidates = [a for a in arms.values() if a["best_checkpoint"]]
    if not candidates:
        raise RuntimeError("no fine-tune trial produced a checkpoint; see the trial errors above")
    best = max(candidates, key=lambda a: sign * a["best_metric"])
    task = load_task(best["best_checkpoint"]).eval()
    meta = read_meta(best["best_checkpoint"])
    with tempfile.TemporaryDirectory(prefix="raypipe-") as tmp, torch.no_grad():
        extra_files = []
        if tokenizer_json is not None:
            tok_file = Path(tmp) / TOKENIZER_FILE
            tok_file.write_text(tokenizer_json)
            extra_files.append(str(tok_file))
        uri, version = tracking.log_registered_model(
            run,
            model=task.predictor(),
            input_example=task.example_input(),
            spec=task.serving_spec(),
            registered_name=cfg.tracking.registered_model,
            extra_files=extra_files,
            tags={
                "raypipe.arm": best["arm"],
                "raypipe.trial": best["best_trial"],
                f"raypipe.{f.sweep.metric}": best["best_metric"],
                "raypipe.checkpoint": best["best_checkpoint"],
                "raypipe.init_checkpoint": meta.get("init_checkpoint") or "none",
                "raypipe.label_fraction": best.get("label_fraction", 1.0),
                **tags,
                **(lineage if meta.get("init_checkpoint") else {}),
            },
        )
    champion, why = tracking.promote_champion(
        run.tracking_uri,
        cfg.tracking.registered_model,
        version,
        metric=f.sweep.metric,
        value=best["best_metric"],
        mode=f.sweep.mode,
        data_digest=tags[tracking.DATA_DIGEST_TAG],
    )
    console.line(f"[finetune] alias '{tracking.CHAMPION}' -> version {champion} ({why})")
    return {
        "name": cfg.tracking.registered_model,
        "version": version,
        "uri": uri,
        "arm": best["arm"],
        "trial": best["best_trial"],
        "checkpoint": best["best_checkpoint"],
        "champion": champion,
    }


def _pipeline_run(cfg: PipelineConfig, inputs: Inputs) -> tuple[tracking.RunRef, str]:
    """The pipeline's MLflow run: the interrupted run of this same pipeline (same config, same
    data) continues, so a rerun after a crash keeps one run tree; otherwise a new run."""
    fp = _fingerprint(
        "pipeline",
        cfg.model_dump(mode="json"),
        datafiles.manifest_digest(inputs.unlabeled + inputs.train + inputs.validation),
    )
    where = {"tracking_uri": inputs.tracking_uri, "experiment_id": inputs.experiment_id}
    found = tracking.find_run(**where, kind="pipeline", tags={"raypipe.fingerprint": fp})
    if found is not None and found[1] != "FINISHED":
        tracking.reopen_run(found[0])
        console.line(f"[pipeline] continuing the interrupted run {found[0].run_id}")
        return found[0], fp
    run = tracking.start_run(
        **where, name=cfg.name, kind="pipeline", tags={"raypipe.fingerprint": fp}
    )
    return run, fp


def run_pipeline(
    cfg: PipelineConfig, *, address: str | None = None, verbose: bool = False
) -> Summary:
    started = time.perf_counter()
    progress.in_driver()  # training run in this process prints straight to the console
    inputs = prepare(cfg, address=address)
    parent, pipeline_fp = _pipeline_run(cfg, inputs)
    summary = Summary(cfg.name, parent.run_id, inputs.tracking_uri, str(inputs.storage))
    started_ray = False
    timing.mark("checks")

    def need_ray() -> None:
        # Ray starts only when a stage has work to do: a fully reused pipeline never waits for it.
        nonlocal started_ray
        if _init_ray(address, verbose=verbose):
            timing.mark("ray")
            started_ray = True
            most = _cluster_resources() if address else None
            if most is not None:
                _check_resources(cfg, most, f"the Ray cluster at {address}")

    try:
        tracking.log_text(parent, to_yaml(cfg), "config/pipeline.yaml")
        tracking.RunLogger(parent).log_params(cfg.model_dump(mode="json"))
        tracking.log_datasets(parent, _datasets(cfg, inputs))
        ckpt, pre_fp = None, None
        if cfg.pretrain is not None:
            ckpt, tokenizer_json, spec, pre_fp = _run_pretrain(
                cfg, inputs, parent, summary, need_ray, local_ray=not address
            )
        else:
            tokenizer_json = _tokenizer_json(cfg, inputs)
            spec = _model_spec(cfg, inputs, tokenizer_json)
        if cfg.finetune is not None:
            init = cfg.finetune.init
            init_ckpt = ckpt if init == "pretrain" else (None if init == "scratch" else init)
            _run_finetune(
                cfg,
                inputs,
                parent,
                summary,
                need_ray,
                tokenizer_json=tokenizer_json,
                spec=spec,
                init_ckpt=init_ckpt,
                upstream=pre_fp or init,
                pipeline_fp=pipeline_fp,
            )
        summary.seconds = time.perf_counter() - started
        tracking.RunLogger(parent).log_metrics({"pipeline/seconds": summary.seconds}, 0)
        tracking.log_text(parent, summary_to_json(summary), SUMMARY_ARTIFACT)
        tracking.end_run(parent)
    except BaseException as e:
        tracking.end_run(parent, "FAILED")
        if isinstance(e, Exception):
            from raypipe.stages.common import find_user_error

            # A user's mistake found inside a Ray task or worker arrives wrapped by Ray.
            user = find_user_error(e)
            if user is not None and user is not e:
                raise user from None
        raise
    finally:
        progress.in_driver(False)
        timing.MARKS.clear()  # a later run in this process starts its own count
        if started_ray:
            import ray

            ray.shutdown()
    return summary
