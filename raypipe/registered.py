"""Loading a model raypipe registered, with nothing in the store trusted to run code.

MLflow's PyTorch loader unpickles a `model.pth` it finds in the model's data folder before it
looks at the format the model was saved in, imports the module a `pickle_module_info.txt`
names, and allows pickle unless `MLFLOW_ALLOW_PICKLE_DESERIALIZATION` is false. raypipe
registers models in the `pt2` format (an exported graph with tensors and plain data only), so
`load_model` accepts exactly that: the data folder may hold `model.pt2` and nothing that
unpickles, and MLflow then checks the archive itself with pickle switched off.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from raypipe.errors import UserError

PICKLE_SWITCH = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


def refuse_pickles() -> None:
    """Turn MLflow's pickle loading off in this process (what raypipe's commands do)."""
    os.environ[PICKLE_SWITCH] = "false"


#: MLflow resolves `models:/` URIs, and logs models, through its process-wide tracking and
#: registry URIs: one block at a time sets them (fine-tuning tasks run side by side register
#: from threads of one driver).
_GLOBAL_STORE = threading.Lock()


@contextmanager
def global_store(uri: str | None) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs set to `uri` for the block, then put
    back as they were (environment included, which MLflow exports them to)."""
    import mlflow

    if uri is None:
        yield
        return
    with _GLOBAL_STORE:
        tracking = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(tracking)
            mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def load_model(model_uri: str, *, tracking_uri: str | None = None):
    """The registered model at `model_uri` (`models:/NAME/VERSION`, `models:/NAME@champion`,
    a run's artifact URI or a local folder) as a torch module, refusing anything but the
    pickle-free `pt2` form raypipe writes."""
    import mlflow

    refuse_pickles()
    with global_store(tracking_uri):
        local = Path(mlflow.artifacts.download_artifacts(model_uri))
    check_model_folder(local, model_uri)
    return mlflow.pytorch.load_model(str(local))


def check_model_folder(folder: Path, where: str) -> None:
    """Refuse a model folder that is not the `pt2` form raypipe registers."""
    mlmodel = folder / "MLmodel"
    try:
        flavor = (yaml.safe_load(mlmodel.read_text()) or {})["flavors"]["pytorch"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        raise UserError(
            f"{where} is not a PyTorch model MLflow logged (no readable MLmodel)"
        ) from None
    if flavor.get("model_data") != "data":
        raise UserError(f"{where} keeps its model outside data/, unlike raypipe's: not loading it")
    found = (
        sorted(p.name for p in (folder / "data").iterdir()) if (folder / "data").is_dir() else []
    )
    if found != ["model.pt2"]:
        raise UserError(
            f"{where} holds data/{{{', '.join(found)}}} where raypipe writes only data/model.pt2 "
            "(a planted pickle?): not loading it; check who can write to the artifact store"
        )
