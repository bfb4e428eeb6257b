"""Pretrain once, fine-tune many, for real: two named tasks (classification, and regression on
its own data) from one pretraining, with pretraining checkpoints as arms; a driver killed in
the second task; a third task added later. Real Ray, a real MLflow store, real processes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from raypipe.config import parse_config
from raypipe.config.schema import ConfigError
from raypipe.faults import ENV
from raypipe.summary import checkpoint_curve, from_json, scoreboard
from tests.test_faults import _Driver
from tests.test_pipeline_e2e import tiny_config


def _regression_copy(data: dict[str, str], root: Path) -> dict[str, str]:
    """The quickstart's labeled splits with a number for a label (2 * class + 0.5)."""
    out = {}
    for split in ("train", "validation"):
        table = pq.read_table(data[split])
        target = pa.array([2.0 * v + 0.5 for v in table["label"].to_pylist()])
        table = table.set_column(table.schema.get_field_index("label"), "label", target)
        (root / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / split / "part-00000.parquet")
        out[split] = str(root / split)
    return out


def _task(data: dict[str, str], **settings) -> dict:
    return {
        "data": {"train": {"path": data["train"]}, "validation": {"path": data["validation"]}},
        "epochs": 1,
        "batch_size": 16,
        "sweep": {"num_samples": 1, "scheduler": "fifo", "max_concurrent_trials": 1},
        **settings,
    }


def _config(quickstart_data, regression, storage: Path) -> dict:
    raw = tiny_config(quickstart_data, storage)
    raw["data"].pop("labeled")
    raw["pretrain"].update(max_steps=20, log_every=10, checkpoint_every=10)
    raw["finetune"] = {
        "sentiment": _task(quickstart_data, init_steps=[10, "last"]),
        # Half the labels: its arms' names (`pretrained_0.5`) are its own.
        "score": _task(regression, task="regression", label_fractions=[0.5], epochs=2),
    }
    return raw


def _runs(tmp_path: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "tiny"]
    return client.search_runs([experiment.experiment_id], max_results=1000)


def test_tasks_share_one_pretraining_resume_and_grow(quickstart_data, tmp_path):
    """Two tasks and two checkpoint arms end to end; the driver killed in the middle of the
    second task resumes it without redoing the first; a third task added later reuses the
    pretraining and both finished tasks."""
    regression = _regression_copy(quickstart_data, tmp_path / "regression")
    raw = _config(quickstart_data, regression, tmp_path / "runs")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    runs = tmp_path / "runs" / "tiny"

    # The second task's pretrained trial hangs as its epoch 2 begins (once): killed there.
    stall = f"stall:pretrained_0.5-00000:rank=0:at=2:once={tmp_path / 'stalled'}"
    first = _Driver(["run", "p.yaml"], tmp_path, **{ENV: stall})
    # Two 1-trial tasks may run side by side (pipeline.side_by_side): the first task has
    # finished by the time the second one's trial has hung, whichever way they were scheduled.
    first.wait_for(lambda: (tmp_path / "stalled").exists()
                   and list(runs.glob("finetune-sentiment-*/stage.json")), 600)  # fmt: skip
    first.kill()
    assert list(runs.glob("finetune-sentiment-*/stage.json"))  # the first task had finished
    assert not list(runs.glob("finetune-score-*/stage.json"))

    second = _Driver(["run", "p.yaml"], tmp_path)
    assert second.finish(timeout=600) == 0, "\n".join(second.lines[-40:])
    assert second.seen("[pretrain] reusing the completed stage")
    assert second.seen("[finetune-sentiment] reusing the completed stage")
    assert second.seen("[finetune-score] resuming the interrupted stage")
    assert second.seen("registered 'tiny-sentiment' version 1")
    assert second.seen("registered 'tiny-score' version 1")
    # Nothing of the first task ran twice: one run per trial, each epoch logged once.
    counts = Counter(
        (r.info.run_name, r.data.tags.get("mlflow.parentRunId")) for r in _runs(tmp_path)
    )
    assert all(n == 1 for n in counts.values()), counts
    by_name = {r.info.run_name: r for r in _runs(tmp_path)}
    assert {"finetune-sentiment", "finetune-score", "pretrained-step10-00000",
            "pretrained-00000", "scratch-00000", "pretrained_0.5-00000",
            "scratch_0.5-00000"} <= set(by_name)  # fmt: skip
    assert by_name["finetune-score"].data.tags["mlflow.parentRunId"] == by_name["tiny"].info.run_id

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    summary = from_json(
        Path(
            client.download_artifacts(by_name["tiny"].info.run_id, "summary/summary.json")
        ).read_text()
    )
    _check_checkpoint_arms(summary, client, runs, parse_config(raw).pretrain)
    _check_scoreboard(summary, client, by_name["tiny"].info.run_id, tmp_path)

    # A third task, added later: the pretraining and both finished tasks are reused.
    before = {r.info.run_id for r in _runs(tmp_path) if r.data.tags.get("raypipe.kind") == "trial"}
    raw["finetune"]["again"] = _task(quickstart_data, compare_scratch=False, baseline="none")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    third = _Driver(["run", "p.yaml"], tmp_path)
    assert third.finish(timeout=600) == 0, "\n".join(third.lines[-40:])
    for stage in ("pretrain", "finetune-sentiment", "finetune-score"):
        assert third.seen(f"[{stage}] reusing the completed stage"), stage
    trials = [r for r in _runs(tmp_path) if r.data.tags.get("raypipe.kind") == "trial"]
    added = [r for r in trials if r.info.run_id not in before]
    assert [r.info.run_name for r in added] == ["pretrained-00000"]  # the new task's one trial
    assert len(list(runs.glob("pretrain-*/stage.json"))) == 1
    assert third.seen("registered 'tiny-again' version 1")


