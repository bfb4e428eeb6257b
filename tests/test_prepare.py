"""`raypipe prepare`: raw layouts -> Parquet shards, with unreadable inputs counted and named."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raypipe.data.prepare import prepare
from raypipe.errors import UserError

OPTS = {"shard_rows": 3}


def png(colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def read(path: Path) -> dict:
    return pq.read_table(sorted(path.glob("*.parquet"))).to_pydict()


def test_text_lines_paragraphs_files_and_gzip(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("first line\n\nsecond line\nthird\n")
    with gzip.open(raw / "b.txt.gz", "wt") as f:
        f.write("zipped one\nzipped two\n")
    (raw / "bad.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    rep = prepare("text", [str(raw)], out=str(tmp_path / "lines"), options=OPTS)
    assert read(tmp_path / "lines")["text"] == [
        "first line", "second line", "third", "zipped one", "zipped two",
    ]  # fmt: skip
    assert rep.rows == {"": 5} and len(rep.skipped) == 1 and "bad.txt" in rep.skipped[0]
    assert len(list((tmp_path / "lines").glob("*.parquet"))) == 2  # 3 rows a shard
    prepare("text", [str(raw / "a.txt")], out=str(tmp_path / "para"), options={"unit": "paragraph"})
    assert read(tmp_path / "para")["text"] == ["first line", "second line third"]


def test_table_tsv_with_string_labels_and_bad_rows(tmp_path):
    f = tmp_path / "t.tsv"
    f.write_text(
        "sentence\tlabel\r\ngood film\tpos\r\nbad film\tneg\r\nbroken row\r\n\tpos\r\nok\tpos\r\n"
    )
    rep = prepare("table", [str(f)], out=str(tmp_path / "out"), options={"shuffle": False})
    rows = read(tmp_path / "out")
    assert rows == {"text": ["good film", "bad film", "ok"], "label": [1, 0, 1]}
    assert rep.labels == ["neg", "pos"]
    assert len(rep.skipped) == 2 and "t.tsv:4" in rep.skipped[0]


def test_class_names_are_found_beside_the_shards_they_number(tmp_path):
    """What registration names a model's classes by: the labels.json whose digest the shards'
    footers carry (beside them, or above a split's folder); none for integer labels or a
    labels.json that is not the shards'."""
    from raypipe.data.files import label_names, resolve_parquet_files

    f = tmp_path / "t.csv"
    f.write_text("sentence,label\ngood film,pos\nbad film,neg\nok,pos\nmeh,neutral\n")
    prepare("table", [str(f)], out=str(tmp_path / "named"), options={"shuffle": False})
    files = resolve_parquet_files(str(tmp_path / "named"), key="k")
    assert label_names(files) == ["neg", "neutral", "pos"]
    v = tmp_path / "v.csv"
    v.write_text("sentence,label\nfine,pos\nawful,neg\n")
    prepare("table", [str(f)], out=str(tmp_path / "split"),
            options={"shuffle": False, "splits": {"validation": [str(v)]}})  # fmt: skip
    train = resolve_parquet_files(str(tmp_path / "split" / "train"), key="k")
    assert label_names(train) == ["neg", "neutral", "pos"]
    (tmp_path / "named" / "labels.json").write_text('{"ids": {"a": 0, "b": 1}}')
    assert label_names(files) is None  # not the map these shards were numbered by
    g = tmp_path / "ints.csv"
    g.write_text("sentence,label\ngood,1\nbad,0\n")
    prepare("table", [str(g)], out=str(tmp_path / "ints"), options={"shuffle": False})
    assert label_names(resolve_parquet_files(str(tmp_path / "ints"), key="k")) is None


def test_table_csv_jsonl_and_regression(tmp_path):
    c = tmp_path / "t.csv"
    c.write_text('text,score\n"a, quoted",0.5\nplain,-1\n')
    prepare("table", [str(c)], out=str(tmp_path / "c"),
            options={"text_column": "text", "label_column": "score", "regression": True})  # fmt: skip
    assert read(tmp_path / "c") == {"text": ["a, quoted", "plain"], "label": [0.5, -1.0]}
    j = tmp_path / "t.jsonl"
    j.write_text('{"text": "x", "label": 2}\nnot json\n{"text": "y", "label": 0}\n')
    rep = prepare("table", [str(j)], out=str(tmp_path / "j"),
                  options={"text_column": "text"})  # fmt: skip
    assert read(tmp_path / "j") == {"text": ["x", "y"], "label": [2, 0]}
    assert rep.skipped == [f"{j}:2 (not JSON)"]
    with pytest.raises(UserError, match="--text-column"):
        prepare("table", [str(j)], out=str(tmp_path / "k"), options={"text_column": "nope"})


@pytest.mark.parametrize("as_zip", [False, True])
def test_image_folder_tree_or_zip(tmp_path, as_zip):
    files = {"train/cat/1.png": png(), "train/dog/2.png": png((0, 0, 200)),
             "train/dog/3.png": b"not an image", "train/cat/4.png": png()}  # fmt: skip
    if as_zip:
        src = tmp_path / "imgs.zip"
        with zipfile.ZipFile(src, "w") as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        src = tmp_path / "imgs"
        for name, data in files.items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(data)
    rep = prepare("images", [str(src)], out=str(tmp_path / "out"), options={"shuffle": False})
    rows = read(tmp_path / "out")
    assert rows["label"] == [0, 0, 1] and rep.labels == ["cat", "dog"]
    assert rows["path"] == ["train/cat/1.png", "train/cat/4.png", "train/dog/2.png"]
    assert Image.open(io.BytesIO(rows["image"][2])).getpixel((0, 0)) == (0, 0, 200)
    assert len(rep.skipped) == 1 and "3.png" in rep.skipped[0]


def test_image_classes_by_a_label_map(tmp_path):
    """--label-map on images: class folders -> ids (two folders sharing one), a folder the map
    leaves out skipped and named, the map written beside the shards; 'shift' refused."""
    src = tmp_path / "imgs"
    for name in ("car/1.png", "truck/2.png", "cat/3.png", "bird/4.png"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(png())
    rep = prepare("images", [str(src)], out=str(tmp_path / "out"),
                  options={"shuffle": False, "label_map": "car:1,truck:1,cat:0"})  # fmt: skip
    rows = read(tmp_path / "out")
    assert dict(zip(rows["path"], rows["label"], strict=True)) == {
        "car/1.png": 1, "truck/2.png": 1, "cat/3.png": 0
    }  # fmt: skip
    assert rep.labels == ["cat", "car|truck"]
    assert len(rep.skipped) == 1 and "bird" in rep.skipped[0]
    assert json.loads((tmp_path / "out" / "labels.json").read_text())["ids"]["truck"] == 1
    with pytest.raises(UserError, match="folder names"):
        prepare("images", [str(src)], out=str(tmp_path / "s"), options={"label_map": "shift"})


def test_captions_csv_and_flickr_format_with_holdout_by_image(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(10):
        (imgs / f"{i}.jpg").write_bytes(png((i * 20, 0, 0)))
    (imgs / "bad.jpg").write_bytes(b"broken")
    lines = [f"{i}.jpg#{k}\tcaption {i} {k}" for i in range(10) for k in range(2)]
    lines += ["missing.jpg#0\tgone", "bad.jpg#0\tbroken image"]
    token = tmp_path / "Flickr.token.txt"
    token.write_text("\n".join(lines) + "\n")
    rep = prepare("captions", [str(imgs), str(token)], out=str(tmp_path / "out"),
                  options={"validation_fraction": 0.2})  # fmt: skip
    train, val = read(tmp_path / "out" / "train"), read(tmp_path / "out" / "validation")
    assert rep.rows == {"train": 16, "validation": 4}
    assert not set(train["path"]) & set(val["path"])  # an image's captions stay together
    assert sorted(rep.skipped) == sorted(["bad.jpg (UnidentifiedImageError)",
                                          f"missing.jpg (captioned, not in {imgs})"])  # fmt: skip
    csv_file = tmp_path / "caps.csv"
    csv_file.write_text('image,caption\n0.jpg,a red thing\n1.jpg,"another, one"\n')
    prepare("captions", [str(imgs), str(csv_file)], out=str(tmp_path / "csv"),
            options={"shuffle": False})  # fmt: skip
    assert read(tmp_path / "csv")["caption"] == ["a red thing", "another, one"]


def test_class_sorted_inputs_are_shuffled_reproducibly(tmp_path):
    src = tmp_path / "imgs"
    for cls in ("a", "b", "c"):
        for i in range(10):
            (src / cls).mkdir(parents=True, exist_ok=True)
            (src / cls / f"{i}.png").write_bytes(png())
    labels = []
    for run in ("x", "y"):
        prepare("images", [str(src)], out=str(tmp_path / run), options={"seed": 3})
        labels.append(read(tmp_path / run)["label"])
    assert labels[0] == labels[1]  # seeded
    assert sorted(labels[0]) == [0] * 10 + [1] * 10 + [2] * 10  # a permutation
    assert labels[0][:10] != [0] * 10  # no longer one class after another


def test_parallel_files_must_align(tmp_path):
    (tmp_path / "s.txt").write_text("one\ntwo\n\nfour\n")
    with gzip.open(tmp_path / "t.txt.gz", "wt") as f:
        f.write("un\ndeux\ntrois\nquatre\n")
    rep = prepare("parallel", [str(tmp_path / "s.txt"), str(tmp_path / "t.txt.gz")],
                  out=str(tmp_path / "out"), options={})  # fmt: skip
    assert read(tmp_path / "out") == {
        "text": ["one", "two", "four"],
        "target": ["un", "deux", "quatre"],
    }
    assert rep.skipped == ["line 3 (empty side)"]
    (tmp_path / "short.txt").write_text("one\n")
    with pytest.raises(UserError, match="line-aligned"):
        prepare("parallel", [str(tmp_path / "short.txt"), str(tmp_path / "t.txt.gz")],
                out=str(tmp_path / "x"), options={})  # fmt: skip


def test_cli_shuffle_flag_mixes_text_corpora(tmp_path):
    (tmp_path / "en.txt").write_text("".join(f"en {i}\n" for i in range(20)))
    (tmp_path / "de.txt").write_text("".join(f"de {i}\n" for i in range(20)))
    cmd = [sys.executable, "-m", "raypipe", "prepare", "text", str(tmp_path / "en.txt"),
           str(tmp_path / "de.txt"), "--shuffle", "--out", str(tmp_path / "out")]  # fmt: skip
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    rows = read(tmp_path / "out")["text"]
    assert sorted(rows) == sorted([f"en {i}" for i in range(20)] + [f"de {i}" for i in range(20)])
    assert {r[:2] for r in rows[:20]} == {"en", "de"}  # no longer one language then the other


def test_cli_reports_rows_and_never_overwrites(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n")
    cmd = [sys.executable, "-m", "raypipe", "prepare", "text", str(tmp_path / "a.txt"),
           "--out", str(tmp_path / "out")]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0 and "wrote 2 rows" in first.stdout
    before = (tmp_path / "out" / "part-00000.parquet").read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert (tmp_path / "out" / "part-00000.parquet").read_bytes() == before
    missing = subprocess.run(cmd[:5] + [str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o2")],
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr + again.stderr


def test_label_subsets_are_stratified_seeded_and_ordered(tmp_path):
    from raypipe.data.files import label_subset

    # 3 classes of 100, 50 and 10 rows over two shards.
    labels = [0] * 100 + [1] * 50 + [2] * 10
    for i, part in enumerate((slice(0, 80), slice(80, None))):
        rows = list(range(160))[part]
        pq.write_table(
            pa.table({"text": [f"row {r}" for r in rows], "label": [labels[r] for r in rows]}),
            tmp_path / f"part-{i}.parquet",
        )
    files = [str(tmp_path / "part-0.parquet"), str(tmp_path / "part-1.parquet")]

    def subset(fraction, seed=0, stratify_by="label", out="s"):
        (path,) = label_subset(
            files, fraction=fraction, seed=seed, stratify_by=stratify_by, out=str(tmp_path / out)
        )
        return pq.read_table(path).to_pydict()

    tenth = subset(0.1)
    assert [tenth["label"].count(c) for c in (0, 1, 2)] == [10, 5, 1]
    rows = [int(t.split()[1]) for t in tenth["text"]]
    assert rows == sorted(rows) and all(
        labels[r] == y for r, y in zip(rows, tenth["label"], strict=True)
    )
    assert subset(0.1, out="again") == tenth  # seeded: the same rows every time
    assert subset(0.1, seed=1, out="other") != tenth
    assert [subset(0.01)["label"].count(c) for c in (0, 1, 2)] == [1, 1, 1]  # one per class
    assert len(subset(0.25, stratify_by=None, out="plain")["text"]) == 40
    assert len(subset(1.0)["text"]) == 160
