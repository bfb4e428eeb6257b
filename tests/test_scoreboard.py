"""The scoreboard, the checkpoint curve and the probe's arithmetic, against hand figures (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from raypipe.config import parse_config
from raypipe.config.schema import ConfigError
from raypipe.engine.feature_probe import ProbeSample, fit_and_score
from raypipe.stages.arms import Arm, ArmResult, Repeat
from raypipe.summary import Summary, TaskResult, checkpoint_curve, format_summary, scoreboard


def _arm(base: str, fraction: float, seeds: dict[int, float], step=None, pretrain_step=None,
         key="test/accuracy", seen=None):  # fmt: skip
    repeats = tuple(Repeat(s, f"t{s}", v, 1, "ckpt", {key: v}) for s, v in seeds.items())
    mean = sum(seeds.values()) / len(seeds)
    result = ArmResult(Arm(base, fraction, step), mean, "ckpt", "t", repeats=repeats,
                       test_metrics={key: mean}, pretrain_step=pretrain_step,
                       pretrain_seen=seen)  # fmt: skip
    return result.arm.label, result.to_dict()


MSE = "test/mse"


def _arms(*made):
    return dict(made)


def test_scoreboard_signs_gains_by_each_tasks_direction_and_averages_them():
    up = _arms(_arm("pretrained", 0.01, {0: 0.70, 1: 0.72, 2: 0.74}, pretrain_step=20),
               _arm("pretrained", 0.01, {0: 0.60, 1: 0.60, 2: 0.60}, step=10, pretrain_step=10),
               _arm("scratch", 0.01, {0: 0.60, 1: 0.64, 2: 0.62}))  # fmt: skip
    down = _arms(_arm("pretrained", 0.01, {0: 1.0, 1: 1.2, 2: 1.1}, pretrain_step=20, key=MSE),
                 _arm("scratch", 0.01, {0: 1.5, 1: 1.5, 2: 1.8}, key=MSE))  # fmt: skip
    s = Summary("p", "r", "u", "s")
    s.tasks = {"a": TaskResult("val/accuracy", "max", up, {}),
               "b": TaskResult("val/mse", "min", down, {})}  # fmt: skip
    board = scoreboard(s)
    rows = {r["task"]: r for r in board["rows"]}
    # a: the `last` arm (no init_step) stands for pretrained: (0.72 - 0.62) = +0.10.
    assert rows["a"]["pretrained"] == pytest.approx(0.72)
    assert rows["a"]["gain"] == pytest.approx(0.10)
    # b: lower mse wins: 1.6 - 1.1 = +0.5 (the metric itself goes down by 0.5).
    assert rows["b"]["gain"] == pytest.approx(0.5)
    assert rows["b"]["gain_low"] < rows["b"]["gain_high"]
    assert rows["b"]["gain_low"] == pytest.approx(-rows["b"]["gap_high"])
    # Accuracy and mse are never averaged together: a mean per metric.
    assert board["mean_gain"] == [
        {"metric": "test/accuracy", "fraction": 0.01, "gain": pytest.approx(0.10), "tasks": 1},
        {"metric": "test/mse", "fraction": 0.01, "gain": pytest.approx(0.5), "tasks": 1},
    ]
    assert rows["a"]["metric"] == "test/accuracy"
    text = format_summary(s)
    assert "mean gain in test/mse over 1 task(s) at fraction 0.01: +0.5000" in text
    assert "task 'a'" in text and "checkpoint curve" in text


def test_checkpoint_curve_puts_scratch_at_step_zero_and_gaps_against_it():
    arms = _arms(_arm("pretrained", 0.1, {0: 0.80, 1: 0.82}, pretrain_step=30),
                 _arm("pretrained", 0.1, {0: 0.70, 1: 0.74}, step=10, pretrain_step=10,
                      seen={"samples": 640, "tokens": 20480, "flops": 3.0e12}),
                 _arm("scratch", 0.1, {0: 0.60, 1: 0.62}))  # fmt: skip
    curve = checkpoint_curve(arms, "val/accuracy")
    assert [(p["step"], round(p["value"], 4)) for p in curve] == [(0, 0.61), (10, 0.72),
                                                                  (30, 0.81)]  # fmt: skip
    assert curve[1]["gap"] == pytest.approx(0.11) and curve[2]["gap"] == pytest.approx(0.20)
    assert "gap" not in curve[0]
    # Pretraining's compute, where the checkpoint said it: scratch saw none.
    assert curve[1]["tokens_seen"] == 20480 and curve[1]["flops"] == 3.0e12
    assert "tokens_seen" not in curve[0] and "flops" not in curve[2]
    s = Summary("p", "r", "u", "s")
    s.tasks = {"a": TaskResult("val/accuracy", "max", arms, {})}
    assert "20.5k tokens, 3e+12 FLOPs" in format_summary(s)
    # Without checkpoint arms there is no curve.
    plain = _arms(_arm("pretrained", 0.1, {0: 0.8}), _arm("scratch", 0.1, {0: 0.6}))
    assert checkpoint_curve(plain, "val/accuracy") == []


def test_knn_and_linear_probe_figures_by_hand():
    # Two tight clusters; the validation points sit next to their own class.
    train_x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    train_y = np.array([0, 0, 1, 1])
    eval_x, eval_y = np.array([[1.0, 0.05], [0.05, 1.0], [0.8, 0.3]]), np.array([0, 1, 1])
    sample = ProbeSample("t", "input_ids", "mean", train_x, train_y, eval_x, eval_y)
    # k=1 by cosine: the third point is nearest class 0, so 2 of 3 are right.
    assert fit_and_score(sample, train_x, eval_x, method="knn", k=1, seed=0) == pytest.approx(2 / 3)
    assert fit_and_score(sample, train_x, eval_x, method="linear", k=1, seed=0) == pytest.approx(
        2 / 3
    )
    # Regression: ridge on standardized features; an exact linear target is fitted closely.
    y = train_x @ np.array([2.0, -1.0])
    reg = ProbeSample("r", "input_ids", "mean", train_x, y, train_x, y, regression=True)
    assert fit_and_score(reg, train_x, train_x, method="linear", k=1, seed=0) < 0.1


def test_probe_settings_are_checked_before_anything_starts():
    raw = {"name": "t", "model": {"type": "bag", "dim": 16, "max_len": 16},
           "data": {"unlabeled": {"path": "u"}},
           "pretrain": {"objective": "skipgram", "max_steps": 20, "checkpoint_every": 10,
                        "probe": {"every": 15, "min_delta": 0.01}}}  # fmt: skip
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert e.value.problems == [
        "pretrain.probe.every: 15 is not a multiple of pretrain.checkpoint_every (10); each "
        "probe reads that step's checkpoint",
        "pretrain.probe: estimates the fine-tuning tasks; add a finetune section",
        "pretrain.probe.min_delta: has no effect without probe.patience; remove it",
    ]


def test_the_regression_baseline_is_ridge_on_tfidf_scored_by_hand():
    """baselines.fit_and_score for a regression task: TF-IDF + ridge, its mse and mae equal
    to numpy's on that model's own predictions, and better than predicting the mean."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline

    from raypipe.baselines import Rows, fit_and_score

    rng = np.random.default_rng(0)
    words = ["good", "bad", "fine", "awful", "great", "dull"]
    value = {"good": 1.0, "great": 2.0, "fine": 0.5, "bad": -1.0, "awful": -2.0, "dull": -0.5}
    texts = [" ".join(rng.choice(words, 3)) for _ in range(120)]
    y = np.array([sum(value[w] for w in t.split()) for t in texts])
    train, held = Rows(texts[:80], y[:80]), Rows(texts[80:], y[80:])
    found = fit_and_score(train, {"val": held}, kind="text", num_classes=2, seed=0,
                          regression=True)  # fmt: skip
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), Ridge(alpha=1.0))
    err = model.fit(train.inputs, train.labels).predict(held.inputs) - held.labels
    assert found["val/mse"] == pytest.approx(float(np.mean(err**2)))
    assert found["val/mae"] == pytest.approx(float(np.mean(np.abs(err))))
    mean = float(np.mean((held.labels - train.labels.mean()) ** 2))  # chance: the mean
    assert found["val/mean_mse"] == pytest.approx(mean)
    assert found["val/mse"] < mean
    assert "val/majority_accuracy" not in found


def test_probe_plateau_counts_probes_without_improvement():
    from raypipe.stages.probing import plateau

    up = {10: {"probe/a/accuracy": 0.5}, 20: {"probe/a/accuracy": 0.6},
          30: {"probe/a/accuracy": 0.6}, 40: {"probe/a/accuracy": 0.55}}  # fmt: skip
    assert plateau(up, patience=2, min_delta=0.0) == 40
    assert plateau(up, patience=3, min_delta=0.0) is None
    # A rise no larger than min_delta is no improvement: 20 already counts.
    assert plateau(up, patience=2, min_delta=0.1) == 30
    # One task improving is enough; mse improves downwards; a failed probe does not count.
    two = {10: {"probe/a/accuracy": 0.5, "probe/b/mse": 2.0},
           20: {"probe/a/accuracy": 0.4, "probe/b/mse": 1.5}, 30: {},
           40: {"probe/a/accuracy": 0.5, "probe/b/mse": 1.6}}  # fmt: skip
    assert plateau(two, patience=1, min_delta=0.0) == 40
    assert plateau(two, patience=2, min_delta=0.0) is None
