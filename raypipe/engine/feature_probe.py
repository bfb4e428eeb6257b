"""A cheap downstream estimate of a pretraining checkpoint (`pretrain.probe`): the backbone's
pooled features of a small labeled sample, frozen, and a classical model fitted on them.

- linear: standardized features -> logistic regression (accuracy), or ridge regression for a
  regression task (mse);
- knn: k nearest neighbours by cosine similarity (accuracy; classification only).

Pure PyTorch and scikit-learn: no Ray, no MLflow (stages/probing.py runs it off the training
workers). Seeded: the same checkpoint and sample always give the same figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raypipe.engine.checkpoint import load_weights, read_spec
from raypipe.models import build_model

#: Rows per forward pass when computing features.
FEATURE_BATCH = 256


@dataclass(frozen=True)
class ProbeSample:
    """One task's labeled sample, encoded as fine-tuning encodes it: `column` (input_ids or
    image) of the training and the validation rows, with their labels."""

    task: str
    column: str
    pool: str
    train_inputs: np.ndarray
    train_labels: np.ndarray
    eval_inputs: np.ndarray
    eval_labels: np.ndarray
    regression: bool = False

    @property
    def metric(self) -> str:
        return "mse" if self.regression else "accuracy"


def load_backbone(checkpoint: str) -> torch.nn.Module:
    """A pretraining checkpoint's model (weights only), in eval mode."""
    spec = read_spec(checkpoint)
    model = build_model({"type": spec["type"], "config": spec["config"]})
    load_weights(checkpoint, model)
    return model.eval()


@torch.no_grad()
def features(model: torch.nn.Module, inputs: np.ndarray, column: str, pool: str) -> np.ndarray:
    """(rows, dim) pooled features, float64."""
    out = []
    for start in range(0, len(inputs), FEATURE_BATCH):
        chunk = torch.tensor(inputs[start : start + FEATURE_BATCH])  # a copy: writable
        out.append(model.pooled({column: chunk}, pool).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def fit_and_score(sample: ProbeSample, train_x: np.ndarray, eval_x: np.ndarray, *,
                  method: str, k: int, seed: int) -> float:  # fmt: skip
    """The probe's figure on the sample's validation rows (accuracy, or mse)."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    if sample.regression:
        model = make_pipeline(StandardScaler(), Ridge(alpha=1.0))
        model.fit(train_x, sample.train_labels)
        return float(np.mean((model.predict(eval_x) - sample.eval_labels) ** 2))
    if method == "knn":
        model = make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=k))
    else:
        model = make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed)
        )
    model.fit(train_x, sample.train_labels)
    return float(np.mean(model.predict(eval_x) == sample.eval_labels))


def probe_checkpoint(checkpoint: str, samples: list[ProbeSample], *, method: str, k: int,
                     seed: int) -> dict[str, float]:  # fmt: skip
    """{"probe/<task>/<metric>": figure} for each sample, from one checkpoint."""
    model = load_backbone(checkpoint)
    out = {}
    for s in samples:
        train_x = features(model, s.train_inputs, s.column, s.pool)
        eval_x = features(model, s.eval_inputs, s.column, s.pool)
        value = fit_and_score(s, train_x, eval_x, method=method, k=k, seed=seed)
        out[f"probe/{s.task}/{s.metric}"] = value
    return out
