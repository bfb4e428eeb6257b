"""What storage and registries hold never runs code: a planted pickle beside a registered
model, a planted sweep state, a checkpoint naming a module, a plugin path that is no class."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from raypipe import tracking

README = Path(__file__).resolve().parent.parent / "README.md"


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(100, 4)
        self.out = torch.nn.Linear(4, 2)

    def forward(self, ids):
        return self.out(self.emb(ids).mean(1))


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creating the file proves code ran


def _register(tmp_path: Path) -> tuple[str, Path]:
    """A model registered as raypipe does (pt2) under the README's name; its artifact folder."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    eid = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    run = tracking.start_run(tracking_uri=uri, experiment_id=eid, name="p", kind="pipeline")
    spec = {"input": ("input_ids", "int64", (-1, -1)), "output": ("logits", "float32", (-1, 2))}
    _, version = tracking.log_registered_model(
        run, model=_Tiny().eval(), input_example=torch.tensor([[1, 57, 98, 12]]), spec=spec,
        registered_name="quickstart", extra_files=[], tags={},
    )  # fmt: skip
    client.set_registered_model_alias("quickstart", tracking.CHAMPION, version)
    (mlmodel,) = (tmp_path / "artifacts").rglob("MLmodel")
    return uri, mlmodel.parent


def _readme_recipe() -> str:
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if "load_model(" in b]
    return block + "\nprint('logits', tuple(logits.shape))\n"


def _python(code: str, uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)  # MLflow's default: pickle allowed
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_the_documented_way_of_loading_never_unpickles(tmp_path):
    uri, folder = _register(tmp_path)
    loaded = _python(_readme_recipe(), uri)
    assert loaded.returncode == 0 and "logits (1, 2)" in loaded.stdout, loaded.stderr

    marker = tmp_path / "code-ran"
    torch.save(_Exploit(marker), folder / "data" / "model.pth")
    (folder / "data" / "pickle_module_info.txt").write_text("pickle")
    bare = "import mlflow; mlflow.pytorch.load_model('models:/quickstart/1')"
    _python(bare, uri)
    assert marker.exists()  # MLflow's defaults ran the planted code: what the loader guards against
    marker.unlink()

    refused = _python(_readme_recipe(), uri)
    assert refused.returncode != 0 and not marker.exists()
    assert "model.pth" in refused.stderr and "not loading it" in refused.stderr
    switched_off = _python(
        "from raypipe.registered import refuse_pickles; refuse_pickles()\n" + bare, uri
    )
    assert switched_off.returncode != 0 and not marker.exists()  # raypipe's own processes
    assert "pickle" in switched_off.stderr


def test_a_module_beside_a_downloaded_checkpoint_is_never_imported(tmp_path, quickstart_data):
    """`python -m raypipe` puts the current directory on the import path: a checkpoint whose
    model.json names a module shipped beside it must not get that module imported."""
    import json

    import yaml
    from test_bad_input import _checkpoint, _finetune_only
    from test_pipeline_e2e import tiny_config

    ckpt = Path(_checkpoint(tmp_path / "downloaded"))
    marker = tmp_path / "code-ran"
    (ckpt / "evil.py").write_text(f"open({str(marker)!r}, 'w')\nclass Model: pass\n")
    spec = json.loads((ckpt / "model.json").read_text())
    (ckpt / "model.json").write_text(json.dumps({**spec, "type": "evil:Model"}))
    raw = _finetune_only(tiny_config(quickstart_data, tmp_path / "runs"), init=str(ckpt))
    del raw["model"]
    (ckpt / "p.yaml").write_text(yaml.safe_dump(raw))
    for command in ("validate", "run"):
        done = subprocess.run(
            [sys.executable, "-m", "raypipe", command, "p.yaml"],
            capture_output=True, text=True, cwd=ckpt, timeout=300,
        )  # fmt: skip
        assert done.returncode == 2 and not marker.exists(), done.stderr
        assert "names the model 'evil:Model'" in done.stderr and "Traceback" not in done.stderr


def test_a_checkpoint_may_name_only_what_the_pipeline_file_names(tmp_path, monkeypatch):
    import json

    import pytest

    from raypipe import registry
    from raypipe.engine.checkpoint import CheckpointError, read_spec

    ckpt = tmp_path / "c"
    ckpt.mkdir()
    spec = {"type": "raypipe.models.transformer:Transformer", "config": {"vocab_size": 300}}
    (ckpt / "model.json").write_text(json.dumps(spec))
    monkeypatch.setattr(registry, "_TRUSTED", set())  # no pipeline file loaded in this test
    with pytest.raises(CheckpointError, match="not importing it"):
        read_spec(ckpt)
    registry.trust("raypipe.models.transformer:Transformer")  # as a pipeline file naming it does
    assert read_spec(ckpt)["type"] == spec["type"]
    (ckpt / "model.json").write_text(json.dumps({**spec, "type": "transformer"}))
    assert read_spec(ckpt)["type"] == "transformer"  # raypipe's own names are always fine
