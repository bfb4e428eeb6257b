"""`raypipe prepare`: common raw layouts -> Parquet shards raypipe reads.

Kinds (columns written):
    text      text files or folders of them (.gz too), a row per line / paragraph / file -> text
    table     TSV / CSV / JSONL / LABEL-text lines / a file per label (prepare_table.py)  -> text, label
    images    a folder tree or a zip of one, class = the image's parent folder         -> image, label, path
    captions  images plus a captions file (CSV image,caption or Flickr `img#k<TAB>caption`)
                                                                                         -> image, caption, path
    parallel  two line-aligned text files (source, target)                              -> text, target

Unreadable inputs (undecodable text, malformed rows, images Pillow cannot open, captions of
missing images) are counted and named, never fatal. Shards are written into a temporary
directory renamed into place, and an existing output is never overwritten unless asked.
"""

from __future__ import annotations

import csv
import glob
import itertools
import random
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from raypipe.data import prepare_table as table
from raypipe.data.labels import LABELS_FILE, LabelMap, parse_label_map, read_label_map
from raypipe.data.prepare_io import MANIFEST, Skipped, check_output, text_lines, write_output
from raypipe.errors import UserError

TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".txt")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TEXT_SUFFIXES = {".txt", ".text", ".md", ".gz"}
MAX_IMAGE_BYTES = 256 * 2**20  # an encoded image file; its pixels are bounded on decoding


@dataclass
class PrepareOutcome:
    rows: dict[str, int] = field(default_factory=dict)
    skipped: Skipped = field(default_factory=Skipped)
    labels: list[str] | None = None
    label_map: LabelMap | None = None

    def describe(self, out: Path) -> str:
        written = ", ".join(
            f"{n} rows to {out / s}" if s else f"{n} rows to {out}" for s, n in self.rows.items()
        )
        total = sum(self.rows.values())
        lines = [
            f"read {total + self.skipped.rows} rows = {total} written + "
            f"{self.skipped.rows} skipped",
            f"wrote {written}",
        ]
        if self.labels is not None:
            lines.append(
                "labels: " + ", ".join(f"{i}={name}" for i, name in enumerate(self.labels))
            )
        if self.label_map is not None:
            lines.append(f"label map: {out / LABELS_FILE} (digest {self.label_map.digest})")
        if self.skipped:
            shown = "; ".join(self.skipped[:10])
            more = f" (and {len(self.skipped) - 10} more)" if len(self.skipped) > 10 else ""
            lines.append(f"skipped {len(self.skipped)} unreadable input(s): {shown}{more}")
        if any("(not UTF-8)" in s for s in self.skipped):
            lines.append(
                "some lines are not UTF-8: if the files are latin-1 (or Windows cp1252), "
                "prepare them again with --encoding latin-1"
            )
        return "\n".join(lines)


def _existing(paths: list[str], what: str) -> list[Path]:
    """The inputs as a pipeline's paths are read: files, folders, globs (`data/*.tsv`,
    `data/**/*.txt`); a table folder is the table files in it (not a prepare's own files)."""
    out: list[Path] = []
    for given in paths:
        if set("*?[") & set(given):
            found = sorted(Path(p) for p in glob.glob(given, recursive=True) if Path(p).is_file())
            if not found:
                raise UserError(f"prepare {what}: no files match '{given}'; check the pattern")
            out.extend(found)
            continue
        p = Path(given)
        if not p.exists():
            raise UserError(f"prepare {what}: input '{p}' does not exist")
        if what == "table" and p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _is_table_file(f))
            if not found:
                raise UserError(
                    f"prepare table: folder '{p}' holds no table files ({TABLE_SUFFIXES})"
                )
            out.extend(found)
            continue
        out.append(p)
    return out


def _is_table_file(f: Path) -> bool:
    name = f.name.removesuffix(".gz")
    return f.name not in (MANIFEST, LABELS_FILE) and Path(name).suffix in TABLE_SUFFIXES


# --- writing ------------------------------------------------------------------------------------


def _shuffled(rows: dict[str, list], group: list | None, seed: int):
    # Raw layouts are often sorted by class (a folder per class): streamed in that order,
    # every batch would hold one class. A seeded shuffle keeps runs reproducible.
    order = list(range(len(next(iter(rows.values())))))
    random.Random(seed).shuffle(order)
    rows = {k: [v[i] for i in order] for k, v in rows.items()}
    return rows, [group[i] for i in order] if group is not None else None


