"""Image transforms that run inside Ray Data: decode, augment, pair with text."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from raypipe.data.text import train_tokenizer
from raypipe.data.vision import (
    decode_images,
    encode_image_text,
    encode_labeled_images,
    simclr_views,
)
from raypipe.errors import UserError
from raypipe.vocab import BOS_ID, EOS_ID, PAD_ID


def encoded(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def column(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def test_decode_bytes_and_arrays_to_uint8_chw():
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[:, :, 0] = 200
    gray = np.full((8, 8), 90, dtype=np.uint8)
    batch = {"img": column([encoded(rgb), encoded(rgb, "JPEG"), rgb, gray, rgb.reshape(-1)])}
    out = decode_images(batch, image_column="img", image_size=8, channels=3)["image"]
    assert out.shape == (5, 3, 8, 8) and out.dtype == np.uint8
    assert (out[0, 0] == 200).all() and (out[0, 1:] == 0).all()  # PNG is exact
    assert abs(int(out[1, 0].mean()) - 200) < 5  # JPEG is close
    assert (out[3] == 90).all()  # grayscale replicated to RGB
    assert np.array_equal(out[4], out[2])  # a flat H*W*C array
    small = decode_images({"img": column([encoded(rgb)])}, image_column="img", image_size=4,
                          channels=1)["image"]  # fmt: skip
    assert small.shape == (1, 1, 4, 4)


def test_decode_names_the_column_on_bad_input():
    with pytest.raises(UserError, match="image column 'img'.*cannot decode"):
        decode_images({"img": column([b"junk"])}, image_column="img", image_size=8, channels=3)
    with pytest.raises(UserError, match="uint8"):
        decode_images({"img": column([np.zeros((4, 4), np.float32)])}, image_column="img",
                      image_size=8, channels=3)  # fmt: skip


def test_simclr_views_are_two_different_augmentations():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    out = simclr_views({"img": column([encoded(arr)] * 4)}, image_column="img", image_size=12,
                       channels=3)  # fmt: skip
    assert out["view1"].shape == out["view2"].shape == (4, 3, 12, 12)
    assert out["view1"].dtype == np.uint8
    assert not np.array_equal(out["view1"], out["view2"])


def test_image_text_pairs_and_labeled_images():
    tok = train_tokenizer(["a red circle", "a blue square"] * 10, vocab_size=300)
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    batch = {"img": column([encoded(arr)] * 2), "cap": column(["a red circle", "a blue square"])}
    out = encode_image_text(batch, image_column="img", text_column="cap", image_size=8, channels=3,
                            tokenizer_json=tok.to_str(), text_len=12)  # fmt: skip
    ids = out["input_ids"]
    assert out["image"].shape == (2, 3, 8, 8) and ids.shape == (2, 12)
    assert (
        (ids[:, 0] == BOS_ID).all() and (ids == EOS_ID).sum() == 2 and (ids[:, -1] == PAD_ID).all()
    )
    labeled = encode_labeled_images({"img": batch["img"], "y": np.array([3, 1])}, image_column="img",
                                    label_column="y", label_dtype="int64", image_size=8,
                                    channels=3)  # fmt: skip
    assert labeled["label"].tolist() == [3, 1] and labeled["label"].dtype == np.int64
