"""Text data: tokenizer, packing, labeled encoding, finding and checking shards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypipe.data import files as datafiles
from raypipe.data.text import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    check_tokenizer,
    encode_labeled,
    length_profile,
    load_tokenizer,
    pack_blocks,
    train_tokenizer,
)
from raypipe.errors import UserError

TEXTS = [f"the film was {w} and the cast was {w} ." for w in ("good", "bad", "fine", "dull")] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def test_special_tokens_have_fixed_ids(tokenizer):
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    byte = train_tokenizer(TEXTS, kind="byte")
    assert byte.get_vocab_size() == 256 + len(SPECIAL_TOKENS)


def test_tokenizer_roundtrips_text(tokenizer):
    text = "the cast was dull ."
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    # Unseen characters still encode (byte level: nothing is unknown).
    assert tokenizer.decode(tokenizer.encode("zebra ü").ids) == "zebra ü"


def test_foreign_tokenizer_is_rejected():
    from tokenizers import Tokenizer, models

    foreign = Tokenizer(models.WordLevel({"hello": 0, "<pad>": 1}, unk_token="hello"))
    with pytest.raises(UserError, match="tokenizer must map <pad> to id 0"):
        check_tokenizer(foreign)


def test_pack_blocks_matches_reference(tokenizer):
    docs = TEXTS[:7]
    out = pack_blocks(
        {"text": np.array(docs, dtype=object)},
        tokenizer_json=tokenizer.to_str(),
        text_column="text",
        block_size=9,
    )["input_ids"]
    # Reference: the plain concatenation of each document's ids followed by <eos>.
    stream = []
    for d in docs:
        stream += tokenizer.encode(d, add_special_tokens=False).ids + [EOS_ID]
    n = len(stream) // 9
    assert out.dtype == np.int32 and out.shape == (n, 9)
    assert out.reshape(-1).tolist() == stream[: n * 9]


def test_encode_labeled_pads_truncates_and_prefixes_bos(tokenizer):
    texts = ["the film was good .", "the film was good and the cast was bad and " * 5]
    out = encode_labeled(
        {"text": np.array(texts, dtype=object), "label": np.array([1, 0])},
        tokenizer_json=tokenizer.to_str(),
        text_column="text",
        label_column="label",
        max_len=12,
    )
    ids, labels = out["input_ids"], out["label"]
    assert ids.shape == (2, 12) and labels.dtype == np.int64 and labels.tolist() == [1, 0]
    first = [BOS_ID] + tokenizer.encode(texts[0], add_special_tokens=False).ids
    assert ids[0, : len(first)].tolist() == first
    assert (ids[0, len(first) :] == PAD_ID).all()
    second = [BOS_ID] + tokenizer.encode(texts[1], add_special_tokens=False).ids
    assert ids[1].tolist() == second[:12]


@pytest.mark.parametrize("how", ["head", "tail", "head+tail"])
def test_long_texts_keep_the_tokens_truncation_names(tokenizer, how):
    text = "the film was good and the cast was bad and " * 5
    doc = tokenizer.encode(text, add_special_tokens=False).ids
    out = encode_labeled(
        {"text": np.array([text], dtype=object), "label": np.array([1])},
        tokenizer_json=tokenizer.to_str(), text_column="text", label_column="label", max_len=13,
        truncation=how,
    )["input_ids"][0].tolist()  # fmt: skip
    # Reference, by hand: 12 tokens of room after <bos>; head+tail keeps 3 and the last 9.
    want = {"head": doc[:12], "tail": doc[-12:], "head+tail": doc[:3] + doc[-9:]}[how]
    assert len(doc) > 12 and out == [BOS_ID, *want]


def test_length_profile_counts_rows_cut_and_tokens_kept(tokenizer):
    texts = ["good .", "the film was good and the cast was bad and " * 5]
    lengths = [len(tokenizer.encode(t, add_special_tokens=False).ids) for t in texts]
    got = length_profile(texts, tokenizer.to_str(), max_len=13)
    assert got["rows"] == 2 and got["truncated_share"] == 0.5
    assert got["tokens_kept_share"] == pytest.approx((lengths[0] + 12) / sum(lengths))


def test_encode_labeled_rejects_bad_labels_and_nulls(tokenizer):
    kwargs = dict(tokenizer_json=tokenizer.to_str(), text_column="t", label_column="y", max_len=8)
    with pytest.raises(UserError, match="label column 'y' must hold integers"):
        encode_labeled({"t": np.array(["a"], dtype=object), "y": np.array([0.5])}, **kwargs)
    with pytest.raises(UserError, match="text column 't' holds null values"):
        encode_labeled({"t": np.array([None], dtype=object), "y": np.array([1])}, **kwargs)


def test_tokenizer_is_parsed_once_per_process(tokenizer):
    text = tokenizer.to_str()
    assert load_tokenizer(text) is load_tokenizer(text)


def _write(path, **columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def test_resolve_file_dir_and_glob(tmp_path):
    _write(tmp_path / "d" / "a.parquet", text=["x"])
    _write(tmp_path / "d" / "sub" / "b.parquet", text=["y"])
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    found = datafiles.resolve_parquet_files(str(tmp_path / "d"), key="k")
    assert [p.rsplit("/", 1)[1] for p in found] == ["a.parquet", "b.parquet"]
    assert datafiles.resolve_parquet_files(str(tmp_path / "d" / "a.parquet"), key="k") == [found[0]]
    assert (
        datafiles.resolve_parquet_files(str(tmp_path / "d" / "**" / "*.parquet"), key="k") == found
    )


def test_a_list_of_paths_reads_each_in_order_once(tmp_path):
    _write(tmp_path / "b" / "1.parquet", text=["x"])
    _write(tmp_path / "a" / "2.parquet", text=["y"])
    b, a = (str(tmp_path / d) for d in ("b", "a"))
    found = datafiles.resolve_parquet_files([b, a, f"{a}/*.parquet"], key="k")
    assert [p.rsplit("/", 2)[1] for p in found] == ["b", "a"]  # as listed, each file once
    with pytest.raises(UserError) as info:
        datafiles.resolve_parquet_files([b, str(tmp_path / "c")], key="data.unlabeled.path")
    assert str(info.value).startswith("data.unlabeled.path[1]: data path ")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "data path '{p}/missing' does not exist"),
        (lambda p: (p / "missing").mkdir(), "directory '{p}/missing' holds no .parquet files"),
    ],
)
def test_missing_and_empty_paths(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(UserError) as info:
        datafiles.resolve_parquet_files(str(tmp_path / "missing"), key="data.unlabeled.path")
    assert str(info.value).startswith("data.unlabeled.path: ")
    assert message.format(p=tmp_path) in str(info.value)
    with pytest.raises(UserError, match="no files match"):
        datafiles.resolve_parquet_files(str(tmp_path / "*.nothing"), key="k")


def test_missing_column_names_the_columns_present(tmp_path):
    _write(tmp_path / "a.parquet", body=["x"], label=[1])
    with pytest.raises(UserError) as info:
        datafiles.check_columns([str(tmp_path / "a.parquet")], ["text"], key="data.unlabeled")
    assert "column(s) ['text'] not in" in str(info.value)
    assert "columns present: ['body', 'label']" in str(info.value)


def test_corrupt_parquet_names_the_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=f"'{bad}' is not a readable Parquet file"):
        datafiles.check_columns([str(bad)], ["text"], key="data.unlabeled")


def test_manifest_digest_changes_with_content(tmp_path):
    _write(tmp_path / "a.parquet", text=["x"])
    files = [str(tmp_path / "a.parquet")]
    before = datafiles.manifest_digest(files)
    assert before == datafiles.manifest_digest(files)
    _write(tmp_path / "a.parquet", text=["a much longer value"])
    assert datafiles.manifest_digest(files) != before


def test_quickstart_data_has_the_promised_shape(quickstart_data):
    train = pq.read_table(datafiles.resolve_parquet_files(quickstart_data["train"], key="k")[0])
    labels = train.column("label").to_pylist()
    assert set(labels) == {0, 1} and abs(sum(labels) - len(labels) / 2) <= 1
    from raypipe.data.synthetic import NEGATIVE, POSITIVE, SEEN_FRACTION

    k = int(len(POSITIVE) * SEEN_FRACTION)
    unseen = set(POSITIVE[k:] + NEGATIVE[k:])
    words = {w for t in train.column("text").to_pylist() for w in t.split()}
    assert not words & unseen  # the labeled train split only shows the "seen" adjectives
    sample = datafiles.read_column_sample(
        datafiles.resolve_parquet_files(quickstart_data["unlabeled"], key="k"), "text", 500
    )
    assert len(sample) == 500 and {w for t in sample for w in t.split()} & unseen


def test_the_tokenizer_sample_spans_every_listed_source(tmp_path):
    """A general corpus listed before the task's own text: the sample (tokenizer.sample_rows)
    holds both, in proportion to their rows, not only the first source's."""
    big, small = tmp_path / "big.parquet", tmp_path / "small.parquet"
    pq.write_table(pa.table({"text": [f"general {i}" for i in range(900)]}), big)
    pq.write_table(pa.table({"text": [f"task {i}" for i in range(100)]}), small)
    sample = datafiles.read_column_sample([str(big), str(small)], "text", 100)
    assert len(sample) == 100
    assert sum(s.startswith("task") for s in sample) == 10  # 100 of 1,000 rows
    assert datafiles.read_column_sample([str(small)], "text", 500) == [
        f"task {i}" for i in range(100)
    ]
