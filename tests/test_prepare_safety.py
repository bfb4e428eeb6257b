"""`raypipe prepare` off the happy path: it never deletes what it did not write, never leaves
a half-written output, honours the umask, and turns damaged or oversized inputs into counted,
named skips (or one line and exit 2), never a traceback or a MemoryError."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from raypipe.data import prepare_io, vision
from raypipe.data.prepare import prepare
from raypipe.errors import UserError


def cli(*args: str, cwd: Path, umask: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raypipe", "prepare", *args],
        capture_output=True, text=True, cwd=cwd,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )  # fmt: skip


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def rows(path: Path) -> dict:
    return pq.read_table(sorted(path.glob("*.parquet"))).to_pydict()


def refused(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    for word in words:
        assert word in result.stderr, result.stderr


# --- nothing deleted ----------------------------------------------------------------------------


def test_overwrite_never_empties_the_current_directory(tmp_path):
    (tmp_path / "corpus.txt").write_text("one\ntwo\n")
    (tmp_path / "notes.md").write_text("mine")
    before = tree(tmp_path)
    refused(
        cli("text", "corpus.txt", "--out", ".", "--overwrite", cwd=tmp_path), "current directory"
    )
    assert tree(tmp_path) == before


def test_overwrite_never_deletes_an_input_inside_out(tmp_path):
    (tmp_path / "work" / "raw").mkdir(parents=True)
    (tmp_path / "work" / "raw" / "corpus.txt").write_text("one\ntwo\n")
    (tmp_path / "work" / "sibling.txt").write_text("keep me")
    before = tree(tmp_path)
    result = cli("text", "work/raw/corpus.txt", "--out", "work", "--overwrite", cwd=tmp_path)
    refused(result, "holds the input")
    assert tree(tmp_path) == before


def test_overwrite_replaces_only_an_earlier_prepare_output(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "b.txt").write_text("three\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("x")  # not written by prepare
    refused(cli("text", "a.txt", "--out", "mine", "--overwrite", cwd=tmp_path), "prepare.json")
    assert (tmp_path / "mine" / "data.csv").read_text() == "x"

    assert cli("text", "a.txt", "--out", "out", cwd=tmp_path).returncode == 0
    again = cli("text", "b.txt", "--out", "out", "--overwrite", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert rows(tmp_path / "out")["text"] == ["three"]
    (tmp_path / "out" / "README").write_text("a user's file, added later")
    refused(cli("text", "a.txt", "--out", "out", "--overwrite", cwd=tmp_path), "README")
    assert rows(tmp_path / "out")["text"] == ["three"]


def test_the_old_output_stays_until_the_new_one_is_complete(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("old\n")
    (tmp_path / "b.txt").write_text("new\n")
    prepare("text", [str(tmp_path / "a.txt")], out=str(tmp_path / "out"), options={})
    before = tree(tmp_path / "out")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare_io, "write_split", fail)
    with pytest.raises(UserError, match="No space left"):
        prepare("text", [str(tmp_path / "b.txt")], out=str(tmp_path / "out"),
                options={"overwrite": True})  # fmt: skip
    assert tree(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "out"]  # no temp left


@pytest.mark.parametrize(
    "out, word",
    [("a.txt/sub", "under the file"), ("a.txt", "is a file"), ("/proc/raypipe-out", "")],
)
def test_a_bad_out_is_one_line(tmp_path, out, word):
    (tmp_path / "a.txt").write_text("one\n")
    refused(cli("text", "a.txt", "--out", out, cwd=tmp_path), word)
    assert (tmp_path / "a.txt").read_text() == "one\n"


def test_outputs_honour_the_umask(tmp_path):
    from raypipe import storage
    from raypipe.engine.checkpoint import save_checkpoint
    from tests.test_checkpoint import SPEC, _model

    (tmp_path / "a.txt").write_text("one\n")
    assert cli("text", "a.txt", "--out", "out", cwd=tmp_path, umask=0o022).returncode == 0
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "prepare.json").stat().st_mode) == 0o644
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "ckpt", module=_model(), spec=SPEC, meta={})
        storage.write_text(str(tmp_path / "marker.json"), "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "ckpt" / "model.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "marker.json").stat().st_mode) == 0o640


# --- damaged and oversized inputs ---------------------------------------------------------------


def test_a_truncated_gzip_keeps_its_rows_and_is_named(tmp_path):
    body = "sentence\tlabel\n" + "".join(f"row number {i}\t{i % 2}\n" for i in range(3000))
    whole = gzip.compress(body.encode())
    (tmp_path / "cut.tsv.gz").write_bytes(whole[: len(whole) // 2])
    result = cli("table", "cut.tsv.gz", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipped 1 unreadable input(s): cut.tsv.gz (unreadable after line" in result.stdout
    got = rows(tmp_path / "out")["text"]
    assert 0 < len(got) < 3000 and set(got) <= {f"row number {i}" for i in range(3000)}
    (tmp_path / "t.txt").write_text("a\n")
    (tmp_path / "s.txt.gz").write_bytes(gzip.compress(b"a\n" * 5000)[:40])
    refused(cli("parallel", "s.txt.gz", "t.txt", "--out", "p", cwd=tmp_path), "s.txt.gz")


def test_lines_that_are_not_utf8_are_counted_not_fatal(tmp_path):
    (tmp_path / "t.tsv").write_bytes(
        b"sentence\tlabel\ngood one\t1\nbad \xe9 latin-1\t0\nfine\t0\n"
    )
    (tmp_path / "imgs").mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    (tmp_path / "imgs" / "a.png").write_bytes(buf.getvalue())
    (tmp_path / "caps.csv").write_bytes(b"image,caption\na.png,a red square\na.png,caf\xe9\n")
    table = cli("table", "t.tsv", "--out", "t", "--keep-order", cwd=tmp_path)
    assert table.returncode == 0 and "t.tsv:3 (not UTF-8)" in table.stdout, table.stdout
    assert rows(tmp_path / "t")["text"] == ["good one", "fine"]
    caps = cli("captions", "imgs", "caps.csv", "--out", "c", cwd=tmp_path)
    assert caps.returncode == 0 and "caps.csv:3 (not UTF-8)" in caps.stdout, caps.stdout
    assert rows(tmp_path / "c")["caption"] == ["a red square"]
    (tmp_path / "u.txt").write_text("hello\n", encoding="utf-16")
    refused(cli("text", "u.txt", "--out", "u", cwd=tmp_path), "no readable rows", "UTF-16")


def test_a_gzip_bomb_is_an_unreadable_input(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_io, "_EXPANSION_FLOOR", 2**20)
    (tmp_path / "bomb.txt.gz").write_bytes(gzip.compress(b"x\n" * 4_000_000))  # 8 MB from ~8 KB
    (tmp_path / "ok.txt").write_text("fine\n")
    out = prepare("text", [str(tmp_path / "bomb.txt.gz"), str(tmp_path / "ok.txt")],
                  out=str(tmp_path / "out"), options={})  # fmt: skip
    assert any("bomb.txt.gz" in s and "expands more than" in s for s in out.skipped), out.skipped
    assert rows(tmp_path / "out")["text"][-1] == "fine"
    assert sum(out.rows.values()) < 4_000_000  # stopped at the limit, not read to the end


def test_images_over_the_pixel_limit_are_unreadable(tmp_path, monkeypatch):
    monkeypatch.setattr(vision, "MAX_IMAGE_PIXELS", 63)
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    for name, side in (("small.png", 7), ("big.png", 8)):
        Image.new("RGB", (side, side)).save(tmp_path / "imgs" / "cat" / name)
    out = prepare("images", [str(tmp_path / "imgs")], out=str(tmp_path / "out"), options={})
    assert out.rows == {"": 1}
    assert out.skipped == ["cat/big.png (8x8 pixels, over the limit of 63)"]
    manifest = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert manifest["skipped"] == out.skipped and manifest["rows"] == {"": 1}
