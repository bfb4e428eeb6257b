"""`raypipe prepare table` on the layouts public labeled datasets come in, run as the command
a user types: every input row is written or counted as skipped, labels mean the same in every
split, and the encoding is the file's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from raypipe.data.labels import FOOTER_KEY


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raypipe", "prepare", *args], capture_output=True, text=True,
        cwd=cwd,
    )  # fmt: skip


def rows(path: Path) -> dict:
    return pq.read_table(sorted(path.glob("*.parquet"))).to_pydict()


def footer(path: Path) -> set[str]:
    return {pq.read_schema(f).metadata[FOOTER_KEY].decode() for f in sorted(path.glob("*.parquet"))}


def test_a_tsv_with_an_unclosed_quote_keeps_every_row(tmp_path):
    texts = ['he said "call me', "are you there", 'a "quoted" word', "last one"]
    labels = ["ham", "spam", "ham", "ham"]
    lines = [f"{lab}\t{t}" for lab, t in zip(labels, texts, strict=True)] + ["ham\tone\ttab too"]
    (tmp_path / "sms.tsv").write_text("\n".join(lines) + "\n")
    done = cli("table", "sms.tsv", "--no-header", "--label-column", "1", "--text-column", "2",
               "--keep-order", "--out", "out", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = rows(tmp_path / "out")
    assert got["text"] == texts  # quote marks kept, nothing swallowed
    assert got["label"] == [0, 1, 0, 0]  # ham=0, spam=1
    # Five rows read: four written, the one with a third field skipped and named.
    assert "read 5 rows = 4 written + 1 skipped" in done.stdout, done.stdout
    assert "sms.tsv:5 (3 fields, expected 2)" in done.stdout


def test_splits_prepared_apart_share_one_label_map(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nx one\tENTY:cremat\ny two\tABBR:exp\n"
                                        "z three\tENTY:currency\n")  # fmt: skip
    (tmp_path / "test.tsv").write_text("sentence\tlabel\nq one\tENTY:currency\nq two\tHUM:ind\n")
    assert cli("table", "train.tsv", "--keep-order", "--out", "train", cwd=tmp_path).returncode == 0
    labels = json.loads((tmp_path / "train" / "labels.json").read_text())
    assert labels["ids"] == {"ABBR:exp": 0, "ENTY:cremat": 1, "ENTY:currency": 2}
    done = cli("table", "test.tsv", "--labels", "train/labels.json", "--keep-order",
               "--out", "test", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # ENTY:currency is 2 in both; HUM:ind was never seen in train: skipped and named.
    assert rows(tmp_path / "test") == {"text": ["q one"], "label": [2]}
    assert "read 2 rows = 1 written + 1 skipped" in done.stdout
    assert "label 'HUM:ind' is not in the label map" in done.stdout
    assert footer(tmp_path / "train") == footer(tmp_path / "test") == {labels["digest"]}

    # Prepared alone, test numbers its labels its own way, and its footer says so.
    assert cli("table", "test.tsv", "--out", "alone", cwd=tmp_path).returncode == 0
    assert footer(tmp_path / "alone") != footer(tmp_path / "train")


def test_all_splits_in_one_call_under_one_map(tmp_path):
    (tmp_path / "a.tsv").write_text("sentence\tlabel\nx\tb\ny\tc\n")
    (tmp_path / "b.tsv").write_text("sentence\tlabel\nz\ta\n")
    done = cli("table", "a.tsv", "--split", "test=b.tsv", "--keep-order", "--out", "ds",
               cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert rows(tmp_path / "ds" / "train")["label"] == [1, 2]  # a=0 (seen in test only), b, c
    assert rows(tmp_path / "ds" / "test")["label"] == [0]
    assert footer(tmp_path / "ds" / "train") == footer(tmp_path / "ds" / "test")
    # The earlier output, with its split folders and labels.json, is replaceable.
    again = cli("table", "a.tsv", "--split", "test=b.tsv", "--out", "ds", "--overwrite",
                cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr


def test_latin1_lines_with_labels_first_round_trip(tmp_path):
    # TREC's layout: `COARSE:fine question`, latin-1.
    text = "DESC:manner How did serfdom develop in Russia ?\nHUM:ind Who was Pelé ?\n"
    (tmp_path / "trec.label").write_bytes(text.encode("latin-1"))
    plain = cli("table", "trec.label", "--format", "lines", "--out", "u", cwd=tmp_path)
    assert "not UTF-8" in plain.stdout and "--encoding latin-1" in plain.stdout, plain.stdout
    done = cli("table", "trec.label", "--format", "lines", "--encoding", "latin-1",
               "--keep-order", "--out", "t", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert rows(tmp_path / "t") == {
        "text": ["How did serfdom develop in Russia ?", "Who was Pelé ?"], "label": [0, 1],
    }  # fmt: skip
    assert "labels: 0=DESC:manner, 1=HUM:ind" in done.stdout


def test_latin1_text_for_pretraining(tmp_path):
    (tmp_path / "a.txt").write_bytes("un café crème\nà bientôt\n".encode("latin-1"))
    plain = cli("text", "a.txt", "--out", "u", cwd=tmp_path)  # every line is lost, and said
    assert plain.returncode == 2 and "--encoding latin-1" in plain.stderr, plain.stderr
    done = cli("text", "a.txt", "--encoding", "latin-1", "--out", "t", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert rows(tmp_path / "t") == {"text": ["un café crème", "à bientôt"]}
    assert "read 2 rows = 2 written + 0 skipped" in done.stdout


def test_a_headerless_csv_with_two_text_columns_and_labels_from_one(tmp_path):
    # AG News: "label","title","description", labels 1-4, quoted fields with commas.
    (tmp_path / "ag.csv").write_text(
        '"3","Wall St. Bears","Short-sellers, once again"\n"1","Talks","Leaders meet"\n'
        '"4","Chips","A faster chip, soon"\n"9","Odd","A label outside the map"\n'
    )
    common = ["--no-header", "--label-column", "1", "--text-column", "2,3", "--keep-order"]
    done = cli("table", "ag.csv", *common, "--label-map", "shift", "--out", "s", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    got = rows(tmp_path / "s")
    assert got["text"][0] == "Wall St. Bears Short-sellers, once again"
    assert got["label"] == [2, 0, 3, 8]  # shifted to start at 0
    mapped = cli("table", "ag.csv", *common, "--label-map", "1:0,2:1,3:2,4:3", "--out", "m",
                 cwd=tmp_path)  # fmt: skip
    assert rows(tmp_path / "m")["label"] == [2, 0, 3]
    assert "read 4 rows = 3 written + 1 skipped" in mapped.stdout, mapped.stdout
    assert "ag.csv:4 (label '9' is not in the label map)" in mapped.stdout


def test_labels_from_file_names_html_cleaning_and_globs(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "rt.pos").write_bytes(b"a charming <br />film &amp; a joy\nsimply   great\n")
    (raw / "rt.neg").write_bytes(b"dull, dull, dull\n\n")
    done = cli("table", "--label-from-file", "pos=raw/rt.pos", "neg=raw/rt.neg", "--clean",
               "--keep-order", "--out", "mr", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert rows(tmp_path / "mr") == {
        "text": ["a charming film & a joy", "simply great", "dull, dull, dull"],
        "label": [1, 1, 0],  # neg=0, pos=1
    }
    # A folder or a glob of tables, as a pipeline's paths; a prepare's own files are skipped.
    (raw / "t1.tsv").write_text("sentence\tlabel\nx\t0\n")
    (raw / "t2.tsv").write_text("sentence\tlabel\ny\t1\n")
    (raw / "prepare.json").write_text("{}")
    for given in ("raw", "raw/*.tsv"):
        out = "o" + str(len(given))
        done = cli("table", given, "--keep-order", "--out", out, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert rows(tmp_path / out) == {"text": ["x", "y"], "label": [0, 1]}


def test_layout_mistakes_are_one_line(tmp_path):
    (tmp_path / "t.tsv").write_text("a\tb\n")
    for args, expected in [
        (["--encoding", "klingon"], "not an encoding"),
        (["--no-header", "--text-column", "text"], "numbers counted from 1"),
        (["--text-column", "body"], "has no column 'body'"),
        (["--label-map", "1-0"], "is not RAW:ID"),
        (["--labels", "nowhere.json"], "does not exist"),
        (["--split", "train=t.tsv"], "other than 'train'"),
    ]:
        done = cli("table", "t.tsv", *args, "--out", "x", cwd=tmp_path)
        err = done.stderr.strip()
        assert done.returncode == 2 and len(err.splitlines()) == 1, err
        assert expected in err and "Traceback" not in err, err


def test_seeded_validation_and_test_splits_are_disjoint(tmp_path):
    (tmp_path / "a.pos").write_text("".join(f"good {i}\n" for i in range(50)))
    (tmp_path / "a.neg").write_text("".join(f"bad {i}\n" for i in range(50)))
    args = ["table", "--label-from-file", "pos=a.pos", "neg=a.neg", "--validation-fraction",
            "0.1", "--test-fraction", "0.2"]  # fmt: skip
    done = cli(*args, "--out", "s", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    split = {s: rows(tmp_path / "s" / s)["text"] for s in ("train", "validation", "test")}
    assert [len(split[s]) for s in ("train", "validation", "test")] == [70, 10, 20]
    assert sorted(sum(split.values(), [])) == sorted([f"good {i}" for i in range(50)]
                                                     + [f"bad {i}" for i in range(50)])  # fmt: skip
    assert cli(*args, "--out", "again", cwd=tmp_path).returncode == 0  # seeded: the same rows
    assert rows(tmp_path / "again" / "test")["text"] == split["test"]
