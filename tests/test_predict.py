"""`raypipe predict`'s parts that need no Ray: the model card, rows -> model inputs -> columns
(checked against the task's own computations), and the driver's checks of its inputs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raypipe.config.data_schema import LabeledSource
from raypipe.data.text import encode_labeled, encode_translation, train_tokenizer
from raypipe.errors import UserError
from raypipe.model_card import ModelCard, card_for
from raypipe.predict import check_out, input_files, kept_columns
from raypipe.predict_rows import RowPredictor, output_columns
from raypipe.tasks import build_task
from tests.test_tasks import text_model

TEXTS = ["the red cat sees a dog", "a small dog likes the house", "le chat rouge voit un chien"]


@pytest.fixture(scope="module")
def tokenizer_json():
    return train_tokenizer(TEXTS * 20, vocab_size=300).to_str()


def _card(task, column="text", max_len=32, truncation="head"):
    source = LabeledSource(path="x", text_column=column)
    card = card_for(task, task_name="t", source=source, max_len=max_len, truncation=truncation)
    return ModelCard.read(card.to_json(), "here")  # what predict reads back


def test_classification_rows_give_the_tasks_own_probabilities(tokenizer_json):
    task = build_task("classification", text_model(False, 300), {"num_classes": 3}).eval()
    card = _card(task, column="review", truncation="tail")
    assert (card.prediction, card.input, card.column, card.max_len) == ("classes", "text",
                                                                        "review", 32)  # fmt: skip
    batch = {"review": np.array(TEXTS, dtype=object), "label": np.array([0, 1, 2])}
    out = RowPredictor(task.predictor(), card, tokenizer_json)(batch)
    enc = encode_labeled(batch, tokenizer_json=tokenizer_json, text_column="review",
                         label_column="label", max_len=32, truncation="tail")  # fmt: skip
    with torch.no_grad():
        logits = task.predict(torch.as_tensor(enc["input_ids"]).long())
    expected = torch.softmax(logits, -1).numpy()
    assert np.allclose(np.stack(out["probabilities"]), expected, atol=1e-6)
    assert (out["prediction"] == expected.argmax(-1)).all()
    assert "prediction_label" not in out  # the card names no classes
    card = ModelCard.read(card.model_copy(update={"labels": ["neg", "neutral", "pos"]}).to_json(),
                          "here")  # fmt: skip
    named = RowPredictor(task.predictor(), card, tokenizer_json)(batch)
    names = np.array(["neg", "neutral", "pos"])[expected.argmax(-1)]
    assert (named["prediction_label"] == names).all()
    assert output_columns(card) == ("prediction", "probabilities", "prediction_label")


def test_regression_rows_give_one_value_each(tokenizer_json):
    task = build_task("regression", text_model(False, 300), {}).eval()
    card = _card(task)
    out = RowPredictor(task.predictor(), card, tokenizer_json)({"text": np.array(TEXTS, object)})
    assert card.prediction == "value" and out["prediction"].shape == (3,)


def test_translation_rows_decode_as_the_task_translates(tokenizer_json):
    task = build_task("translation", text_model(True, 300), {"max_new_tokens": 6},
                      tokenizer_json=tokenizer_json).eval()  # fmt: skip
    card = _card(task)
    assert card.prediction == "tokens" and card.max_new_tokens == 6
    batch = {"text": np.array(TEXTS, dtype=object), "target": np.array(["x"] * 3, dtype=object)}
    out = RowPredictor(task.predictor(), card, tokenizer_json)(batch)
    enc = encode_translation(batch, tokenizer_json=tokenizer_json, text_column="text",
                             target_column="target", max_len=32)  # fmt: skip
    ids = task.translate(torch.as_tensor(enc["input_ids"]), torch.as_tensor(enc["target_start"]))
    assert list(out["translation"]) == [task.tokenizer.decode(t) for t in ids]


def test_a_card_not_raypipes_is_refused():
    with pytest.raises(UserError, match="raypipe.json is not one raypipe wrote"):
        ModelCard.read('{"task": "x", "prediction": "classes", "input": "audio", "column": "a"}',
                       "models:/m/1")  # fmt: skip


def test_out_must_be_new_or_empty(tmp_path):
    check_out(str(tmp_path / "new"))
    check_out(str(tmp_path))  # empty
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="already holds files"):
        check_out(str(tmp_path))
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_input_files_by_kind(tmp_path):
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "a.parquet")
    assert input_files(str(tmp_path)) == ("read_parquet", [str(tmp_path / "a.parquet")])
    (tmp_path / "b.csv").write_text("text\nb\n")
    with pytest.raises(UserError, match="mixes"):
        input_files(str(tmp_path))
    assert input_files(str(tmp_path / "*.csv"))[0] == "read_csv"
    with pytest.raises(UserError, match="does not exist"):
        input_files(str(tmp_path / "nope"))


def test_kept_columns(tokenizer_json):
    task = build_task("classification", text_model(False, 300), {"num_classes": 2})
    card = _card(task)
    assert kept_columns(["id", "text", "label"], card, None) == ["id", "label"]
    assert kept_columns(["id", "text"], card, ["id"]) == ["id"]
    with pytest.raises(UserError, match="no column 'text'"):
        kept_columns(["id", "body"], card, None)
    with pytest.raises(UserError, match="fix --keep"):
        kept_columns(["id", "text"], card, ["idx"])
