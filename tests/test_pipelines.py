"""Every shipped pipeline: it validates, and runs end to end at smoke size on generated data.

Each run is real: Ray Data decodes/augments/tokenizes, Ray Train pretrains, Ray Tune sweeps
fine-tuning, MLflow records it all. Sizes are overridden with the same `--set` paths a user has.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from raypipe.config import load_config
from raypipe.config.tasks import has_tasks, task_views
from raypipe.plan import make_plan
from raypipe.summary import headline

ROOT = Path(__file__).parent.parent
PIPELINES = sorted(p.name for p in (ROOT / "pipelines").glob("*.yaml"))

SMALL_TEXT = [
    "model.dim=32", "model.layers=2", "model.heads=2", "model.max_len=32", "tokenizer.vocab_size=300",
]  # fmt: skip
SMALL_CNN = ["model.dim=32", "model.layers=2", "model.image_size=16"]
SMALL_IMAGE = [*SMALL_CNN, "model.heads=2", "model.patch_size=4"]
PRETRAIN = ["pretrain.max_steps=4", "pretrain.batch_size=8", "pretrain.log_every=2",
            "pretrain.checkpoint_every=4"]  # fmt: skip
FINETUNE = ["finetune.epochs=1", "finetune.batch_size=16", "finetune.sweep.num_samples=1",
            "finetune.compare_scratch=false", "finetune.sweep.grace_period=1"]  # fmt: skip


# Label-efficiency studies: two fractions, the small one repeated, one trial per arm.
FRACTIONS = ["finetune.label_fractions=[0.5, 1.0]", "finetune.min_epoch_rows=64",
             "finetune.sweep.space={lr: {grid: [1.0e-3]}}"]  # fmt: skip


def _paths(d: dict[str, str], *, unlabeled: str, train: str, val: str) -> list[str]:
    return [
        f"data.unlabeled.path={d[unlabeled]}",
        f"data.labeled.train.path={d[train]}",
        f"data.labeled.validation.path={d[val]}",
    ]


def _held_out(d: dict[str, str], split: str) -> list[str]:
    """The label-efficiency studies' test split and pretraining validation, and 2 repeats."""
    return [f"data.labeled.test.path={d[split]}", f"data.unlabeled_validation.path={d[split]}",
            "finetune.repeats=2"]  # fmt: skip


def _task(name: str, d: dict[str, str], train: str, val: str, *, first: bool,
          narrow: bool = False) -> list[str]:  # fmt: skip
    """One named task of a several-task pipeline at smoke size: its data, one trial per arm
    on half its labels; the first task from the checkpoint of step 2 and the last one, with
    scratch and the baseline, the others from the last only (tests/test_tasks_e2e.py runs
    every form at length). `narrow`: one 1-CPU trial at a time, so that two tasks' sweeps fit
    on two CPUs side by side."""
    arms = ["init_steps=[2, last]"] if first else ["init_steps=null", "compare_scratch=false",
                                                   "baseline=none"]  # fmt: skip
    if narrow:
        arms += ["scaling.cpus_per_worker=1", "sweep.max_concurrent_trials=1"]
    return [f"finetune.{name}.{k}" for k in (
        f"data.train.path={d[train]}", f"data.validation.path={d[val]}",
        f"data.test.path={d[val]}", "epochs=1", "batch_size=16", "repeats=1",
        "label_fractions=[0.5]", "min_epoch_rows=32", "sweep.space={lr: {grid: [1.0e-3]}}",
        *arms,
    )]  # fmt: skip


