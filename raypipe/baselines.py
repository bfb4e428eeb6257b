"""A classical baseline on the same labeled rows as the neural arms (scikit-learn, on the
driver, in seconds): for text, TF-IDF over word 1-2-grams with logistic regression; for images,
logistic regression on downsampled pixels. Scored on the same validation and test data, so a
neural model that loses to it shows in the summary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raypipe.config import LabeledSource
from raypipe.data import files as datafiles
from raypipe.data.vision import decode_images, drop_undecodable

#: Images are average-pooled to at most this side before the regression.
POOLED_SIDE = 8
#: What the summary and the run call each baseline.
DESCRIPTIONS = {
    "text": "TF-IDF word 1-2-grams + logistic regression",
    "image": f"logistic regression on {POOLED_SIDE}x{POOLED_SIDE} pooled pixels",
}
#: For a regression task: the same features, ridge regression in place of logistic.
REGRESSION_DESCRIPTIONS = {
    "text": "TF-IDF word 1-2-grams + ridge regression",
    "image": f"ridge regression on {POOLED_SIDE}x{POOLED_SIDE} pooled pixels",
}


@dataclass(frozen=True)
class Rows:
    """One split as the baseline reads it: inputs (texts or pixels) and class labels."""

    inputs: list[str] | np.ndarray
    labels: np.ndarray


def read_rows(files: list[str], source: LabeledSource, *, kind: str, image_size: int | None,
              channels: int | None, max_rows: int | None, skip_bad: bool = False,
              regression: bool = False) -> Rows:  # fmt: skip
    """The split's rows: text as strings; images decoded, pooled and flattened (with
    `skip_bad`, rows whose image does not decode are left out, as the neural arms leave them);
    labels as class ids, or (`regression`) as numbers."""
    column = source.text_column if kind == "text" else source.image_column
    table = pa.concat_tables(
        datafiles.read_blocks(
            files, [column, source.label_column], rows_per_block=2**20, max_rows=max_rows
        )  # fmt: skip
    )
    labels = table.column(source.label_column).to_numpy(zero_copy_only=False)
    labels = labels.astype(np.float64 if regression else np.int64)
    values = table.column(column).to_pylist()
    if kind == "text":
        return Rows([str(v) for v in values], labels)
    batch = {column: np.array(values, dtype=object), "label": labels}
    if skip_bad:
        batch = drop_undecodable(batch, image_column=column, channels=channels)
    labels = batch["label"]
    images = decode_images(batch, image_column=column, image_size=image_size,
                           channels=channels)["image"].astype(np.float32) / 255.0  # fmt: skip
    return Rows(_pool(images).reshape(len(labels), -1), labels)


def _pool(images: np.ndarray) -> np.ndarray:
    """(B, C, S, S) -> (B, C, s, s) by averaging s x s blocks, s = min(S, POOLED_SIDE)."""
    side = images.shape[-1]
    out = min(side, POOLED_SIDE)
    k = side // out
    trimmed = images[..., : out * k, : out * k]
    b, c = images.shape[:2]
    return trimmed.reshape(b, c, out, k, out, k).mean(axis=(3, 5))


def _model(kind: str, seed: int, regression: bool = False):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if regression:
        classifier = Ridge(alpha=1.0)
    else:
        classifier = LogisticRegression(max_iter=2000, random_state=seed)
    if kind == "text":
        return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), classifier)
    return make_pipeline(StandardScaler(), classifier)


def regression_scores(model, rows: Rows) -> dict[str, float]:
    """mse, mae and loss (the mse), as the regression task names them."""
    err = model.predict(rows.inputs) - rows.labels
    mse = float(np.mean(err**2))
    return {"mse": mse, "mae": float(np.mean(np.abs(err))), "loss": mse}


def scores(model, rows: Rows, num_classes: int) -> dict[str, float]:
    """accuracy, macro_f1 and loss (mean log loss), as the classification task names them."""
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    probabilities = _all_classes(model, model.predict_proba(rows.inputs), num_classes)
    predicted = probabilities.argmax(1)
    present = sorted(set(rows.labels.tolist()) | set(predicted.tolist()))
    return {
        "accuracy": float(accuracy_score(rows.labels, predicted)),
        "macro_f1": float(f1_score(rows.labels, predicted, average="macro", labels=present)),
        "loss": float(log_loss(rows.labels, probabilities, labels=list(range(num_classes)))),
    }


def _all_classes(model, probabilities: np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities over every class, zero for those the training rows lack."""
    out = np.zeros((len(probabilities), num_classes))
    out[:, model.classes_] = probabilities
    return out


def majority_share(train_labels: np.ndarray, labels: np.ndarray) -> float:
    """Chance: the accuracy on `labels` of always answering the most common training class
    (the lowest such class on a tie)."""
    if len(labels) == 0 or len(train_labels) == 0:
        return float("nan")
    values, counts = np.unique(train_labels, return_counts=True)
    return float(np.mean(labels == values[np.argmax(counts)]))


def fit_and_score(
    train: Rows,
    evaluations: dict[str, Rows],
    *,
    kind: str,
    num_classes: int,
    seed: int,
    regression: bool = False,
) -> dict[str, float]:
    """Fit on `train`; each split's metrics as `<split>/<metric>` (val/accuracy, ...), and
    `<split>/majority_accuracy`, the accuracy of always answering the training rows' most
    common class; for a regression task mse, mae and loss, and `<split>/mean_mse`, the mse of
    always answering the training rows' mean."""
    model = _model(kind, seed, regression).fit(train.inputs, train.labels)
    out = {}
    if regression:
        for split, rows in evaluations.items():
            out.update({f"{split}/{k}": v for k, v in regression_scores(model, rows).items()})
            # Chance for a number: always answering the training rows' mean.
            out[f"{split}/mean_mse"] = float(np.mean((rows.labels - train.labels.mean()) ** 2))
        return out
    for split, rows in evaluations.items():
        out.update({f"{split}/{k}": v for k, v in scores(model, rows, num_classes).items()})
        out[f"{split}/majority_accuracy"] = majority_share(train.labels, rows.labels)
    return out