def _check_checkpoint_arms(summary, client, runs: Path, pre) -> None:
    """Each pretrained arm started from the checkpoint of its step, and the registered model
    names the checkpoint it came from."""
    arms = summary.tasks["sentiment"].arms
    assert {a: arms[a]["pretrain_step"] for a in ("pretrained-step10", "pretrained")} == {
        "pretrained-step10": 10, "pretrained": 20
    }  # fmt: skip
    (milestone,) = runs.glob("pretrain-*/milestones/step-00000010")
    assert json.loads((milestone / "meta.json").read_text())["step"] == 10
    trial = json.loads(
        (Path(arms["pretrained-step10"]["best_checkpoint"]) / "meta.json").read_text()
    )
    assert trial["init_checkpoint"] == str(milestone)
    curve = checkpoint_curve(arms, "val/accuracy")
    assert [(p["arm"], p["step"]) for p in curve] == [
        ("scratch", 0), ("pretrained-step10", 10), ("pretrained", 20)
    ]  # fmt: skip
    # Pretraining's compute at each point: blocks of seq_len tokens, batch_size per step;
    # a transformer's FLOPs per token do not change between checkpoints.
    for p in curve[1:]:
        assert p["samples_seen"] == p["step"] * pre.batch_size
        assert p["tokens_seen"] == p["samples_seen"] * pre.seq_len
    assert curve[1]["flops"] / curve[1]["tokens_seen"] == pytest.approx(
        curve[2]["flops"] / curve[2]["tokens_seen"]
    )
    model = summary.tasks["sentiment"].model
    version = client.get_model_version(model["name"], model["version"])
    chosen = arms[model["arm"]]
    assert version.tags["raypipe.arm"] == model["arm"]
    if chosen.get("pretrain_step") is not None:
        assert version.tags["raypipe.pretrain_step"] == str(chosen["pretrain_step"])
    assert "pretrained" not in summary.tasks["score"].arms  # only its 0.5 fraction ran


def _check_scoreboard(summary, client, run_id: str, tmp_path: Path) -> None:
    """The scoreboard artifact: a row per task and fraction, the mean gain recomputed."""
    board = json.loads(Path(client.download_artifacts(run_id, "scoreboard.json")).read_text())
    assert board == json.loads(json.dumps(scoreboard(summary)))
    rows = {(r["task"], r["fraction"]): r for r in board["rows"]}
    assert set(rows) == {("sentiment", 1.0), ("score", 0.5)}
    sentiment, score = summary.tasks["sentiment"].arms, summary.tasks["score"].arms
    gain = sentiment["pretrained"]["best_metric"] - sentiment["scratch"]["best_metric"]
    assert rows[("sentiment", 1.0)]["gain"] == pytest.approx(gain)
    # Lower mse is better: the gain is scratch's mse less pretrained's.
    gain = score["scratch_0.5"]["best_metric"] - score["pretrained_0.5"]["best_metric"]
    assert rows[("score", 0.5)]["gain"] == pytest.approx(gain)
    assert rows[("sentiment", 1.0)]["baseline"] == sentiment["baseline"]["best_metric"]
    assert [(m["metric"], m["fraction"], m["tasks"]) for m in board["mean_gain"]] == [
        ("val/accuracy", 1.0, 1), ("val/mse", 0.5, 1)
    ]  # fmt: skip
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/scoreboard.png", "plots/checkpoint_curve-sentiment.png"} <= plots


