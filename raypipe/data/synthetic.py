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
