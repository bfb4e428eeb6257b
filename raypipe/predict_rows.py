"""One batch of raw rows -> predictions, with a registered model (what each of `raypipe predict`'s
Ray Data actors runs): rows encoded as fine-tuning encoded them (the model's card says how),
the model's pt2 graph run on them, its output turned into columns by what the task predicts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from raypipe.data.text import encode_prompts, encode_texts, load_tokenizer
from raypipe.data.vision import decode_images
from raypipe.engine.checkpoint import TOKENIZER_FILE
from raypipe.model_card import CARD_FILE, ModelCard
from raypipe.tasks.translation import greedy_decode

#: The columns each kind of prediction writes.
OUTPUT_COLUMNS = {
    "classes": ("prediction", "probabilities"),
    "value": ("prediction",),
    "tokens": ("translation",),
    "raw": ("output",),
}


def output_columns(card: ModelCard) -> tuple[str, ...]:
    """What a prediction writes: OUTPUT_COLUMNS, and each class's name when the card has
    them (`prediction_label`)."""
    named = card.prediction == "classes" and card.labels
    return OUTPUT_COLUMNS[card.prediction] + (("prediction_label",) if named else ())


def read_card(model_dir: Path, where: str) -> tuple[ModelCard, str | None]:
    """The card and tokenizer a registered model carries (extra_files/)."""
    from raypipe.errors import UserError

    extra = model_dir / "extra_files"
    if not (extra / CARD_FILE).is_file():
        raise UserError(
            f"{where} carries no {CARD_FILE} (registered by an older raypipe?): "
            "run its pipeline again to register a model `raypipe predict` can use"
        )
    card = ModelCard.read((extra / CARD_FILE).read_text(), where)
    tok = extra / TOKENIZER_FILE
    tokenizer_json = tok.read_text() if tok.is_file() else None
    if card.input == "text" and tokenizer_json is None:
        raise UserError(f"{where} reads text but carries no {TOKENIZER_FILE}")
    return card, tokenizer_json


class RowPredictor:
    """`model` (the registered graph, a callable module) applied to batches of raw rows."""

    def __init__(self, model, card: ModelCard, tokenizer_json: str | None, device: str = "cpu"):
        self.model, self.card, self.device = model, card, device
        self.tokenizer_json = tokenizer_json
        self.tokenizer = load_tokenizer(tokenizer_json) if tokenizer_json else None

    def inputs(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        c = self.card
        if c.input == "image":
            return decode_images(batch, image_column=c.column, image_size=c.image_size,
                                 channels=c.channels)  # fmt: skip
        if c.prediction == "tokens":
            return encode_prompts(batch, tokenizer_json=self.tokenizer_json, text_column=c.column,
                                  max_len=c.max_len)  # fmt: skip
        ids = encode_texts(batch, tokenizer_json=self.tokenizer_json, text_column=c.column,
                           length=c.max_len, eos=False, truncation=c.truncation)  # fmt: skip
        return {"input_ids": ids}

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        encoded = self.inputs(batch)
        x = torch.as_tensor(encoded.get("image", encoded.get("input_ids")))
        x = (x if self.card.input == "image" else x.long()).to(self.device)
        kind = self.card.prediction
        if kind == "tokens":
            return {"translation": self._translate(x, torch.as_tensor(encoded["target_start"]))}
        out = self.model(x).float().cpu()
        if kind == "classes":
            probs, ids = torch.softmax(out, -1).numpy(), out.argmax(-1).numpy()
            got = {"prediction": ids, "probabilities": list(probs)}
            if self.card.labels:
                got["prediction_label"] = np.array([self._name(i) for i in ids])
            return got
        if kind == "value":
            return {"prediction": out.reshape(len(out)).numpy()}
        return {"output": list(out.reshape(len(out), -1).numpy())}

    def _name(self, class_id: int) -> str:
        names = self.card.labels
        return names[class_id] if class_id < len(names) else str(class_id)

    def _translate(self, ids: torch.Tensor, start: torch.Tensor) -> np.ndarray:
        rows = torch.arange(ids.shape[0], device=ids.device)

        def next_logits(buf: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            return self.model(buf)[rows, lengths - 1]

        out = greedy_decode(
            next_logits, ids, start.to(ids.device), max_len=self.card.max_len,
            max_new_tokens=self.card.max_new_tokens or 64, pad_id=self.card.pad_id,
        )  # fmt: skip
        return np.array([self.tokenizer.decode(t) for t in out], dtype=object)