def test_bad_task_settings_are_one_line_each(quickstart_data, tmp_path):
    """Before Ray starts: a checkpoint step that will not exist, shared registered names, and
    labeled data left at the top level, each named by the task's own key."""
    raw = _config(quickstart_data, quickstart_data, tmp_path / "runs")
    raw["finetune"]["sentiment"]["init_steps"] = [15, 40, "last"]
    raw["finetune"]["score"]["registered_model"] = "tiny-sentiment"
    raw["data"]["labeled"] = {"train": {"path": "x"}, "validation": {"path": "y"}}
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert e.value.problems == [
        "data.labeled: with several finetune tasks, each task has its own labeled data; move "
        "it to finetune.<task>.data (tasks: ['sentiment', 'score'])",
        "finetune.sentiment.init_steps: no checkpoint is written at step 15 (checkpoints come "
        "every pretrain.checkpoint_every = 10 steps); use 10 or 20",
        "finetune.sentiment.init_steps: step 40 is beyond pretrain.max_steps (20); no "
        "checkpoint will exist there",
        "finetune.score.registered_model: 'tiny-sentiment' is also task 'sentiment's; give "
        "each task its own registered model",
    ]


def test_init_steps_every_n_checkpoints(quickstart_data, tmp_path):
    """{every: N}: every N-th checkpoint before the last, then the last; one that gives no
    checkpoint before the last is one line."""
    raw = _config(quickstart_data, quickstart_data, tmp_path / "runs")
    raw["pretrain"].update(max_steps=50, checkpoint_every=10)
    raw["finetune"]["sentiment"]["init_steps"] = {"every": 2}
    cfg = parse_config(raw)
    assert cfg.finetune["sentiment"].init_steps == [20, 40, "last"]
    assert cfg.finetune["sentiment"].pretrain_steps == [20, 40, None]
    raw["finetune"]["sentiment"]["init_steps"] = {"every": 5}
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert e.value.problems == [
        "finetune.sentiment.init_steps: every 50 steps gives no checkpoint before the last "
        "(pretrain.max_steps = 50); lower every, or list the steps"
    ]


def _duplicate_task(raw: dict, path: Path) -> None:
    text = yaml.safe_dump(raw, sort_keys=False)
    sentiment = yaml.safe_dump({"sentiment": raw["finetune"]["sentiment"]})
    path.write_text(text.replace("finetune:\n", "finetune:\n" + _indent(sentiment), 1))


def _indent(text: str) -> str:
    return "".join(f"  {line}\n" for line in text.splitlines())


