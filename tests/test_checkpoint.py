"""Checkpoint directories: round trips, atomic writes, and never unpickling code."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from raypipe.engine.checkpoint import (
    CheckpointError,
    load_task,
    load_train_state,
    load_weights,
    read_meta,
    read_spec,
    read_tokenizer,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from raypipe.engine.optim import build_optimizer
from raypipe.models import build_model
from raypipe.tasks import build_task

SPEC = {
    "type": "transformer",
    "config": {"vocab_size": 40, "dim": 16, "num_layers": 1, "num_heads": 2, "max_len": 12},
}


def _model():
    return build_model(SPEC)


def test_roundtrip(tmp_path):
    model = _model()
    opt = build_optimizer(model.parameters(), lr=1e-3, weight_decay=0.1)
    model(torch.randint(0, 40, (2, 5))).sum().backward()
    opt.step()
    path = save_checkpoint(
        tmp_path / "ckpt",
        module=model,
        spec=SPEC,
        meta={"step": 7},
        tokenizer_json='{"t": 1}',
        train_state={"step": 7, "optimizer": opt.state_dict(), "rng": rng_state()},
    )
    assert sorted(p.name for p in path.iterdir()) == [
        "meta.json",
        "model.json",
        "model.safetensors",
        "tokenizer.json",
        "train_state.pt",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind
    assert read_spec(path) == SPEC and read_meta(path) == {"step": 7}
    assert read_tokenizer(path) == '{"t": 1}'

    fresh = _model()
    load_weights(path, fresh)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    state = load_train_state(path)
    opt2 = build_optimizer(fresh.parameters(), lr=1e-3, weight_decay=0.1)
    opt2.load_state_dict(state["optimizer"])
    assert state["step"] == 7

    set_rng_state(state["rng"])
    a = torch.rand(3)
    set_rng_state(state["rng"])
    assert torch.equal(a, torch.rand(3))


def test_overwrite_is_atomic_replacement(tmp_path):
    model = _model()
    save_checkpoint(tmp_path / "c", module=model, spec=SPEC, meta={"v": 1})
    save_checkpoint(tmp_path / "c", module=model, spec=SPEC, meta={"v": 2})
    assert read_meta(tmp_path / "c") == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_mismatched_model_is_rejected(tmp_path):
    save_checkpoint(tmp_path / "c", module=_model(), spec=SPEC, meta={})
    bigger = build_model({**SPEC, "config": {**SPEC["config"], "dim": 32}})
    with pytest.raises(CheckpointError, match="do not fit the model|size mismatch"):
        load_weights(tmp_path / "c", bigger)


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="has no model.json"):
        read_spec(tmp_path / "nowhere")


class _Exploit:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_pickled_code_in_train_state_is_refused(tmp_path):
    save_checkpoint(tmp_path / "c", module=_model(), spec=SPEC, meta={}, train_state={"step": 1})
    # Plant a payload that would call a function if unpickled.
    torch.save(
        {"step": 1, "evil": _Exploit()}, tmp_path / "c" / "train_state.pt", pickle_module=pickle
    )
    with pytest.raises(pickle.UnpicklingError):
        load_train_state(tmp_path / "c")


def test_fine_tuned_task_roundtrip(tmp_path):
    task = build_task("classification", _model(), {"num_classes": 3})
    spec = {**SPEC, "task": {"name": "classification", "options": {"num_classes": 3}}}
    save_checkpoint(tmp_path / "ft", module=task, spec=spec, meta={})
    loaded = load_task(tmp_path / "ft").eval()
    x = torch.randint(1, 40, (2, 6))
    assert torch.allclose(task.eval().predict(x), loaded.predict(x))
    # The backbone of a fine-tuned checkpoint loads alone with the prefix.
    backbone = _model()
    load_weights(tmp_path / "ft", backbone, prefix="backbone.")
    assert torch.equal(backbone.tok_emb.weight, task.backbone.tok_emb.weight)
    assert (
        json.loads((tmp_path / "ft" / "model.json").read_text())["task"]["name"] == "classification"
    )
