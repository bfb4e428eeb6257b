"""Images: decoding and augmentation as batch transforms that run inside Ray Data on CPU.

A source image column holds encoded bytes (PNG, JPEG, anything Pillow reads) or uint8 arrays
(H x W, H x W x C, or flat H*W*C). Every transform returns uint8 arrays (B, C, S, S), so the
object store moves a quarter of what float pixels would; models scale them on the device.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from raypipe.data.text import encode_texts, labels_as
from raypipe.errors import UserError

#: Larger images are refused before they are decoded (a 13000 x 13000 PNG costs 1.4 GB of
#: memory): far above any size training resizes to, and below Pillow's own bomb limits.
MAX_IMAGE_PIXELS = 50_000_000


class ImageTooLarge(ValueError):
    pass


def open_image(data: bytes) -> Image.Image:
    """Pillow's lazy open (the header only), refused above MAX_IMAGE_PIXELS."""
    im = Image.open(io.BytesIO(data))
    width, height = im.size
    if width * height > MAX_IMAGE_PIXELS:
        im.close()
        raise ImageTooLarge(f"{width}x{height} pixels, over the limit of {MAX_IMAGE_PIXELS:,}")
    return im


def _to_pil(value, *, channels: int, column: str) -> Image.Image:
    mode = "L" if channels == 1 else "RGB"
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return open_image(bytes(value)).convert(mode)
        except Exception as e:  # Pillow raises several types for damaged data
            raise UserError(
                f"image column '{column}' holds bytes Pillow cannot decode ({e}); set "
                "data.bad_images: skip to skip such rows, or drop them with `raypipe prepare`"
            ) from None
    arr = np.asarray(value)
    if arr.ndim == 1:  # flat H*W*C: square images only
        side = int(round((arr.size / channels) ** 0.5))
        if side * side * channels != arr.size:
            raise UserError(
                f"image column '{column}': a flat array of {arr.size} values is not a square "
                f"image with {channels} channel(s); store H x W x C arrays"
            )
        arr = arr.reshape(side, side, channels)
    if arr.dtype != np.uint8:
        raise UserError(f"image column '{column}': arrays must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert(mode)


def _decodes(value, *, channels: int, column: str) -> bool:
    try:
        _to_pil(value, channels=channels, column=column)
    except UserError:
        return False
    return True


def drop_undecodable(
    batch: dict[str, np.ndarray], *, image_column: str, channels: int, tally=None
) -> dict[str, np.ndarray]:
    """`data.bad_images: skip`: drop the rows whose image does not decode, adding their number
    to `tally` (an actor with `add`), before the transform that decodes for real."""
    values = batch[image_column]
    keep = np.fromiter(
        (_decodes(v, channels=channels, column=image_column) for v in values),
        dtype=bool,
        count=len(values),
    )
    if keep.all():
        return batch
    if tally is not None:
        tally.add.remote(int((~keep).sum()))
    return {k: v[keep] for k, v in batch.items()}


def _chw(img: Image.Image, size: int) -> np.ndarray:
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _images(batch: dict[str, np.ndarray], column: str, channels: int) -> list[Image.Image]:
    return [_to_pil(v, channels=channels, column=column) for v in batch[column]]


def decode_images(
    batch: dict[str, np.ndarray], *, image_column: str, image_size: int, channels: int
) -> dict[str, np.ndarray]:
    """Decode and resize to `image_size` squares -> {"image": (B, C, S, S) uint8}."""
    imgs = _images(batch, image_column, channels)
    return {"image": np.stack([_chw(im, image_size) for im in imgs])}


def _augment(img: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """SimCLR's augmentations: random resized crop, flip, colour jitter, grayscale, blur."""
    w, h = img.size
    area = w * h
    for _ in range(10):  # random resized crop: scale (0.2, 1), aspect ratio (3/4, 4/3)
        target = area * rng.uniform(0.2, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round((target * ratio) ** 0.5)), int(round((target / ratio) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            img = img.crop((x0, y0, x0 + cw, y0 + ch))
            break
    img = img.resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0) * size / 32))
    x = np.asarray(img, dtype=np.float32) / 255.0
    if x.ndim == 2:
        x = x[..., None]
    if rng.random() < 0.8:  # colour jitter: brightness, contrast, saturation
        x = x * rng.uniform(0.6, 1.4)
        x = (x - x.mean()) * rng.uniform(0.6, 1.4) + x.mean()
        if x.shape[-1] == 3:
            gray = x.mean(-1, keepdims=True)
            x = (x - gray) * rng.uniform(0.6, 1.4) + gray
    if x.shape[-1] == 3 and rng.random() < 0.2:
        x = np.repeat(x.mean(-1, keepdims=True), 3, axis=-1)
    x = (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return x.transpose(2, 0, 1)


def simclr_views(
    batch: dict[str, np.ndarray], *, image_column: str, image_size: int, channels: int
) -> dict[str, np.ndarray]:
    """Two independently augmented views of every image -> {"view1", "view2"}.

    Augmentation draws from fresh OS entropy: a stream that loops over the data sees new views
    every epoch (a seeded draw would repeat them).
    """
    rng = np.random.default_rng()
    imgs = _images(batch, image_column, channels)
    return {
        "view1": np.stack([_augment(im, image_size, rng) for im in imgs]),
        "view2": np.stack([_augment(im, image_size, rng) for im in imgs]),
    }


def encode_image_text(
    batch: dict[str, np.ndarray],
    *,
    image_column: str,
    text_column: str,
    image_size: int,
    channels: int,
    tokenizer_json: str,
    text_len: int,
) -> dict[str, np.ndarray]:
    """Pairs -> {"image": (B, C, S, S) uint8, "input_ids": <bos> text <eos>, padded to text_len}."""
    out = decode_images(batch, image_column=image_column, image_size=image_size, channels=channels)
    out["input_ids"] = encode_texts(
        batch, tokenizer_json=tokenizer_json, text_column=text_column, length=text_len, eos=True
    )
    return out


def encode_labeled_images(
    batch: dict[str, np.ndarray],
    *,
    image_column: str,
    label_column: str,
    label_dtype: str,
    image_size: int,
    channels: int,
) -> dict[str, np.ndarray]:
    out = decode_images(batch, image_column=image_column, image_size=image_size, channels=channels)
    out["label"] = labels_as(batch[label_column], label_dtype, column=label_column)
    return out