def _image_task(raw: dict, path: Path) -> None:
    raw["finetune"]["score"]["input"] = "image"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _missing_column(raw: dict, path: Path) -> None:
    raw["finetune"]["score"]["data"]["validation"]["text_column"] = "review"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.parametrize(
    ("breaker", "expected"),
    [
        (_duplicate_task, ["key 'sentiment' is given twice"]),
        (_image_task, ["finetune.score.input:", "reads ['text'], not 'image'"]),
        (_missing_column, ["finetune.score.data.validation", "review"]),
    ],
)
def test_bad_tasks_fail_in_one_line_before_ray(breaker, expected, quickstart_data, tmp_path,
                                               monkeypatch, capsys):  # fmt: skip
    from raypipe import cli, localray
    from raypipe.stages import connect

    raw = _config(quickstart_data, quickstart_data, tmp_path / "runs")
    path = tmp_path / "p.yaml"
    breaker(raw, path)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a problem visible up front")

    monkeypatch.setattr(connect, "_init_ray", no_ray)
    monkeypatch.setattr(localray, "start_in_background", lambda **kwargs: None)
    code = cli.main(["run", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_USER_ERROR, err
    assert len(err.splitlines()) == 1 and err.startswith("raypipe: error: "), err
    for fragment in expected:
        assert fragment in err, (fragment, err)


def test_the_probe_equals_an_independent_probe_of_the_same_checkpoint(
    ray_session, quickstart_data, tmp_path
):
    """pretrain.probe during a real pretraining: at each probed step, logged on the pretrain
    run; at the last step, the same accuracy as features computed here by hand (the mean of
    the checkpoint's token vectors over the rows Ray Data encodes for fine-tuning) with the
    same seeded logistic regression. With probe.patience: once the probe stops improving (at
    its second probe here, step 500: no accuracy rises by more than min_delta 0.99), pretraining stops
    at a later checkpoint, well before max_steps; fine-tuning starts from where it stopped,
    and an init_steps step it never reached has no arm."""
    import numpy as np
    from safetensors.numpy import load_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from raypipe.config import LabeledSource
    from raypipe.data.pipelines import labeled_dataset
    from raypipe.engine.checkpoint import read_spec, read_tokenizer
    from raypipe.pipeline import run_pipeline

    raw = tiny_config(quickstart_data, tmp_path / "runs")
    raw["model"] = {"type": "bag", "dim": 32, "max_len": 32}
    raw["pretrain"].update(objective="skipgram", max_steps=20000, checkpoint_every=50,
                           log_every=50, options={"window": 2, "negatives": 3, "subsample": 0.0},
                           probe={"every": 250, "train_rows": 64, "eval_rows": 48,
                                  "patience": 1, "min_delta": 0.99})  # fmt: skip
    raw["finetune"] = {"epochs": 1, "compare_scratch": False, "baseline": "none",
                       "init_steps": [50, 19950, "last"],
                       "sweep": {"num_samples": 1, "scheduler": "fifo"}}  # fmt: skip
    summary = run_pipeline(parse_config(raw))
    steps = summary.stages[0].metrics["steps"]
    assert 500 < steps < 20000 and steps % 50 == 0
    assert summary.stages[0].metrics["stopped"] == "by the probe, of 20000"
    runs = tmp_path / "runs" / "tiny"
    (stage,) = runs.glob("pretrain-*")
    assert json.loads((stage / "probe" / "STOP.json").read_text()) == {"probe_step": 500}
    assert {a: r["pretrain_step"] for a, r in summary.arms.items()} == {
        "pretrained-step50": 50, "pretrained": steps
    }  # fmt: skip
    client = MlflowClient(summary.tracking_uri)
    exp = client.get_run(summary.run_id).info.experiment_id
    (run,) = [r for r in client.search_runs([exp]) if r.info.run_name == "pretrain"]
    history = client.get_metric_history(run.info.run_id, "probe/tiny/accuracy")
    # Every probe.every steps (one at a time, in order), and the step it stopped at.
    assert sorted(m.step for m in history) == sorted({*range(250, steps + 1, 250), steps})
    assert summary.stages[0].metrics["probe"].startswith("tiny/accuracy ")
    (last,) = runs.glob(f"pretrain-*/train/step-{steps:08d}")
    assert not list(runs.glob("pretrain-*/probe/step-*"))  # cleared

    vectors = load_file(str(last / "model.safetensors"))["tok_emb.weight"].astype(np.float64)
    tokenizer, config = read_tokenizer(str(last)), read_spec(str(last))["config"]

    def rows(split: str, n: int):
        ds = labeled_dataset(
            [str(p) for p in sorted(Path(quickstart_data[split]).glob("*.parquet"))],
            source=LabeledSource(path=quickstart_data[split], max_rows=n), kind="labeled",
            input="text", label_dtype="int64", tokenizer_json=tokenizer, max_len=32,
            model_config=config,
        )  # fmt: skip
        batch = ds.take_batch(n, batch_format="numpy")
        ids = batch["input_ids"]
        real = (ids != config["pad_id"])[..., None]
        features = (vectors[ids] * real).sum(1) / np.maximum(real.sum(1), 1)
        return features, batch["label"]

    (train_x, train_y), (eval_x, eval_y) = rows("train", 64), rows("validation", 48)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=0))
    expected = float(np.mean(probe.fit(train_x, train_y).predict(eval_x) == eval_y))
    assert {m.step: m.value for m in history}[steps] == pytest.approx(expected, abs=1e-12)
