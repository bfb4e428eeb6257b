"""The driver's console: plain lines, and one status line per stage (no Ray needed)."""

from __future__ import annotations

import io

from raypipe.progress import Console


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_file_gets_throttled_statuses_and_always_the_last_one():
    out = io.StringIO()
    console = Console(out, every_s=3600)
    console.status("pretrain step 10/30")  # the first is written at once
    console.status("pretrain step 20/30")  # within the interval: held back
    console.status("pretrain step 30/30")
    assert out.getvalue() == "pretrain step 10/30\n"
    console.line("[finetune] sweeping")  # the latest status goes before the next plain line
    console.end_status()  # already written: not again
    assert out.getvalue().splitlines() == [
        "pretrain step 10/30",
        "pretrain step 30/30",
        "[finetune] sweeping",
    ]
    console.status("finetune 1/4 trials done")
    console.status("finetune 4/4 trials done")
    console.end_status()  # the stage's final state ends up in the log
    assert out.getvalue().splitlines()[-2:] == [
        "finetune 1/4 trials done",
        "finetune 4/4 trials done",
    ]


def test_log_file_writes_every_status_with_no_interval():
    out = io.StringIO()
    console = Console(out, every_s=0)
    for step in (1, 2, 3):
        console.status(f"step {step}")
    console.end_status()
    assert out.getvalue() == "step 1\nstep 2\nstep 3\n"


def test_terminal_redraws_one_status_line_below_plain_lines():
    out = _Terminal()
    console = Console(out)
    console.status("step 1/2")
    console.status("step 2/2")
    console.line("note")
    console.end_status()
    text = out.getvalue()
    # Each status overwrites the line; a plain line clears it, then the status is redrawn.
    assert text == "\r\033[Kstep 1/2\r\033[Kstep 2/2\r\033[Knote\nstep 2/2\n"
    console.line("after")  # no status: nothing to clear or redraw
    assert out.getvalue().endswith("step 2/2\nafter\n")


def test_stderr_without_drops_only_the_named_lines(capsys):
    import sys

    from raypipe.progress import stderr_without

    with stderr_without("Successfully registered model", "Created version"):
        print("Successfully registered model 'x'.", file=sys.stderr)
        print("a warning stays", file=sys.stderr)
        print("Created version '1' of model 'x'.", file=sys.stderr)
    print("after the with", file=sys.stderr)
    assert capsys.readouterr().err == "a warning stays\nafter the with\n"
