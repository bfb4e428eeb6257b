"""Cold-start accounting (raypipe/timing.py) and the MFU arithmetic (engine/flops.py)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from raypipe import timing
from raypipe.engine.flops import mfu, transformer_flops_per_token
from raypipe.models import build_model


def test_breakdown_splits_the_time_between_marks_in_milestone_order():
    marks = {"imports": 12.0, "ray": 15.5, "workers": 20.0, "first_step": 21.0}
    spans = timing.breakdown(marks, start=10.0)
    assert spans == {"imports": 2.0, "ray": 3.5, "workers": 4.5, "first_step": 1.0, "total": 11.0}
    assert timing.describe(spans).startswith("first step 11.0 s after process start (imports 2.0,")


def test_process_start_is_when_the_process_began():
    # A child that sleeps, then reports how long ago the kernel says it started.
    code = (
        "import time; time.sleep(1.5); from raypipe import timing; "
        "print(time.time() - timing.process_start())"
    )
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True).stdout)  # fmt: skip
    assert 1.5 <= age < 1.5 + 30  # at least the sleep; the interpreter start adds a little
    assert timing.process_start() <= time.time()


def test_flops_per_token_is_6n_plus_attention():
    config = {"vocab_size": 100, "dim": 32, "num_layers": 2, "num_heads": 4, "max_len": 16}
    model = build_model({"type": "transformer", "config": config})
    n = sum(p.numel() for p in model.parameters()) - 16 * 32  # all but the position table
    assert transformer_flops_per_token(model, 16) == 6 * n + 12 * 2 * 32 * 16
    assert transformer_flops_per_token(torch.nn.Linear(2, 2), 16) is None
    assert mfu(1000.0, 2e9, 4e12) == pytest.approx(0.5)
