"""`raypipe validate --plan`: what a run will do, counted from the config and the data's
footers (checked here by hand), and a training-time estimate from a measured warm-up."""

from __future__ import annotations

import pyarrow.parquet as pq
import yaml
from test_pipeline_e2e import tiny_config

from raypipe import cli


def rows(path: str) -> int:
    return pq.read_table(path).num_rows


def test_plan_counts_tokens_trials_epochs_and_rows(tmp_path, quickstart_data, capsys):
    raw = tiny_config(quickstart_data, tmp_path / "runs")
    raw["finetune"].update(label_fractions=[0.5, 1.0], repeats=3,
                           sweep={"num_samples": 1})  # fmt: skip
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["validate", "--plan", str(tmp_path / "p.yaml")]) == 0
    out = capsys.readouterr().out
    # 30 steps of 16 rows x 32 tokens (seq_len = the model's max_len).
    assert "pretrain   30 steps x 512 tokens a step = 15,360 tokens" in out, out
    train, val = rows(quickstart_data["train"]), rows(quickstart_data["validation"])
    # Two arms; a one-setting sweep is the first of 3 repeats, so 1 trial + 2 repeats each,
    # 2 epochs, on half the rows and on all of them.
    passes = 2 * 3 * 2 * (round(train * 0.5) + train)
    assert (
        f"2 arm(s) x fraction(s) [0.5, 1] x (1 trial(s) + 2 repeat(s)) x 2 epoch(s); "
        f"{train:,} training rows, {val:,} validation rows" in out
    ), out
    assert (
        f"= {passes:,} training and {2 * 3 * 2 * 2 * val:,} validation row-passes in 12 "
        "training run(s)" in out
    ), out
    assert out.count("measured here:") == 2 and "estimate   about" in out
    assert "name: tiny" not in out  # the plan, not the config
