"""What a registered model needs, beside its graph, to be used on raw rows: `raypipe.json`,
an extra file of plain data (never code) written at registration and read by `raypipe predict`.

It says how a row becomes the model's input (which column, tokens per text and which of them a
long text keeps, or the image size) and what the output means (`Task.prediction`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError

from raypipe.errors import UserError

CARD_FILE = "raypipe.json"


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format: Literal[1] = 1
    task: str
    prediction: Literal["classes", "value", "tokens", "raw"]
    input: Literal["text", "image"]
    column: str  # the input column of the rows to predict on (text or image)
    max_len: PositiveInt | None = None  # text: tokens per row, with <bos>
    truncation: Literal["head", "tail", "head+tail"] = "head"
    image_size: PositiveInt | None = None
    channels: PositiveInt | None = None
    max_new_tokens: PositiveInt | None = None  # translation: longest output
    pad_id: int = 0
    #: classification on labels `prepare` numbered: each class id's name (its labels.json)
    labels: list[str] | None = None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    @classmethod
    def read(cls, text: str, where: str) -> ModelCard:
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            first = e.errors()[0]
            at = ".".join(str(p) for p in first["loc"]) or "the file"
            raise UserError(
                f"{where}: {CARD_FILE} is not one raypipe wrote ({at}: {first['msg']})"
            ) from None


def card_for(task, *, task_name: str, source, max_len: int | None, truncation: str,
             labels: list[str] | None = None) -> ModelCard:  # fmt: skip
    """The card of `task` (a fine-tuned Task) trained on rows of `source` (a LabeledSource),
    whose class ids are named `labels` (None: not named)."""
    config = task.backbone.config
    image = task.input == "image"
    return ModelCard(
        task=task_name,
        prediction=task.prediction,
        input=task.input,
        column=source.image_column if image else source.text_column,
        max_len=None if image else max_len,
        truncation=truncation,
        image_size=getattr(config, "image_size", None) if image else None,
        channels=getattr(config, "channels", None) if image else None,
        max_new_tokens=getattr(task, "max_new_tokens", None),
        pad_id=getattr(config, "pad_id", 0),
        labels=labels if task.prediction == "classes" else None,
    )
