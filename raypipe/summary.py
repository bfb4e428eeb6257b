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


def test_key(metric: str) -> str:
    """The test split's name for a sweep metric: val/accuracy -> test/accuracy."""
    return "test/" + metric.split("/", 1)[-1]


def on_test(arms: dict[str, dict[str, Any]]) -> bool:
    """Whether the arms were scored on a test split (then the gap is reported there)."""
    return any(a.get("test_metrics") for a in arms.values())


def reported(a: dict[str, Any], metric: str, test: bool) -> float | None:
    """An arm's figure: its best checkpoint's test metric when there is a test split, else
    its best validation metric."""
    if not test:
        return a["best_metric"]
    return (a.get("test_metrics") or {}).get(test_key(metric))


def label_efficiency(arms: dict[str, dict[str, Any]], metric: str = "") -> list[dict[str, Any]]:
    """The reported metric (test when there is a test split, else the best validation) per
    label fraction and arm: [{"fraction", "pretrained", "scratch", "rows"}], smallest
    fraction first; empty unless a sweep ran on a fraction below 1."""
    if all(a.get("label_fraction", 1.0) == 1.0 for a in arms.values()):
        return []
    test = on_test(arms)
    rows: dict[float, dict[str, Any]] = {}
    for a in arms.values():
        row = rows.setdefault(a["label_fraction"], {"fraction": a["label_fraction"]})
        row[a["base_arm"]] = reported(a, metric, test)
        row["rows"] = a.get("num_train_rows")
    return [rows[k] for k in sorted(rows)]


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _arm_lines(s: Summary) -> list[str]:
    test = on_test(s.arms)
    lines = [f"  best {s.metric} on the validation split"
             + (f" (it picks the trial); {test_key(s.metric)} of that checkpoint:" if test else ":")]  # fmt: skip
    width = max(10, *(len(arm) for arm in s.arms))
    for arm, a in s.arms.items():
        value = "n/a" if a["best_metric"] is None else f"{a['best_metric']:.4f}"
        if test:
            on = reported(a, s.metric, True)
            value += "  test " + ("n/a" if on is None else f"{on:.4f}")
        params = ", ".join(f"{k}={_short(v)}" for k, v in a["best_params"].items())
        where = a["best_trial"] or "no trial finished"
        if a.get("best_epoch") is not None:
            where += f" epoch {a['best_epoch']}"
        lines.append(f"    {arm:<{width}} {value}  ({where}: {params})")
    pre, scr = s.arms.get("pretrained"), s.arms.get("scratch")
    if pre and scr and pre["best_metric"] is not None and scr["best_metric"] is not None:
        gap = f"{pre['best_metric'] - scr['best_metric']:+.4f}"
        pre_t, scr_t = reported(pre, s.metric, test), reported(scr, s.metric, test)
        if test and pre_t is not None and scr_t is not None:
            gap += f"  test {pre_t - scr_t:+.4f}"
        lines.append(f"    {'gap':<{width}} {gap} (pretrained - scratch)")
    base, name = s.arms.get("baseline"), "pretrained" if pre else "scratch"
    neural = pre or scr
    if neural and base and neural["best_metric"] is not None and base["best_metric"] is not None:
        gap = f"{neural['best_metric'] - base['best_metric']:+.4f}"
        ours, theirs = reported(neural, s.metric, test), reported(base, s.metric, test)
        if test and ours is not None and theirs is not None:
            gap += f"  test {ours - theirs:+.4f}"
        lines.append(f"    {'vs linear':<{width}} {gap} ({name} - baseline)")
    return lines


def _label_efficiency_lines(s: Summary) -> list[str]:
    table = label_efficiency(s.arms, s.metric or "")
    if not table:
        return []
    name = f"{test_key(s.metric)} on the test split" if on_test(s.arms) else f"best {s.metric}"
    baseline = any("baseline" in row for row in table)
    lines = [
        f"  label efficiency: {name} by fraction of the labeled rows",
        f"    {'fraction':>8} {'rows':>7} {'pretrained':>10} {'scratch':>10} {'gap':>8}"
        + (f" {'baseline':>10}" if baseline else ""),
    ]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    for row in table:
        pre, scr = row.get("pretrained"), row.get("scratch")
        gap = f"{pre - scr:+.4f}" if pre is not None and scr is not None else "-"
        lines.append(
            f"    {row['fraction']:>8g} {row['rows'] or '-':>7} {cell(pre):>10} {cell(scr):>10} "
            f"{gap:>8}" + (f" {cell(row.get('baseline')):>10}" if baseline else "")
        )
    return lines


def format_summary(s: Summary) -> str:
    lines = [f"raypipe: pipeline '{s.name}' finished in {s.seconds:.0f}s"]
    for st in s.stages:
        details = ", ".join(f"{k} {v}" for k, v in st.metrics.items())
        lines.append(f"  {st.name:<9} {st.status:<7} {st.seconds:6.0f}s  {details}")
    if s.arms:
        lines += _arm_lines(s)
    lines += _label_efficiency_lines(s)
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
