"""What a pipeline run produced, and how the console shows it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from raypipe import stats, tracking
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
    mode: str | None = None  # the sweep's: "max" (higher is better) or "min"
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


def by_seed(a: dict[str, Any], metric: str, test: bool) -> dict[int | None, float]:
    """An arm's figures on the headline split (test when `test`, else validation): one per
    repeat's seed when it was repeated, else its best checkpoint's alone (seed None)."""
    key = test_key(metric)
    repeats = [r for r in a.get("repeats") or () if r.get("metric") is not None]
    if repeats:
        if not test:
            return {r["seed"]: r["metric"] for r in repeats}
        return {r["seed"]: r["test_metrics"][key] for r in repeats
                if key in (r.get("test_metrics") or {})}  # fmt: skip
    value = (a.get("test_metrics") or {}).get(key) if test else a["best_metric"]
    return {} if value is None else {None: value}


def reported(a: dict[str, Any], metric: str, test: bool) -> float | None:
    """An arm's figure: the mean over its repeats (or its best checkpoint's), on test when
    there is a test split, else on validation."""
    values = list(by_seed(a, metric, test).values())
    return stats.mean_sd(values)[0] if values else None


def gap_interval(pre: dict, scr: dict, metric: str, test: bool) -> stats.Interval | None:
    """The paired interval of pretrained - scratch over the seeds both arms ran."""
    ours, theirs = by_seed(pre, metric, test), by_seed(scr, metric, test)
    seeds = sorted(k for k in ours.keys() & theirs.keys() if k is not None)
    return stats.paired_interval([ours[k] for k in seeds], [theirs[k] for k in seeds])


def label_efficiency(arms: dict[str, dict[str, Any]], metric: str = "") -> list[dict[str, Any]]:
    """The reported metric (test when there is a test split, else validation; the mean over
    repeats) per label fraction and arm: [{"fraction", "pretrained", "scratch", "baseline",
    "rows", "majority" (chance: always the most common training class), and with repeats
    "pretrained_sd", "scratch_sd", "gap_low", "gap_high"}], smallest fraction first; empty
    unless a sweep ran on a fraction below 1."""
    if all(a.get("label_fraction", 1.0) == 1.0 for a in arms.values()):
        return []
    test = on_test(arms)
    accuracy = metric.endswith("accuracy")  # chance beside accuracy only
    rows: dict[float, dict[str, Any]] = {}
    for a in arms.values():
        row = rows.setdefault(a["label_fraction"], {"fraction": a["label_fraction"]})
        row[a["base_arm"]] = reported(a, metric, test)
        row["rows"] = a.get("num_train_rows")
        if a["base_arm"] == "baseline" and a.get("majority") is not None and accuracy:
            row["majority"] = a["majority"]
        values = list(by_seed(a, metric, test).values())
        if len(values) > 1:
            row[f"{a['base_arm']}_sd"] = stats.mean_sd(values)[1]
    for a in arms.values():
        if a["base_arm"] != "pretrained":
            continue
        scr = next((b for b in arms.values() if b["base_arm"] == "scratch"
                    and b["label_fraction"] == a["label_fraction"]), None)  # fmt: skip
        interval = gap_interval(a, scr, metric, test) if scr else None
        if interval is not None:
            rows[a["label_fraction"]].update(gap_low=interval.low, gap_high=interval.high)
    return [rows[k] for k in sorted(rows)]


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _figure(a: dict[str, Any], metric: str, test: bool) -> str:
    """`0.9336`, or `0.9336 ± 0.0100` over repeats."""
    values = list(by_seed(a, metric, test).values())
    if not values:
        return "n/a"
    mean, sd = stats.mean_sd(values)
    return f"{mean:.4f}" + (f" ± {sd:.4f}" if len(values) > 1 else "")


def _gap_text(pre: dict, other: dict, metric: str, test: bool) -> str | None:
    """`+0.2500` (validation), then `test +0.2300` when there is a test split, then the paired
    interval over the repeats on the headline split."""
    if reported(pre, metric, False) is None or reported(other, metric, False) is None:
        return None
    text = f"{reported(pre, metric, False) - reported(other, metric, False):+.4f}"
    ours, theirs = reported(pre, metric, True), reported(other, metric, True)
    if test and ours is not None and theirs is not None:
        text += f"  test {ours - theirs:+.4f}"
    interval = gap_interval(pre, other, metric, test)
    if interval is not None:
        verdict = "excludes 0" if interval.excludes_zero else "includes 0"
        text += (f" [{interval.low:+.4f}, {interval.high:+.4f}: {interval.level:.0%} "
                 f"{stats.METHOD} over {interval.n} seeds, {verdict}]")  # fmt: skip
    return text


def _sign(s: Summary, arm: str, metric: str | None = None) -> str:
    """Which sign of a gap is the win, in words (the metric's direction is the sweep's mode)."""
    if s.mode not in ("min", "max"):
        return ""
    sign, word = ("-", "lower") if s.mode == "min" else ("+", "higher")
    return f"; {word} {metric or s.metric} is better, so {sign} means {arm} wins"


def _arm_lines(s: Summary) -> list[str]:
    test = on_test(s.arms)
    repeated = any(a.get("repeats") for a in s.arms.values())
    lines = [f"  best {s.metric} on the validation split"
             + (" (the mean ± sd of the best settings' repeats)" if repeated else "")
             + (f"; {test_key(s.metric)} of those checkpoints:" if test else ":")]  # fmt: skip
    width = max(10, *(len(arm) for arm in s.arms))
    for arm, a in s.arms.items():
        value = _figure(a, s.metric, False)
        if test:
            value += "  test " + _figure(a, s.metric, True)
        params = ", ".join(f"{k}={_short(v)}" for k, v in a["best_params"].items())
        where = a["best_trial"] or "no trial finished"
        if a.get("best_epoch") is not None:
            where += f" epoch {a['best_epoch']}"
        lines.append(f"    {arm:<{width}} {value}  ({where}" + (f": {params})" if params else ")"))
    pre, scr, base = (s.arms.get(k) for k in ("pretrained", "scratch", "baseline"))
    if pre and scr and (gap := _gap_text(pre, scr, s.metric, test)):
        lines.append(f"    {'gap':<{width}} {gap} (pretrained - scratch{_sign(s, 'pretrained')})")
    neural, name = (pre, "pretrained") if pre else (scr, "scratch")
    if neural and base and (gap := _gap_text(neural, base, s.metric, test)):
        lines.append(f"    {'vs linear':<{width}} {gap} ({name} - baseline{_sign(s, name)})")
    return lines


def _label_efficiency_lines(s: Summary) -> list[str]:
    table = label_efficiency(s.arms, s.metric or "")
    if not table:
        return []
    shown = test_key(s.metric) if on_test(s.arms) else s.metric
    name = f"{shown} on the test split" if on_test(s.arms) else f"best {s.metric}"
    baseline = any("baseline" in row for row in table)
    majority = any("majority" in row for row in table)
    ci = any("gap_low" in row for row in table)
    lines = [
        f"  label efficiency: {name} by fraction of the labeled rows"
        + (f" (gap = pretrained - scratch{_sign(s, 'pretrained', shown)})" if s.mode else ""),
        f"    {'fraction':>8} {'rows':>7} {'pretrained':>10} {'scratch':>10} {'gap':>8}"
        + (f" {'gap 95% CI':>19}" if ci else "")
        + (f" {'baseline':>10}" if baseline else "")
        + (f" {'majority':>9}" if majority else ""),
    ]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    for row in table:
        pre, scr = row.get("pretrained"), row.get("scratch")
        gap = f"{pre - scr:+.4f}" if pre is not None and scr is not None else "-"
        interval = (f"[{row['gap_low']:+.4f}, {row['gap_high']:+.4f}]" if "gap_low" in row
                    else "-")  # fmt: skip
        lines.append(
            f"    {row['fraction']:>8g} {row['rows'] or '-':>7} {cell(pre):>10} {cell(scr):>10} "
            f"{gap:>8}"
            + (f" {interval:>19}" if ci else "")
            + (f" {cell(row.get('baseline')):>10}" if baseline else "")
            + (f" {cell(row.get('majority')):>9}" if majority else "")
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