def _splits(rows: dict[str, list], group: list | None, fractions: dict[str, float], seed: int):
    """{"": rows}, or {"train": ..., "validation": ..., "test": ...} holding out each split's
    fraction (> 0) of the groups (an image's captions stay together), seeded."""
    fractions = {s: f for s, f in fractions.items() if f > 0}
    if not fractions:
        return {"": rows}
    n = len(next(iter(rows.values())))
    keys = group if group is not None else list(range(n))
    unique = sorted(set(keys), key=str)
    random.Random(seed).shuffle(unique)
    split_of, start = {}, 0
    for split, fraction in fractions.items():
        take = max(1, int(round(len(unique) * fraction)))
        split_of.update((k, split) for k in unique[start : start + take])
        start += take
    names = ["train", *fractions]
    return {
        split: {k: [v[i] for i in range(n) if split_of.get(keys[i], "train") == split]
                for k, v in rows.items()}
        for split in names
    }  # fmt: skip


def _write(out: Path, rows: dict[str, list], outcome: PrepareOutcome, *, options: dict,
           group: list | None, shuffle: bool, manifest: dict,
           extra: dict[str, dict[str, list]] | None = None) -> None:  # fmt: skip
    """Write `rows` to `out` (or to out/train and out/validation; to out/train when `extra`
    splits go beside it), atomically."""
    if not next(iter(rows.values())):
        raise UserError(
            f"prepare: no readable rows found ({len(outcome.skipped)} unreadable input(s)"
            + (f", e.g. {outcome.skipped[0]}" if outcome.skipped else "")
            + "); check the input paths and format"
            + ("; the lines are not UTF-8: for latin-1 files pass --encoding latin-1"
               if any("(not UTF-8)" in s for s in outcome.skipped) else "")
        )  # fmt: skip
    seed = options.get("seed", 0)
    if shuffle:
        rows, group = _shuffled(rows, group, seed)
    held = {"validation": options.get("validation_fraction", 0.0),
            "test": options.get("test_fraction", 0.0)}  # fmt: skip
    splits = _splits(rows, group, held, seed)
    if extra:
        splits = {"train": splits.pop(""), **splits} if "" in splits else splits
        for name, more in extra.items():
            if not more["text"]:
                raise UserError(f"prepare: no readable rows for --split {name}")
            splits[name] = _shuffled(more, None, seed)[0] if shuffle else more
    labels = outcome.label_map
    manifest = {**manifest, "labels": outcome.labels, "skipped": list(outcome.skipped),
                "skipped_rows": outcome.skipped.rows}  # fmt: skip
    outcome.rows = write_output(
        out, splits, manifest, shard_rows=options.get("shard_rows", 10_000),
        labels=None if labels is None else (labels.digest, labels.to_json()),
    )  # fmt: skip


# --- readers ------------------------------------------------------------------------------------


def _text_files(inputs: list[Path]) -> Iterator[Path]:
    for p in inputs:
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        else:
            yield p


def read_text(inputs: list[Path], unit: str, outcome: PrepareOutcome, *,
              encoding: str = "utf-8", clean: bool = False) -> dict[str, list]:  # fmt: skip
    texts: list[str] = []
    for f in _text_files(inputs):
        lines = [line for _, line in text_lines(f, outcome.skipped, encoding=encoding)]
        if clean:
            lines = [table.clean_text(line) for line in lines]
        if unit == "file":
            parts = ["\n".join(lines)]
        elif unit == "paragraph":
            parts = [" ".join(p.split()) for p in "\n".join(lines).split("\n\n")]
        else:
            parts = lines
        texts.extend(p.strip() for p in parts if p.strip())
    return {"text": texts}


def _check_image(data: bytes) -> str | None:
    from raypipe.data.vision import ImageTooLarge, open_image

    try:
        with open_image(data) as im:
            im.verify()
        return None
    except ImageTooLarge as e:
        return str(e)
    except Exception as e:  # Pillow raises many types for bad data
        return type(e).__name__


def _image_entries(source: Path) -> Iterator[tuple[str, bytes | str]]:
    """(relative path, bytes, or why they could not be read) of every image file in a folder
    tree or a zip of one."""
    if source.is_file():
        try:
            archive = zipfile.ZipFile(source)
        except zipfile.BadZipFile:
            raise UserError(
                f"prepare images: '{source}' is neither a folder nor a zip file"
            ) from None
        with archive:
            for info in sorted(archive.infolist(), key=lambda i: i.filename):
                if not info.is_dir() and Path(info.filename).suffix.lower() in IMAGE_SUFFIXES:
                    yield (
                        info.filename,
                        _read_bounded(info.file_size, lambda i=info: archive.read(i)),
                    )
        return
    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        if f.suffix.lower() in IMAGE_SUFFIXES:
            yield str(f.relative_to(source)), _read_bounded(f.stat().st_size, f.read_bytes)