def overrides(name: str, q: dict[str, str], m: dict[str, str]) -> list[str]:
    """Point a shipped pipeline at generated data and shrink it to smoke size."""
    d = {**q, **m}
    text = _paths(d, unlabeled="unlabeled", train="train", val="validation")
    images = _paths(d, unlabeled="shapes_train", train="shapes_train", val="shapes_val")
    return {
        "quickstart.yaml": ["data.generate=null", *text, *SMALL_TEXT, *PRETRAIN, *FINETUNE,
                            "finetune.max_len=24"],
        # Two text sources in one list, mixed half and half: the unlabeled text and the
        # labeled set's text.
        "masked_lm.yaml": [*text, f"data.unlabeled.path=[{d['unlabeled']}, {d['train']}]",
                           "data.unlabeled.weights=[1, 1]",
                           *SMALL_TEXT, *PRETRAIN, *FINETUNE],
        "masked_image.yaml": [*images, *SMALL_IMAGE, *PRETRAIN, *FINETUNE, "finetune.epochs=2",
                              "finetune.sweep.perturbation_interval=1",
                              "finetune.num_classes=4", "pretrain.options.decoder_dim=32"],
        "simclr.yaml": [*images, *SMALL_CNN, *PRETRAIN, *FINETUNE, "finetune.num_classes=4",
                        "finetune.sweep.num_samples=2"],
        "gan.yaml": [*images, *SMALL_CNN, *PRETRAIN, *FINETUNE, "finetune.num_classes=4",
                     "pretrain.options.generator_width=16"],
        "clip.yaml": [*images, *SMALL_IMAGE, *SMALL_TEXT, *PRETRAIN, *FINETUNE,
                      "finetune.num_classes=4", "model.max_len=16"],
        "captioning.yaml": [f"data.unlabeled.path={d['shapes_train']}", *SMALL_IMAGE, *SMALL_TEXT,
                            *PRETRAIN, "model.max_len=16"],
        "translation.yaml": [*_paths(d, unlabeled="unlabeled", train="pairs_train", val="pairs_val"),
                             *SMALL_TEXT, *PRETRAIN, *FINETUNE, "finetune.options.max_new_tokens=12"],
        "sst2_transformer_label_efficiency.yaml": [*text, *SMALL_TEXT, *PRETRAIN, *FINETUNE,
                                                   *FRACTIONS, *_held_out(d, "validation")],
        "sst2_label_efficiency.yaml": [*text, "model.dim=32", "model.max_len=32",
                                       "tokenizer.vocab_size=300", *PRETRAIN, *FINETUNE,
                                       *FRACTIONS, f"data.labeled.test.path={d['validation']}",
                                       "finetune.repeats=2"],
        "text_tasks.yaml": [f"data.unlabeled.path=[{d['unlabeled']}, {d['train']}]",
                            "model.dim=32", "model.max_len=32", "tokenizer.vocab_size=300",
                            *PRETRAIN, "pretrain.checkpoint_every=2",
                            *_task("sst2", d, "train", "validation", first=True, narrow=True),
                            *[o for t in ("mr", "subj")
                              for o in _task(t, d, "train", "validation", first=False,
                                             narrow=True)],
                            *_task("sst5", d, "reg_train", "reg_val", first=False, narrow=True)],
        "image_tasks.yaml": [f"data.unlabeled.path={d['shapes_train']}",
                             f"data.unlabeled_validation.path={d['shapes_val']}", *SMALL_CNN,
                             *PRETRAIN, "pretrain.checkpoint_every=2",
                             "finetune.cifar10.num_classes=4", "finetune.vehicles.num_classes=4",
                             *_task("cifar10", d, "shapes_train", "shapes_val", first=True),
                             *_task("vehicles", d, "shapes_train", "shapes_val", first=False)],
        "cifar10_label_efficiency.yaml": [*images, *SMALL_CNN, *PRETRAIN, *FINETUNE, *FRACTIONS,
                                          "finetune.num_classes=4", *_held_out(d, "shapes_val")],
    }[name]  # fmt: skip


def test_every_pipeline_has_a_smoke_run():
    assert len(PIPELINES) >= 8
    fake = {k: k for k in ("unlabeled", "train", "validation", "shapes_train", "shapes_val",
                           "pairs_train", "pairs_val", "reg_train", "reg_val")}  # fmt: skip
    for name in PIPELINES:
        assert overrides(name, fake, {})  # a KeyError names a pipeline without one


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_validates(name):
    cfg = load_config(ROOT / "pipelines" / name)
    assert cfg.pretrain is not None or cfg.finetune is not None
    for one in [v.cfg for v in task_views(cfg)] or [cfg]:  # each named task's pipeline
        plan = make_plan(one)
        assert plan.objective is not None or plan.task is not None


