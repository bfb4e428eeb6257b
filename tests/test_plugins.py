"""Plugins: a package of the user's own objective and task, outside the project and not on
`sys.path`, named by the pipeline file (`plugins:`), run end to end by `raypipe run` with the
code shipped to every Ray process; and each mistake in one a single line before Ray starts.

(`ray job submit` of the same plugin on a cluster: tests/test_cluster_jobs.py.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from test_pipeline_e2e import tiny_config

from raypipe import cli, localray
from raypipe.stages import connect

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugin" / "myext"


def plugin_pipeline(data: dict, storage: Path, plugin: str) -> dict:
    raw = tiny_config(data, storage, name="plug", plugins=[plugin])
    raw["pretrain"].update(objective="myext.objectives:ReplacedTokenDetection",
                           options={"replace_prob": 0.2}, max_steps=10)  # fmt: skip
    raw["finetune"].update(task="myext.tasks:SmoothedClassification", num_classes=2,
                           options={"smoothing": 0.1}, epochs=1,
                           sweep={"num_samples": 1})  # fmt: skip
    return raw


@pytest.mark.slow
def test_a_plugin_outside_the_project_runs_end_to_end(tmp_path, quickstart_data):
    # In a subfolder: Ray puts the driver's current directory on its workers' path, so a
    # plugin found there would not show that raypipe shipped it.
    shutil.copytree(EXAMPLE, tmp_path / "code" / "myext")
    raw = plugin_pipeline(quickstart_data, tmp_path / "runs", "code/myext")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "raypipe", "run", "p.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "pretrain step 10/10" in out and "best val/error_rate" in out, out
    # The task declares error_rate lower-is-better: the sweep minimised it, and the summary
    # says which sign of the gap is a win.
    assert "lower val/error_rate is better, so - means pretrained wins" in out, out

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    pretrain = next(r for r in runs if r.info.run_name == "pretrain")
    assert client.get_metric_history(pretrain.info.run_id, "train/detect_acc")  # the plugin's
    trials = [r for r in runs if r.data.tags.get("raypipe.kind") == "trial"]
    assert trials and all("val/error_rate" in t.data.metrics for t in trials)


def test_the_readme_shows_the_example_plugin_as_it_is():
    readme = (ROOT / "README.md").read_text()
    for f in sorted(EXAMPLE.glob("*.py")):
        if f.name != "__init__.py":
            assert f.read_text().strip() in readme, f"README's copy of {f.name} is out of date"


# --- each plugin mistake: one line, before Ray ----------------------------------------------

_TASK = """
from raypipe.tasks.base import Task
import torch
from torch import nn


class T(Task):
    option_names = ("num_classes", "input")
    {extra}

    def __init__(self, backbone, *, num_classes, input="text"):
        super().__init__(backbone, input=input)
        self.head = nn.Linear(backbone.dim, num_classes)

    def predict(self, x):
        return self.head(self.backbone.pooled({{"input_ids": x}}))

    def forward(self, batch):
        {forward}
{summarize}
"""
_GOOD_FORWARD = (
    "loss = self.predict(batch['input_ids']).float().mean()\n"
    "        return loss, {'count': torch.ones(()), 'abs': loss.detach()}"
)
_GOOD_SUMMARIZE = """
    @staticmethod
    def summarize(stats):
        return {"mae": float(stats["abs"]), "loss": float(stats["abs"])}
"""


def _task(extra="", forward=_GOOD_FORWARD, summarize=_GOOD_SUMMARIZE) -> str:
    return _TASK.format(extra=extra, forward=forward, summarize=summarize)


_OBJECTIVE = """
from raypipe.objectives.base import Objective


class O(Objective):
    {extra}

    def forward(self, batch):
        {forward}


def f(model):
    return model


class NotOne:
    pass
"""


def _objective(extra="", forward="return self.model(batch['input_ids']).mean(), {}") -> str:
    return _OBJECTIVE.format(extra=extra, forward=forward)


#: case -> (module source, where the pipeline names it, what the one line must say)
PLUGIN_CASES = {
    "not_an_objective": (_objective(), ("objective", "NotOne"), ["not a subclass", "Objective"]),
    "a_function": (_objective(), ("objective", "f"), ["the function", "not a subclass"]),
    "bad_data_kind": (_objective('data_kind = "sound"'), ("objective", "O"), ["data_kind is 'sound'"]),
    "syntax_error": ("def broken(:\n", ("objective", "O"), ["pretrain.objective", "syntax error in", "mod.py, line 1"]),
    "import_fails": ("import nowhere_to_be_found\n", ("objective", "O"), ["cannot load objective", "No module named 'nowhere_to_be_found'"]),
    "forward_returns_a_float": (
        _objective(forward="return 1.0"), ("objective", "O"), ["O.forward returned a float", "(loss, metrics)"],
    ),
    "forward_reads_a_missing_column": (
        _objective(forward="return self.model(batch['tokens']).mean(), {}"), ("objective", "O"),
        ["'tokens'", "['input_ids']"],
    ),
    "task_without_summarize": (_task(summarize=""), ("task", "T"), ["T does not implement summarize"]),
    "sweep_metric_not_reported": (
        _task(), ("task", "T", "val/maee"), ["finetune.sweep.metric", "'val/maee'", "val/mae"],
    ),
    "task_forward_returns_a_tensor": (
        _task(forward="return self.predict(batch['input_ids'])"), ("task", "T"),
        ["T.forward returned a tensor", "(loss, stats)"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(PLUGIN_CASES))
def test_plugin_mistakes_are_one_line_before_ray(
    case, tmp_path, quickstart_data, monkeypatch, capsys
):
    source, (kind, attr, *metric), expected = PLUGIN_CASES[case]
    package = f"plug_{case}"  # a name of its own: this process imports each case's plugin
    (tmp_path / "code" / package).mkdir(parents=True)
    (tmp_path / "code" / package / "__init__.py").write_text("")
    (tmp_path / "code" / package / "mod.py").write_text(textwrap.dedent(source))
    raw = tiny_config(quickstart_data, tmp_path / "runs", plugins=[f"code/{package}"])
    if kind == "objective":
        raw["pretrain"]["objective"] = f"{package}.mod:{attr}"
    else:
        raw["finetune"].update(task=f"{package}.mod:{attr}", num_classes=2)
        if metric:
            raw["finetune"]["sweep"]["metric"] = metric[0]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a plugin mistake visible up front")

    monkeypatch.setattr(connect, "_init_ray", no_ray)
    monkeypatch.setattr(localray, "start_in_background", lambda **kwargs: None)
    monkeypatch.chdir(tmp_path)
    code = cli.main(["run", "p.yaml"])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_USER_ERROR, err
    assert len(err.splitlines()) == 1 and err.startswith("raypipe: error: "), err
    for fragment in expected:
        assert fragment in err, (fragment, err)


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("missing", "does not exist (plugin paths are relative to the current directory"),
        ("module_file", "is not a package folder"),
        ("shadows_json", "a module named 'json' is already importable"),
    ],
)
def test_plugin_paths_are_checked(layout, expected, tmp_path, quickstart_data, capsys, monkeypatch):
    path = {"missing": "code/nothing", "module_file": "code/one.py", "shadows_json": "code/json"}[
        layout
    ]
    (tmp_path / "code" / "json").mkdir(parents=True)
    (tmp_path / "code" / "json" / "__init__.py").write_text("")
    (tmp_path / "code" / "one.py").write_text("")
    raw = tiny_config(quickstart_data, tmp_path / "runs", plugins=[path])
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["validate", "p.yaml"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "plugins[0]" in err and expected in err, err