def _read_bounded(size: int, read) -> bytes | str:
    """`read()`, or why not: the file (a zip entry: its declared size) is over
    MAX_IMAGE_BYTES, or reading it failed."""
    if size > MAX_IMAGE_BYTES:
        return f"{size:,} bytes, over the limit of {MAX_IMAGE_BYTES:,}"
    try:
        return read()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return type(e).__name__


def _image_problem(data: bytes | str) -> str | None:
    """Why an image is unreadable (None: it decodes)."""
    return data if isinstance(data, str) else _check_image(data)


def read_images(
    source: Path, outcome: PrepareOutcome, given: LabelMap | None = None
) -> dict[str, list]:
    """Each image under a class folder, labelled by its folder: classes numbered by sorted
    name, or by `given` (`--label-map`/`--labels`: several folders may share an id; an image
    in a folder the map does not name is skipped)."""
    rows: dict[str, list] = {"image": [], "label": [], "path": []}
    for rel, data in _image_entries(source):
        problem = _image_problem(data)
        if problem:
            outcome.skipped.append(f"{rel} ({problem})")
            continue
        parts = Path(rel).parts
        if len(parts) < 2:
            outcome.skipped.append(f"{rel} (not inside a class folder)")
            continue
        if given is not None and given.id_of(parts[-2]) is None:
            outcome.skipped.append(f"{rel} (class '{parts[-2]}' is not in the label map)")
            continue
        rows["image"].append(data)
        rows["label"].append(parts[-2])
        rows["path"].append(rel)
    if given is not None:
        rows["label"] = [given.id_of(c) for c in rows["label"]]
        outcome.label_map, outcome.labels = given, given.names()
        return rows
    classes = sorted(set(rows["label"]))
    index = {c: i for i, c in enumerate(classes)}
    rows["label"] = [index[c] for c in rows["label"]]
    outcome.labels = classes
    return rows


def _caption_rows(path: Path, outcome: PrepareOutcome) -> Iterator[tuple[str, str]]:
    lines = text_lines(path, outcome.skipped)
    first = next(lines, (1, ""))
    if "\t" in first[1]:  # Flickr: image.jpg#k<TAB>caption, no header
        for i, line in itertools.chain([first], lines):
            name, sep, caption = line.partition("\t")
            if not sep or not caption.strip():
                outcome.skipped.append(f"{path}:{i} (no caption)")
                continue
            yield name.split("#", 1)[0], caption.strip()
        return
    header = next(csv.reader([first[1]]), [])
    if [h.strip() for h in header][:2] != ["image", "caption"]:
        raise UserError(
            f"prepare captions: '{path}' must be CSV with header 'image,caption' or Flickr's "
            "'image.jpg#k<TAB>caption' lines"
        )
    reader = csv.reader(line + "\n" for _, line in lines)
    for values in reader:
        if len(values) < 2 or not values[1].strip():
            outcome.skipped.append(f"{path}:{reader.line_num + 1} (no caption)")
            continue
        yield values[0].strip(), values[1].strip()


def read_captions(images: Path, captions: Path, outcome: PrepareOutcome) -> dict[str, list]:
    rows: dict[str, list] = {"image": [], "caption": [], "path": []}
    cache: dict[str, bytes | None] = {}
    missing: set[str] = set()
    for name, caption in _caption_rows(captions, outcome):
        if name not in cache:
            f = images / name
            if not f.is_file():
                cache[name] = None
                missing.add(name)
            else:
                data = _read_bounded(f.stat().st_size, f.read_bytes)
                problem = _image_problem(data)
                if problem:
                    outcome.skipped.append(f"{name} ({problem})")
                cache[name] = None if problem else data
        if cache[name] is None:
            continue
        rows["image"].append(cache[name])
        rows["caption"].append(caption)
        rows["path"].append(name)
    outcome.skipped.extend(f"{name} (captioned, not in {images})" for name in sorted(missing))
    return rows


def _aligned_lines(path: Path, outcome: PrepareOutcome) -> list[str]:
    """Every line of `path` by position ("" where one is not UTF-8), trailing blanks dropped."""
    found = dict(text_lines(path, outcome.skipped, whole=True))
    lines = [found.get(i, "") for i in range(1, max(found, default=0) + 1)]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def read_parallel(source: Path, target: Path, outcome: PrepareOutcome) -> dict[str, list]:
    src, tgt = _aligned_lines(source, outcome), _aligned_lines(target, outcome)
    if len(src) != len(tgt):
        raise UserError(
            f"prepare parallel: '{source}' has {len(src)} lines but '{target}' has {len(tgt)}; "
            "the files must be line-aligned"
        )
    rows: dict[str, list] = {"text": [], "target": []}
    for i, (s, t) in enumerate(zip(src, tgt, strict=True), start=1):
        if not s.strip() or not t.strip():
            outcome.skipped.append(f"line {i} (empty side)")
            continue
        rows["text"].append(s.strip())
        rows["target"].append(t.strip())
    return rows