@pytest.mark.slow
# The quickstart runs end to end through the real CLI in test_pipeline_e2e.py.
@pytest.mark.parametrize("name", [p for p in PIPELINES if p != "quickstart.yaml"])
def test_pipeline_runs_at_smoke_size(name, ray_session, quickstart_data, media_data, tmp_path):
    from raypipe.pipeline import run_pipeline

    cfg = load_config(
        ROOT / "pipelines" / name,
        [f"storage={tmp_path}", *overrides(name, quickstart_data, media_data)],
    )
    summary = run_pipeline(cfg)
    stages = {s.name: s for s in summary.stages}
    assert all(s.status == "done" for s in summary.stages)
    if cfg.pretrain is not None:
        assert stages["pretrain"].metrics["steps"] == 4
        loss = stages["pretrain"].metrics["final loss"]
        assert loss == loss and loss < 1e6  # finite
    for task in (summary.tasks.values() or [summary]) if cfg.finetune is not None else []:
        best = headline(
            task.arms, "pretrained", min(a["label_fraction"] for a in task.arms.values())
        )
        assert best["best_metric"] is not None and best["best_metric"] == best["best_metric"]
        assert task.model["version"]
    if cfg.pretrain is not None and cfg.pretrain.probe is not None:  # probed at the last step
        assert stages["pretrain"].metrics["probe"]
    if has_tasks(cfg):  # every task from the checkpoint of step 2 and the last
        assert {s.name for s in summary.stages} == {"pretrain"} | {
            f"finetune-{t}" for t in cfg.finetune
        }
        steps = {name: {a["pretrain_step"] for a in t.arms.values() if a["base_arm"] == "pretrained"}
                 for name, t in summary.tasks.items()}  # fmt: skip
        first, *others = cfg.finetune
        assert steps == {first: {2, 4}, **{name: {4} for name in others}}
        _check_side_by_side(cfg, summary)
    if isinstance(cfg.data.unlabeled.path, list):  # each source is an input of its own
        from mlflow.tracking import MlflowClient

        from raypipe.data import files as datafiles

        client = MlflowClient(summary.tracking_uri)
        exp = client.get_run(summary.run_id).info.experiment_id
        (run,) = [r for r in client.search_runs([exp]) if r.info.run_name == "pretrain"]
        got = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
        expected = {
            f"{cfg.name}-pretrain-{i + 1}": datafiles.manifest_digest(
                datafiles.resolve_parquet_files(path, key="k")
            )[:36]
            for i, path in enumerate(cfg.data.unlabeled.path)
        }
        assert len(expected) == 2 and got == expected
    if not has_tasks(cfg) and cfg.finetune is not None and cfg.finetune.sweep.scheduler == "pbt":
        # PBT trains in segments of perturbation_interval epochs, each continuing the last.
        runs = sorted(p.name for p in tmp_path.glob(f"{cfg.name}/finetune-*/trials/*"))
        assert runs == [
            "pretrained-00000",
            "pretrained-00000-000-001-1",
            "pretrained-00000-001-002-2",
        ]
        # The trial's own folder holds only the driver's record of it (what a resume replays).
        (record,) = tmp_path.glob(f"{cfg.name}/finetune-*/trials/pretrained-00000/*")
        assert record.name == "done.json"


def _check_side_by_side(cfg, summary) -> None:
    """Tasks whose sweeps fit on the cluster together ran together (text_tasks at smoke size:
    one 1-CPU trial per task, 2 CPUs): some two tasks' trials overlapped in time; those that
    do not fit (image_tasks) ran one after another."""
    from mlflow.tracking import MlflowClient

    from raypipe.pipeline import side_by_side

    client = MlflowClient(summary.tracking_uri)
    exp = client.get_run(summary.run_id).info.experiment_id
    spans: dict[str, list] = {}
    for r in client.search_runs([exp], max_results=1000):
        if r.data.tags.get("raypipe.kind") in ("trial", "repeat"):
            stage = client.get_run(r.data.tags["mlflow.parentRunId"]).info.run_name
            spans.setdefault(stage, []).append((r.info.start_time, r.info.end_time))
    windows = sorted((min(s for s, _ in v), max(e for _, e in v)) for v in spans.values())
    overlap = any(
        a_end > b_start for (_, a_end), (b_start, _) in zip(windows, windows[1:], strict=False)
    )
    width = side_by_side(task_views(cfg), {"CPU": 2.0})
    assert len(windows) == len(cfg.finetune)
    assert overlap == (width > 1), (width, windows)
