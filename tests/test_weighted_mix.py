"""Weighted mixing of pretraining sources (`data.unlabeled.weights`): the share of token
blocks each path gives, through real Ray Data on real Parquet shards.

(Run after the other Ray tests of the shared session: with this file before
test_pipeline_e2e.py, that file's first sweep hung twice in a full run, its trials idle,
though the same order alone, and a mixed pretraining on workers followed by a sweep in one
process, finished; not yet explained.)"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypipe.config import parse_config
from raypipe.data.pipelines import (
    Footprint,
    build_dataset,
    data_footprint,
    mix_pass,
    mix_repeats,
    mixed_dataset,
)
from raypipe.data.text import train_tokenizer

# Distinct rows (the footers' sizes of a column of one repeated string are its dictionary's),
# and more than one block of each (a mix draws whole blocks: it follows the weights block by
# block).
SMALL = [f"apple pie is sweet {i}" for i in range(4_000)]
BIG = [f"zebra runs far away {i}" for i in range(40_000)]


def test_repeats_read_the_source_with_most_data_per_weight_once():
    # 100 vs 1000 units at equal weights: the small one ten times, the big one once.
    assert mix_repeats([100, 1000], [1, 1]) == [10, 1]
    # The big one at a quarter of the small one's share: read once; the small one 3 times
    # (250 per unit of weight: 3 x 100 >= 250).
    assert mix_repeats([100, 1000], [4, 1]) == [40, 1]
    assert mix_repeats([100, 1000], [1, 20]) == [1, 2]
    assert mix_repeats([1, 10**9], [1, 1]) == [1000, 1]  # capped: MAX_MIX_REPEATS
    fps = [Footprint(rows=10, size=100), Footprint(rows=100, size=1000)]
    assert mix_pass(fps, [1, 1], "text_blocks") == Footprint(rows=200, size=2000)


def _shard(path, texts):
    path.mkdir()
    pq.write_table(pa.table({"text": texts}), path / "part-0.parquet")
    return [str(path / "part-0.parquet")]


def _shares(ds, tokenizer) -> tuple[int, int]:
    """Token blocks holding a token of the small source's text only, and of the big one's."""
    a, b = (set(tokenizer.encode(t[0]).ids) for t in (SMALL, BIG))
    only_a, only_b = np.array(sorted(a - b)), np.array(sorted(b - a))
    small = big = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        small += int(np.isin(batch["input_ids"], only_a).any(axis=1).sum())
        big += int(np.isin(batch["input_ids"], only_b).any(axis=1).sum())
    return small, big


def test_weights_set_each_sources_share_of_the_blocks(ray_session, tmp_path):
    cfg = parse_config({
        "name": "mix", "data": {"unlabeled": {"path": ["a", "b"], "weights": [1, 1]}},
        "model": {"type": "bag", "dim": 8, "max_len": 8},
        "pretrain": {"objective": "skipgram", "max_steps": 1, "batch_size": 2},
    })  # fmt: skip
    source = cfg.data.unlabeled
    groups = [_shard(tmp_path / "a", SMALL), _shard(tmp_path / "b", BIG)]
    tokenizer = train_tokenizer(SMALL[:1] + BIG[:1], vocab_size=300)
    common = {"kind": "text_blocks", "source": source, "tokenizer_json": tokenizer.to_str(),
              "seq_len": 8, "text_extra": 0, "model_config": {}}  # fmt: skip
    # Read one after another, the big source gives ten times the small one's blocks.
    plain = build_dataset(groups[0] + groups[1], **common)
    small, big = _shares(plain, tokenizer)
    assert big == pytest.approx(10 * small, rel=0.1)
    # Mixed 1:1, they give about the same: the small one is read ten times, the big once.
    fps = [data_footprint(g, kind="text_blocks", source=source) for g in groups]
    mixed = mixed_dataset(groups, [1.0, 1.0], footprints=fps, passes=1, **common)
    small, big = _shares(mixed, tokenizer)
    assert small == pytest.approx(big, rel=0.15) and big == pytest.approx(
        _shares(plain, tokenizer)[1], rel=0.1
    )
    # 3:1 for the small one.
    mixed = mixed_dataset(groups, [3.0, 1.0], footprints=fps, passes=1, **common)
    small, big = _shares(mixed, tokenizer)
    assert small == pytest.approx(3 * big, rel=0.15)


@pytest.mark.parametrize(
    "unlabeled, fragment",
    [({"path": "a", "weights": [1]}, None), ({"path": ["a", "b"], "weights": [1]}, "one weight per path"),
     ({"path": ["a", "b"], "weights": [1, 0]}, "greater than 0")],
)  # fmt: skip
def test_weights_are_checked_against_the_paths(unlabeled, fragment):
    from raypipe.config import ConfigError

    raw = {"name": "mix", "data": {"unlabeled": unlabeled}, "model": {"type": "bag"},
           "pretrain": {"objective": "skipgram", "max_steps": 1}}  # fmt: skip
    if fragment is None:
        assert parse_config(raw).data.unlabeled.weights == [1.0]
        return
    with pytest.raises(ConfigError, match=fragment):
        parse_config(raw)


@pytest.mark.slow
def test_a_weighted_mix_pretrains_on_ray_train_workers(ray_session, quickstart_data, tmp_path):
    # On Ray Train's workers (not in the driver): the mixed stream is split across them.
    from raypipe.pipeline import run_pipeline
    from raypipe.summary import format_summary

    raw = {
        "name": "mix", "storage": str(tmp_path),
        "data": {"unlabeled": {"path": [quickstart_data["unlabeled"], quickstart_data["train"]],
                               "weights": [1, 3]}},
        "tokenizer": {"vocab_size": 300},
        "model": {"type": "bag", "dim": 16, "max_len": 16},
        "pretrain": {"objective": "skipgram", "max_steps": 12, "batch_size": 8, "log_every": 4,
                     "checkpoint_every": 12, "scaling": {"in_process": False}},
    }  # fmt: skip
    summary = run_pipeline(parse_config(raw))
    (stage,) = summary.stages
    assert stage.name == "pretrain" and stage.metrics["steps"] == 12, format_summary(summary)


def test_an_objectives_revision_and_the_weights_enter_the_pretrain_fingerprint(monkeypatch):
    # A stage cached before skip-gram's defaults changed (revision 0) must not be reused.
    from raypipe.objectives.skipgram import SkipGram
    from raypipe.plan import make_plan
    from raypipe.preflight import RunContext
    from raypipe.stages.pretrain import fingerprint

    def fp(**unlabeled):
        cfg = parse_config({"name": "fp", "data": {"unlabeled": {"path": ["a", "b"], **unlabeled}},
                            "model": {"type": "bag"},
                            "pretrain": {"objective": "skipgram", "max_steps": 1}})  # fmt: skip
        return fingerprint(cfg, RunContext("s", "t", "0", make_plan(cfg)))

    now = fp()
    assert fp(weights=[1, 1]) != now and fp(weights=[1, 1]) != fp(weights=[1, 2])
    monkeypatch.setattr(SkipGram, "revision", 0)
    assert fp() != now