def prepare(kind: str, inputs: list[str], *, out: str, options: dict) -> PrepareOutcome:
    """Run one kind of preparation; returns what was written and skipped."""
    outcome = PrepareOutcome()
    paths = _existing(inputs, kind)
    also = [Path(f) for f in (options.get("label_files") or {}).values()] + [
        f for more in (options.get("splits") or {}).values() for f in _existing(more, kind)
    ]
    if not paths and not (kind == "table" and options.get("label_files")):
        raise UserError(f"prepare {kind}: give the input files or folders")
    for f in also:
        if not f.is_file():
            raise UserError(f"prepare {kind}: input '{f}' does not exist or is not a file")
    # before reading
    check_output(Path(out), paths + also, overwrite=options.get("overwrite", False))
    extra = None
    if kind == "text":
        rows = read_text(paths, options.get("unit", "line"), outcome,
                         encoding=options.get("encoding", "utf-8"),
                         clean=options.get("clean", False))  # fmt: skip
    elif kind == "table":
        rows, extra = _read_tables(paths, options, outcome)
    elif kind == "images":
        if len(paths) != 1:
            raise UserError("prepare images: give one folder or zip")
        given = _given_labels(options)
        if given == "shift":
            raise UserError("prepare images: classes are folder names; --label-map shift "
                            "numbers whole numbers, give RAW:ID pairs")  # fmt: skip
        rows = read_images(paths[0], outcome, given)
    elif kind == "captions":
        if len(paths) != 2 or not paths[0].is_dir():
            raise UserError("prepare captions: give IMAGES_FOLDER CAPTIONS_FILE")
        rows = read_captions(paths[0], paths[1], outcome)
    elif kind == "parallel":
        if len(paths) != 2:
            raise UserError("prepare parallel: give SOURCE_FILE TARGET_FILE")
        rows = read_parallel(paths[0], paths[1], outcome)
    else:
        raise UserError(f"prepare: unknown kind '{kind}'")
    _write(
        Path(out), rows, outcome, options=options,
        group=rows.get("path") if kind == "captions" else None,
        # Text keeps its order (neighbouring lines are context); labeled and image rows shuffle.
        shuffle=options.get("shuffle", kind in ("table", "images", "captions")),
        manifest={"kind": kind, "inputs": [str(p) for p in paths], "options": options},
        extra=extra,
    )  # fmt: skip
    return outcome


def table_layout(options: dict) -> table.TableLayout:
    columns = options.get("text_column") or "sentence"
    return table.TableLayout(
        fmt=options.get("format", "auto"),
        header=options.get("header", True),
        text_columns=tuple(c.strip() for c in str(columns).split(",") if c.strip()),
        label_column=str(options.get("label_column") or "label"),
        separator=options.get("separator"),
        encoding=options.get("encoding", "utf-8"),
        clean=options.get("clean", False),
    )


def _given_labels(options: dict) -> LabelMap | str | None:
    """`--labels FILE` (an earlier prepare's map) or `--label-map SPEC`, if either."""
    file, spec = options.get("labels_file"), options.get("label_map")
    if file and spec:
        raise UserError("prepare: give --labels or --label-map, not both")
    if options.get("regression") and (file or spec):
        raise UserError("prepare: --regression labels are numbers; drop --labels / --label-map")
    return read_label_map(file) if file else parse_label_map(spec) if spec else None


def _read_tables(paths: list[Path], options: dict, outcome: PrepareOutcome):
    """The main inputs' rows and each `--split`'s, numbered by one label map."""
    layout = table_layout(options)
    given = _given_labels(options)  # a bad map is reported before any reading
    by_file = {name: Path(f) for name, f in (options.get("label_files") or {}).items()}
    main = table.read_labeled(paths, layout, outcome.skipped)
    if by_file:
        files = table.read_label_files(by_file, layout, outcome.skipped)
        main = table.Labeled(main.where + files.where, main.texts + files.texts,
                             main.raw + files.raw)  # fmt: skip
    extra = {
        name: table.read_labeled(_existing(inputs, "table"), layout, outcome.skipped)
        for name, inputs in (options.get("splits") or {}).items()
    }
    numbered, labels = table.label_dataset(
        {"": main, **extra}, given,
        regression=options.get("regression", False), skipped=outcome.skipped,
    )  # fmt: skip
    outcome.label_map = labels
    outcome.labels = labels.names() if labels is not None else None
    return numbered.pop(""), numbered
