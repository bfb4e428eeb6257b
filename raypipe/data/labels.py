"""One label map per dataset: which id each raw label of a classification table becomes.

`prepare` writes it beside the shards as `labels.json` and stamps its digest into every
shard's footer (Parquet key-value metadata `raypipe.labels`), so that splits prepared apart
are checked, before a run starts, to number their labels alike.

A map is one of:
    identity   integer labels kept as they are (the digest is "identity")
    names      raw label -> id, from the labels' sorted names, `--label-map RAW:ID,...`,
               `--label-map shift` (integers moved to start at 0), or an earlier labels.json
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from raypipe.errors import UserError

LABELS_FILE = "labels.json"
FOOTER_KEY = b"raypipe.labels"
IDENTITY = "identity"


@dataclass(frozen=True)
class LabelMap:
    ids: dict[str, int]  # raw label (as read, stripped) -> id; empty for identity
    identity: bool = False

    @property
    def digest(self) -> str:
        if self.identity:
            return IDENTITY
        blob = json.dumps(self.ids, sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def id_of(self, raw: str) -> int | None:
        """The id of a raw label (None: the map has no such label)."""
        if self.identity:
            return int(raw) if _is_count(raw) else None
        return self.ids.get(raw)

    def names(self) -> list[str] | None:
        """Each id's name (several raw labels may share an id: joined by '|')."""
        if self.identity:
            return None
        by_id: dict[int, list[str]] = {}
        for raw, i in self.ids.items():
            by_id.setdefault(i, []).append(raw)
        return ["|".join(by_id.get(i, ["(none)"])) for i in range(max(by_id, default=-1) + 1)]

    def to_json(self) -> str:
        body = {IDENTITY: True} if self.identity else {"ids": self.ids}
        return json.dumps({**body, "digest": self.digest}, indent=2, ensure_ascii=False)


def _is_count(raw: str) -> bool:
    return raw.isascii() and raw.isdigit()


def read_label_map(path: str) -> LabelMap:
    """An earlier prepare's labels.json (`--labels FILE`), checked."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"prepare: --labels '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"prepare: --labels '{path}' is not a labels.json ({e})") from None
    if isinstance(data, dict) and data.get(IDENTITY) is True:
        return LabelMap({}, identity=True)
    ids = data.get("ids") if isinstance(data, dict) else None
    if not isinstance(ids, dict) or not all(
        isinstance(k, str) and type(v) is int and v >= 0 for k, v in ids.items()
    ):
        raise UserError(
            f"prepare: --labels '{path}' is not a labels.json (want {{\"ids\": {{label: id}}}} as "
            "prepare writes it)"
        )
    return LabelMap(dict(ids))


def parse_label_map(spec: str) -> LabelMap | str:
    """`--label-map`: 'RAW:ID,RAW:ID,...' -> a LabelMap, or the word 'shift'."""
    if spec.strip() == "shift":
        return "shift"
    ids: dict[str, int] = {}
    for item in spec.split(","):
        raw, sep, value = item.rpartition(":")
        raw, value = raw.strip(), value.strip()
        if not sep or not raw or not _is_count(value):
            raise UserError(
                f"prepare: --label-map item {item.strip()!r} is not RAW:ID (ID a whole number "
                "from 0), e.g. --label-map '1:0,2:1'; or give --label-map shift"
            )
        if raw in ids:
            raise UserError(f"prepare: --label-map names the label {raw!r} twice")
        ids[raw] = int(value)
    return LabelMap(ids)


def build_label_map(raw_labels: list[str], given: LabelMap | str | None) -> LabelMap:
    """The map for a dataset whose labels (all splits together) are `raw_labels`: `given`
    (a map, or 'shift'), else identity for whole numbers, else ids by sorted name."""
    if isinstance(given, LabelMap):
        return given
    distinct = sorted(set(raw_labels))
    counts = all(_is_count(r) for r in distinct)
    if given == "shift":
        if not counts:
            bad = next(r for r in distinct if not _is_count(r))
            raise UserError(
                f"prepare: --label-map shift needs whole-number labels, found {bad!r}; "
                "give the map itself: --label-map 'RAW:0,RAW:1,...'"
            )
        low = min(int(r) for r in distinct)
        return LabelMap({r: int(r) - low for r in distinct})
    if counts:
        return LabelMap({}, identity=True)
    return LabelMap({r: i for i, r in enumerate(distinct)})
