"""Checkpoint directories: readable metadata, safetensors weights, state that never unpickles code.

Layout of one checkpoint directory:
    model.safetensors   weights of the unwrapped model (or task: backbone + head)
    model.json          {"type", "config"} for the model, plus "task" for fine-tuned models
    tokenizer.json      the tokenizer the weights were trained with, when there is one
    train_state.pt      optimizer, scheduler, step, RNG: loaded with weights_only=True
    meta.json           step, samples seen, objective or task, fingerprint, metrics
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from raypipe import registry, storage
from raypipe.atomic import atomic_directory
from raypipe.errors import UserError

MODEL_FILE = "model.safetensors"
SPEC_FILE = "model.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"


class CheckpointError(UserError):
    """A checkpoint directory is missing, incomplete or does not fit the model."""


def _state_for_saving(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous, unshared CPU tensors.
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    module: nn.Module | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    spec: dict[str, Any],
    meta: dict[str, Any],
    tokenizer_json: str | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically: into a temp dir beside `directory`, then rename.
    The weights are `module`'s, or `weights` already gathered (unsharded FSDP state)."""
    if (module is None) == (weights is None):
        raise ValueError("save_checkpoint takes exactly one of module and weights")
    state = weights if weights is not None else module.state_dict()
    with atomic_directory(directory) as tmp:
        save_file(_state_for_saving(state), str(tmp / MODEL_FILE))
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        if tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_text(tokenizer_json)
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
    return Path(directory)


def split_objective_state(
    state: dict[str, torch.Tensor], prefix: str = "model."
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An objective's state dict -> (the model's weights, the objective's own: heads, decoders).
    The model's weights are what a checkpoint's model.safetensors holds."""
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return weights, {k: v for k, v in state.items() if not k.startswith(prefix)}


def _require(directory: str | os.PathLike, name: str) -> str:
    """The file `name` of a checkpoint directory (a local path or a URI such as s3://…)."""
    path = storage.join(str(directory), name)
    if not storage.is_file(path):
        raise CheckpointError(
            f"checkpoint {directory} has no {name}: point to a directory written by raypipe"
        )
    return path


def has_file(directory: str | os.PathLike, name: str) -> bool:
    return storage.is_file(storage.join(str(directory), name))


def read_spec(directory: str | os.PathLike) -> dict[str, Any]:
    """model.json, checked: JSON with the model's type and config (and a fine-tuned task's
    name and options), naming only what raypipe has or the pipeline file names."""
    try:
        spec = json.loads(storage.read_text(_require(directory, SPEC_FILE)))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(
            f"checkpoint {directory}: {SPEC_FILE} is not JSON (damaged?)"
        ) from None
    task = spec.get("task", {}) if isinstance(spec, dict) else None
    if not (
        isinstance(spec, dict) and isinstance(spec.get("config"), dict)
        and isinstance(task, dict) and ("task" not in spec or isinstance(task.get("options"), dict))
    ):  # fmt: skip
        raise CheckpointError(
            f"checkpoint {directory}: {SPEC_FILE} lacks the model's type and config (or the "
            "task's name and options): point to a directory written by raypipe"
        )
    try:
        registry.check_named_by_file("model", spec.get("type"), f"checkpoint {directory}")
        if "task" in spec:
            registry.check_named_by_file("task", task.get("name"), f"checkpoint {directory}")
    except KeyError as e:
        raise CheckpointError(e.args[0]) from None
    return spec


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads(storage.read_text(_require(directory, META_FILE)))


def read_tokenizer(directory: str | os.PathLike) -> str:
    return storage.read_text(_require(directory, TOKENIZER_FILE))


def check_weights_file(directory: str | os.PathLike) -> None:
    """The weights file is safetensors (an 8-byte header length, then a JSON header), read
    without loading the tensors: anything else, say a pickle planted in its place, is refused
    up front. (Loading never unpickles either way.)"""
    path = _require(directory, MODEL_FILE)
    try:
        with storage.open_input_file(path) as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100 * 2**20:
                raise ValueError(f"header length {size}")
            header = json.loads(f.read(size))
            if not isinstance(header, dict):
                raise ValueError("header is not a mapping")
            total = f.size()
        # The header gives every tensor's byte range: a half-copied file is shorter.
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if 8 + size + max(ends, default=0) != total:
            raise ValueError(f"{total:,} bytes where its header describes "
                             f"{8 + size + max(ends, default=0):,}: truncated?")  # fmt: skip
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(
            f"checkpoint {directory}: {MODEL_FILE} is not a safetensors file ({e}); raypipe "
            "never unpickles weights: re-save it as safetensors or point to another checkpoint"
        ) from None


def load_weights(directory: str | os.PathLike, module: nn.Module, *, prefix: str = "") -> None:
    """Load `model.safetensors` into `module` strictly; `prefix` selects a sub-tree
    (e.g. "backbone." to take a fine-tuned model's backbone)."""
    path = _require(directory, MODEL_FILE)
    state = load_safetensors(storage.read_bytes(path))
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
    data = storage.read_bytes(_require(directory, STATE_FILE))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


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
    has_tokenizer = has_file(directory, TOKENIZER_FILE)
    task = build_task(
        spec["task"]["name"],
        build_model(spec),
        spec["task"]["options"],
        tokenizer_json=read_tokenizer(directory) if has_tokenizer else None,
    )
    load_weights(directory, task)
    return task


def save_into(run_dir: str, name: str, save, *, num_to_keep: int | None) -> str:
    """Write checkpoint `run_dir/name` with `save(dir)` straight to storage, whole or not at
    all, and keep only the newest `num_to_keep` of its kind (its name's prefix), as Train's
    CheckpointConfig does: for training that runs without Ray Train workers, whose
    checkpoints Train does not persist."""
    path = storage.join(run_dir, name)
    if storage.is_remote(path):
        with tempfile.TemporaryDirectory() as tmp:
            storage.upload_dir(save(Path(tmp) / "checkpoint"), path, last=META_FILE)
    else:
        save(Path(path))  # written whole or not at all
    if num_to_keep is not None:
        kind = name.rstrip("0123456789")  # e.g. epoch-: a reclaim-… checkpoint is not pruned
        names = {f.rsplit("/", 2)[-2] for f in storage.list_files(run_dir, META_FILE)}
        older = sorted(n for n in names if n.startswith(kind) and n[len(kind) :].isdigit())
        for stale in older[:-num_to_keep]:
            storage.delete_dir(storage.join(run_dir, stale))
    return path


def latest_checkpoint(directory: str, *, prefix: str) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint `directory/<prefix>…` in storage that loads whole: (path, train
    state). Names sort by age (zero-padded counts).

    Read from storage rather than from Ray Train's record, which registers a checkpoint a
    moment after its report and so, after a crash, can point one interval back. A checkpoint
    cut short by the crash fails to load and the one before it is taken.
    """
    dirs = {m.rsplit("/", 1)[0] for m in storage.list_files(directory, META_FILE)}
    for path in sorted((d for d in dirs if d.rsplit("/", 1)[-1].startswith(prefix)), reverse=True):
        try:
            state = load_train_state(path)
            read_meta(path)
            storage.read_bytes(storage.join(path, MODEL_FILE))
        except Exception:  # noqa: BLE001 - any damage means "not this one"
            continue
        return path, state
    return None
