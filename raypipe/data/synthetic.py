"""The quickstart's data, generated locally: movie reviews where pretraining visibly pays.

Each review has one sentiment, expressed through adjectives of that polarity. The unlabeled
corpus uses all 48 sentiment adjectives, several per review, so a language model learns which
ones go together. The small labeled training set uses only a quarter of them ("seen" words);
the validation set uses all of them. A model trained from scratch can only guess on unseen
words; a pretrained one already knows which side they are on.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

POSITIVE = [
    "wonderful", "brilliant", "superb", "delightful", "charming", "moving",
    "gripping", "stunning", "excellent", "lovely", "masterful", "thrilling",
    "heartfelt", "joyful", "inspiring", "dazzling", "elegant", "witty",
    "captivating", "remarkable", "beautiful", "fantastic", "marvelous", "splendid",
]  # fmt: skip
NEGATIVE = [
    "dreadful", "boring", "tedious", "awful", "clumsy", "dull",
    "lifeless", "painful", "terrible", "bland", "forgettable", "messy",
    "sloppy", "tiresome", "unbearable", "shallow", "grating", "muddled",
    "hollow", "lousy", "miserable", "pointless", "wretched", "horrible",
]  # fmt: skip
NOUNS = [
    "film", "movie", "story", "plot", "cast", "script", "ending", "soundtrack",
    "director", "performance", "dialogue", "pacing", "finale", "lead actor",
    "villain", "sequel", "premise", "camera work",
]  # fmt: skip
ADVERBS = ["truly", "really", "simply", "quite", "utterly", "rather", "so", "very"]
SENTIMENT_TEMPLATES = [
    "the {noun} was {adv} {adj} .",
    "i found the {noun} {adj} .",
    "what a {adj} {noun} .",
    "everyone agreed the {noun} felt {adj} .",
    "honestly , the {noun} is {adj} and {adj2} .",
    "the {noun} was {adj} , and the {noun2} was {adv} {adj2} .",
]
NEUTRAL_TEMPLATES = [
    "we watched it on a {day} night .",
    "the theater was {crowd} .",
    "it runs about {minutes} minutes .",
    "my {friend} came along .",
    "we had {snack} during the show .",
]
FILL = {
    "day": ["monday", "tuesday", "friday", "saturday", "sunday"],
    "crowd": ["full", "half empty", "quiet", "noisy", "packed"],
    "minutes": ["ninety", "one hundred", "two hundred", "eighty"],
    "friend": ["sister", "brother", "neighbour", "friend", "cousin"],
    "snack": ["popcorn", "nachos", "candy", "tea"],
}
#: Fraction of each polarity's adjectives the labeled training set uses.
SEEN_FRACTION = 0.25


def _sentence(rng: random.Random, words: list[str]) -> str:
    template = rng.choice(SENTIMENT_TEMPLATES)
    adj, adj2 = rng.sample(words, 2)
    noun, noun2 = rng.sample(NOUNS, 2)
    return template.format(adj=adj, adj2=adj2, noun=noun, noun2=noun2, adv=rng.choice(ADVERBS))


def _neutral(rng: random.Random) -> str:
    template = rng.choice(NEUTRAL_TEMPLATES)
    return template.format(**{k: rng.choice(v) for k, v in FILL.items()})


def review(rng: random.Random, label: int, words: list[str], num_sentences: int) -> str:
    parts = [_sentence(rng, words) for _ in range(num_sentences)]
    if rng.random() < 0.6:
        parts.insert(rng.randrange(len(parts) + 1), _neutral(rng))
    return " ".join(parts)


def _write(directory: Path, rows: dict[str, list], num_shards: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(rows.values())))
    per = -(-n // num_shards)
    for s in range(num_shards):
        part = {k: v[s * per : (s + 1) * per] for k, v in rows.items()}
        pq.write_table(pa.table(part), directory / f"part-{s:05d}.parquet")


def generate_quickstart(
    *,
    unlabeled_dir: str | Path,
    train_dir: str | Path,
    validation_dir: str | Path,
    num_unlabeled: int = 20_000,
    num_train: int = 256,
    num_validation: int = 512,
    seed: int = 0,
) -> dict[str, int]:
    """Write the three Parquet datasets; returns the rows written per split."""
    rng = random.Random(seed)
    k = int(len(POSITIVE) * SEEN_FRACTION)
    seen = {1: POSITIVE[:k], 0: NEGATIVE[:k]}
    everything = {1: POSITIVE, 0: NEGATIVE}

    unlabeled = []
    for _ in range(num_unlabeled):
        label = rng.randrange(2)
        unlabeled.append(review(rng, label, everything[label], rng.randint(2, 4)))

    def labeled(n: int, vocab: dict[int, list[str]]) -> dict[str, list]:
        labels = [i % 2 for i in range(n)]
        rng.shuffle(labels)
        return {"text": [review(rng, y, vocab[y], 1) for y in labels], "label": labels}

    _write(Path(unlabeled_dir), {"text": unlabeled}, num_shards=4)
    _write(Path(train_dir), labeled(num_train, seen), num_shards=1)
    _write(Path(validation_dir), labeled(num_validation, everything), num_shards=1)
    return {"unlabeled": num_unlabeled, "train": num_train, "validation": num_validation}


# --- images, captions, translation pairs, regression targets (test and demo data) -------------

SHAPES = ["square", "circle", "bar", "cross"]
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}  # fmt: skip
PLACES = ["left", "right", "top", "bottom"]


def shape_image(rng: random.Random, shape: int, colour: str, place: str, size: int) -> bytes:
    """A PNG of one coloured shape on a noisy background; the shape decides the class."""
    import io

    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(0, 70) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    half = size // 2
    s = max(3, size // 3)
    x0 = {"left": 1, "right": half, "top": rng.randint(1, half), "bottom": rng.randint(1, half)}
    y0 = {"left": rng.randint(1, half), "right": rng.randint(1, half), "top": 1, "bottom": half}
    x, y = x0[place], y0[place]
    fill = COLOURS[colour]
    name = SHAPES[shape]
    if name == "square":
        draw.rectangle([x, y, x + s, y + s], fill=fill)
    elif name == "circle":
        draw.ellipse([x, y, x + s, y + s], fill=fill)
    elif name == "bar":
        draw.rectangle([x, y + s // 3, x + s, y + 2 * s // 3], fill=fill)
    else:
        draw.line([x, y, x + s, y + s], fill=fill, width=2)
        draw.line([x, y + s, x + s, y], fill=fill, width=2)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def generate_shapes(directory: str | Path, *, num_rows: int, size: int = 16, seed: int = 0) -> int:
    """Rows of {image: PNG bytes, label: shape index, caption: "a red circle on the left"}."""
    rng = random.Random(seed)
    rows: dict[str, list] = {"image": [], "label": [], "caption": []}
    for _ in range(num_rows):
        shape, colour, place = (
            rng.randrange(len(SHAPES)),
            rng.choice(list(COLOURS)),
            rng.choice(PLACES),
        )
        rows["image"].append(shape_image(rng, shape, colour, place, size))
        rows["label"].append(shape)
        rows["caption"].append(f"a {colour} {SHAPES[shape]} on the {place}")
    _write(Path(directory), rows, num_shards=2)
    return num_rows


_EN = {
    "the": "le", "a": "un", "red": "rouge", "small": "petit", "big": "grand", "cat": "chat",
    "dog": "chien", "man": "homme", "woman": "femme", "sees": "voit", "likes": "aime",
    "house": "maison", "car": "voiture", "green": "vert", "old": "vieux", "child": "enfant",
}  # fmt: skip
_SUBJECTS = ["cat", "dog", "man", "woman", "child"]
_OBJECTS = ["house", "car", "cat", "dog"]
_ADJ = ["red", "small", "big", "green", "old"]


def generate_translation(directory: str | Path, *, num_rows: int, seed: int = 0) -> int:
    """Rows of {text: an English sentence, target: its word-by-word pseudo-French}."""
    rng = random.Random(seed)
    rows: dict[str, list] = {"text": [], "target": []}
    for _ in range(num_rows):
        words = ["the", rng.choice(_ADJ), rng.choice(_SUBJECTS), rng.choice(["sees", "likes"]),
                 "a", rng.choice(_ADJ), rng.choice(_OBJECTS)]  # fmt: skip
        rows["text"].append(" ".join(words))
        rows["target"].append(" ".join(_EN[w] for w in words))
    _write(Path(directory), rows, num_shards=1)
    return num_rows


def generate_regression(directory: str | Path, *, num_rows: int, seed: int = 0) -> int:
    """Reviews scored in [-1, 1]: (positive - negative adjectives) / all sentiment adjectives."""
    rng = random.Random(seed)
    rows: dict[str, list] = {"text": [], "label": []}
    for _ in range(num_rows):
        pos, neg = rng.randint(0, 3), rng.randint(0, 3)
        if pos + neg == 0:
            pos = 1
        words = rng.sample(POSITIVE, pos) + rng.sample(NEGATIVE, neg)
        rng.shuffle(words)
        rows["text"].append(f"the {rng.choice(NOUNS)} was " + " and ".join(words) + " .")
        rows["label"].append((pos - neg) / (pos + neg))
    _write(Path(directory), rows, num_shards=1)
    return num_rows
