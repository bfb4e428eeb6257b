"""Ray Data's scheduling loop, held back while the consumer has batches waiting, pauses
(data/idle_nap.py) instead of going round thousands of times a second: a real executor."""

from __future__ import annotations

import sys
import time

import pytest
from ray import cloudpickle
from ray.data import ExecutionOptions, ExecutionResources

from raypipe.data import idle_nap

# Ray Data's tasks unpickle the dataset's context, this file's callback class with it: by value,
# as this file is not importable on Ray's workers.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Steps(idle_nap.ExecutionCallback):
    """Records what the nap reads (`progress`) on each step of the loop (the executor makes its own
    instance, so the record is the class's)."""

    seen: list = []

    def on_execution_step(self, executor) -> None:
        Steps.seen.append(idle_nap.progress(executor))


def _held(ray, *, nap: bool, hold_s: float = 1.0) -> list:
    """The loop's steps while the consumer holds its first batch for `hold_s`, reading held
    back by a small object-store limit (as pretraining's streamed data is)."""
    ds = ray.data.range(400_000, override_num_blocks=400).map_batches(lambda b: b)
    ds.context.execution_options = ExecutionOptions(
        preserve_order=True,
        resource_limits=ExecutionResources.for_limits(object_store_memory=4 * 2**20),
    )
    ds.context.custom_execution_callback_classes = [Steps]
    if nap:
        idle_nap.nap_when_idle(ds)
    it = iter(ds.iter_batches(batch_size=100, prefetch_batches=1))
    next(it)
    time.sleep(0.5)  # past the first blocks' tasks
    Steps.seen = []
    time.sleep(hold_s)
    seen = list(Steps.seen)
    for _ in it:  # the rest, so the executor ends
        pass
    return seen


def test_the_executor_shows_the_nap_what_it_reads(ray_session):
    seen = _held(ray_session, nap=False, hold_s=0.5)
    assert seen and None not in seen  # this Ray's executor has the counts the nap reads
    assert len(seen[0]) == 2 * len(idle_nap.COUNTS)  # the input buffer and the map


def _idle_steps(seen: list) -> int:
    """Steps that changed nothing (the same counts as the step before)."""
    return sum(a == b for a, b in zip(seen, seen[1:], strict=False))


def test_a_held_back_loop_pauses_instead_of_spinning(ray_session):
    spinning = _idle_steps(_held(ray_session, nap=False))
    napping = _idle_steps(_held(ray_session, nap=True))
    # Without the nap the loop goes round hundreds of times in the second held, changing
    # nothing; with it, such a step comes at most once per NAP_S (about 30 here, against 340).
    assert napping <= 1 / idle_nap.NAP_S
    assert spinning > 2 * max(napping, 1), (spinning, napping)


def test_the_nap_is_added_once_and_to_that_dataset_only(ray_session):
    ds = ray_session.data.range(10)
    other = ray_session.data.range(10)
    idle_nap.nap_when_idle(idle_nap.nap_when_idle(ds))
    assert ds.context.custom_execution_callback_classes.count(idle_nap.IdleNap) == 1
    assert idle_nap.IdleNap not in other.context.custom_execution_callback_classes
    with pytest.raises(StopIteration):
        it = iter(ds.iter_batches(batch_size=10))
        assert len(next(it)["id"]) == 10
        next(it)
