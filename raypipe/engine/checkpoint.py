"""Checkpoint directories: readable metadata, safetensors weights, state that never unpickles code.

Layout of one checkpoint directory:
    model.safetensors   weights of the unwrapped model (or task: backbone + head)
    model.json          {"type", "config"} for the model, plus "task" for fine-tuned models
    tokenizer.json      the tokenizer the weights were trained with, when there is one
    train_state.pt      optimizer, scheduler, step, RNG: loaded with weights_only=True
    meta.json           step, samples seen, objective or task, fingerprint, metrics
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raypipe.atomic import atomic_directory
from raypipe.errors import UserError

MODEL_FILE = "model.safetensors"
SPEC_FILE = "model.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"


class CheckpointError(UserError):
    """A checkpoint directory is missing, incomplete or does not fit the model."""


def _state_for_saving(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous, unshared CPU tensors.
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    module: nn.Module,
    spec: dict[str, Any],
    meta: dict[str, Any],
    tokenizer_json: str | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically: into a temp dir beside `directory`, then rename."""
    with atomic_directory(directory) as tmp:
        save_file(_state_for_saving(module), str(tmp / MODEL_FILE))
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        if tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_text(tokenizer_json)
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
    return Path(directory)


def _require(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {directory} has no {name}: point to a directory written by raypipe"
        )
    return path


def read_spec(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads(_require(Path(directory), SPEC_FILE).read_text())


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads(_require(Path(directory), META_FILE).read_text())


def read_tokenizer(directory: str | os.PathLike) -> str:
    return _require(Path(directory), TOKENIZER_FILE).read_text()


def load_weights(directory: str | os.PathLike, module: nn.Module, *, prefix: str = "") -> None:
    """Load `model.safetensors` into `module` strictly; `prefix` selects a sub-tree
    (e.g. "backbone." to take a fine-tuned model's backbone)."""
    path = _require(Path(directory), MODEL_FILE)
    state = load_file(str(path))
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or reshaped:
        raise CheckpointError(
            f"weights in {path} do not fit the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape (checkpoint vs model) {reshaped[:5]}"
        )
    module.load_state_dict(state, strict=True)


def load_train_state(directory: str | os.PathLike) -> dict[str, Any]:
    return torch.load(_require(Path(directory), STATE_FILE), map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_task(directory: str | os.PathLike):
    """Rebuild a fine-tuned model (backbone + head) from its checkpoint directory."""
    from raypipe.models import build_model
    from raypipe.tasks import build_task

    spec = read_spec(directory)
    if "task" not in spec:
        raise CheckpointError(
            f"checkpoint {directory} holds no fine-tuned task (model.json has no 'task')"
        )
    has_tokenizer = (Path(directory) / TOKENIZER_FILE).is_file()
    task = build_task(
        spec["task"]["name"],
        build_model(spec),
        spec["task"]["options"],
        tokenizer_json=read_tokenizer(directory) if has_tokenizer else None,
    )
    load_weights(directory, task)
    return task
