"""A held-out share of the unlabeled rows (data.unlabeled_holdout): chosen by a seeded hash of
each row's content, so the two sides split the rows exactly and the same rows fall out every time."""

from __future__ import annotations

import numpy as np

from raypipe.data.pipelines import Holdout, held_out


def _batch(n: int) -> dict[str, np.ndarray]:
    texts = np.array([f"review number {i} of many" for i in range(n)], dtype=object)
    return {"text": texts, "id": np.arange(n)}


def test_the_two_sides_split_the_rows_and_the_share_is_about_the_fraction():
    batch = _batch(4000)
    kept = held_out(batch, column="text", holdout=Holdout(0.1, 7, keep=True))
    trained = held_out(batch, column="text", holdout=Holdout(0.1, 7, keep=False))
    assert set(kept["id"]).isdisjoint(trained["id"])
    assert sorted([*kept["id"], *trained["id"]]) == list(range(4000))
    assert 0.08 < len(kept["id"]) / 4000 < 0.12  # binomial: sd ~0.005
    assert list(trained["text"]) == [batch["text"][i] for i in trained["id"]]  # columns aligned


def test_the_same_seed_holds_out_the_same_rows_in_any_batching_and_another_seed_others():
    batch = _batch(1000)
    whole = held_out(batch, column="text", holdout=Holdout(0.2, 1, keep=True))["id"]
    parts = [held_out({k: v[i : i + 100] for k, v in batch.items()}, column="text",
                      holdout=Holdout(0.2, 1, keep=True))["id"] for i in range(0, 1000, 100)]  # fmt: skip
    assert list(np.concatenate(parts)) == list(whole)
    other = held_out(batch, column="text", holdout=Holdout(0.2, 2, keep=True))["id"]
    assert set(other) != set(whole)
    images = {"image": np.stack([np.full((2, 2), i, dtype=np.uint8) for i in range(50)])}
    assert len(held_out(images, column="image", holdout=Holdout(0.5, 1, keep=True))["image"]) < 50
