"""What a pipeline run produced, and how the console shows it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from raypipe import tracking
from raypipe.errors import UserError


@dataclass
class StageOutcome:
    name: str
    status: str  # "done" or "reused"
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Summary:
    name: str
    run_id: str
    tracking_uri: str
    storage: str
    seconds: float = 0.0
    stages: list[StageOutcome] = field(default_factory=list)
    metric: str | None = None
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)


#: Where a finished pipeline run keeps its summary in MLflow (`raypipe report` reads it).
ARTIFACT = "summary/summary.json"


def to_json(s: Summary) -> str:
    return json.dumps(asdict(s), indent=2, default=str)


def from_json(text: str) -> Summary:
    raw = json.loads(text)
    raw["stages"] = [StageOutcome(**st) for st in raw.get("stages", [])]
    return Summary(**raw)


def label_efficiency(arms: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Best metric per label fraction and arm: [{"fraction", "pretrained", "scratch",
    "rows"}], smallest fraction first; empty unless a sweep ran on a fraction below 1."""
    if all(a.get("label_fraction", 1.0) == 1.0 for a in arms.values()):
        return []
    rows: dict[float, dict[str, Any]] = {}
    for a in arms.values():
        row = rows.setdefault(a["label_fraction"], {"fraction": a["label_fraction"]})
        row[a["base_arm"]] = a["best_metric"]
        row["rows"] = a.get("num_train_rows")
    return [rows[k] for k in sorted(rows)]


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_summary(s: Summary) -> str:
    lines = [f"raypipe: pipeline '{s.name}' finished in {s.seconds:.0f}s"]
    for st in s.stages:
        details = ", ".join(f"{k} {v}" for k, v in st.metrics.items())
        lines.append(f"  {st.name:<9} {st.status:<7} {st.seconds:6.0f}s  {details}")
    if s.arms:
        lines.append(f"  best {s.metric} on the validation split:")
        width = max(10, *(len(arm) for arm in s.arms))
        for arm, a in s.arms.items():
            value = "n/a" if a["best_metric"] is None else f"{a['best_metric']:.4f}"
            params = ", ".join(f"{k}={_short(v)}" for k, v in a["best_params"].items())
            lines.append(
                f"    {arm:<{width}} {value}  ({a['best_trial'] or 'no trial finished'}: {params})"
            )
        pre, scr = s.arms.get("pretrained"), s.arms.get("scratch")
        if pre and scr and pre["best_metric"] is not None and scr["best_metric"] is not None:
            lines.append(
                f"    {'gap':<{width}} {pre['best_metric'] - scr['best_metric']:+.4f} "
                "(pretrained - scratch)"
            )
    table = label_efficiency(s.arms)
    if table:
        lines.append(f"  label efficiency: best {s.metric} by fraction of the labeled rows")
        lines.append(
            f"    {'fraction':>8} {'rows':>7} {'pretrained':>10} {'scratch':>10} {'gap':>8}"
        )
        for row in table:
            pre, scr = row.get("pretrained"), row.get("scratch")
            gap = f"{pre - scr:+.4f}" if pre is not None and scr is not None else "-"
            lines.append(
                f"    {row['fraction']:>8g} {row['rows'] or '-':>7} "
                f"{'-' if pre is None else f'{pre:.4f}':>10} "
                f"{'-' if scr is None else f'{scr:.4f}':>10} {gap:>8}"
            )
    if s.model:
        lines.append(
            f"  model     registered '{s.model['name']}' version {s.model['version']} "
            f"({s.model['arm']} arm, {s.model['trial']})"
        )
        if s.model.get("champion"):
            lines.append(
                f"            alias '{tracking.CHAMPION}' -> version {s.model['champion']} "
                f"(models:/{s.model['name']}@{tracking.CHAMPION})"
            )
    lines.append(f"  mlflow    run {s.run_id} in {s.tracking_uri}")
    lines.append(f"  open the UI: {tracking.ui_command(s.tracking_uri)}")
    return tracking.redact("\n".join(lines))


def read_summary(tracking_uri: str, run_id: str) -> Summary:
    """The Summary a finished pipeline run logged (see `raypipe report`)."""
    run = tracking.get_run(tracking_uri, run_id)
    if run is None:
        raise UserError(
            f"no run '{run_id}' in the tracking store '{tracking.redact(tracking_uri)}'; pass "
            "the pipeline run id the summary printed, and --tracking-uri for another store"
        )
    kind = run.data.tags.get(tracking.Tag.KIND)
    if kind != "pipeline":
        parent = run.data.tags.get(tracking.PARENT_TAG, "")
        raise UserError(
            f"run '{run_id}' is a {kind or 'non-raypipe'} run, not a pipeline run"
            + (f"; its parent is '{parent}'" if parent else "")
        )
    text = tracking.read_artifact_text(tracking_uri, run_id, ARTIFACT)
    if text is None:
        raise UserError(
            f"pipeline run '{run_id}' has no summary: it did not finish (status "
            f"{run.info.status}); run the same pipeline again to finish it"
        )
    return from_json(text)
