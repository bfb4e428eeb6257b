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
class TaskResult:
    """One fine-tuning task's outcome: its sweep metric and mode, its arms, its model."""

    metric: str | None
    mode: str | None
    arms: dict[str, dict[str, Any]]
    model: dict[str, Any]


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
    #: with several named tasks: each task's outcome (the fields above stay empty)
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    #: with a worker-hour budget: {limit_s (the pipeline's, or None), spent_s, pretrain_s,
    #: finetune_s}, in worker-seconds
    budget: dict[str, Any] | None = None


#: Where a finished pipeline run keeps its summary in MLflow (`raypipe report` reads it).
ARTIFACT = "summary/summary.json"


def to_json(s: Summary) -> str:
    return json.dumps(asdict(s), indent=2, default=str)


def from_json(text: str) -> Summary:
    raw = json.loads(text)
    raw["stages"] = [StageOutcome(**st) for st in raw.get("stages", [])]
    raw["tasks"] = {k: TaskResult(**v) for k, v in (raw.get("tasks") or {}).items()}
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


def headline(arms: dict[str, dict[str, Any]], base: str, fraction: float) -> dict | None:
    """The arm of `base` on `fraction` of the labels that stands for it in the tables: with
    several pretraining checkpoints (finetune.init_steps), the one from the stage's own
    checkpoint, else the latest step's."""
    found = [a for a in arms.values()
             if a["base_arm"] == base and a.get("label_fraction", 1.0) == fraction]  # fmt: skip
    if not found:
        return None
    return max(found, key=lambda a: (a.get("init_step") is None, a.get("init_step") or 0))


def _headlines(arms: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    bases = {(a["base_arm"], a.get("label_fraction", 1.0)) for a in arms.values()}
    return [headline(arms, base, fraction) for base, fraction in sorted(bases)]


def label_efficiency(arms: dict[str, dict[str, Any]], metric: str = "") -> list[dict[str, Any]]:
    """`by_fraction`, empty unless a sweep ran on a fraction below 1."""
    if all(a.get("label_fraction", 1.0) == 1.0 for a in arms.values()):
        return []
    return by_fraction(arms, metric)


def by_fraction(arms: dict[str, dict[str, Any]], metric: str = "") -> list[dict[str, Any]]:
    """The reported metric (test when there is a test split, else validation; the mean over
    repeats) per label fraction and arm (the headline arm of each base): [{"fraction",
    "pretrained", "scratch", "baseline", "rows", "majority" (chance: always the most common
    training class; for mse, always the training mean), and with repeats "pretrained_sd", "scratch_sd", "gap_low",
    "gap_high"}], smallest fraction first."""
    test = on_test(arms)
    # Chance beside accuracy (the majority class) and mse (the training mean) only.
    chance = metric.endswith(("accuracy", "mse"))
    rows: dict[float, dict[str, Any]] = {}
    shown = _headlines(arms)
    for a in shown:
        row = rows.setdefault(a["label_fraction"], {"fraction": a["label_fraction"]})
        row[a["base_arm"]] = reported(a, metric, test)
        row["rows"] = a.get("num_train_rows")
        if a["base_arm"] == "baseline" and a.get("majority") is not None and chance:
            row["majority"] = a["majority"]
        values = list(by_seed(a, metric, test).values())
        if len(values) > 1:
            row[f"{a['base_arm']}_sd"] = stats.mean_sd(values)[1]
    for a in shown:
        if a["base_arm"] != "pretrained":
            continue
        scr = headline(arms, "scratch", a["label_fraction"])
        interval = gap_interval(a, scr, metric, test) if scr else None
        if interval is not None:
            rows[a["label_fraction"]].update(gap_low=interval.low, gap_high=interval.high)
    return [rows[k] for k in sorted(rows)]


def checkpoint_curve(arms: dict[str, dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """With several pretraining checkpoints (finetune.init_steps): the reported metric per
    label fraction against the pretraining step each pretrained arm started from, scratch at
    step 0: [{"fraction", "step", "arm", "value", "sd", "gap", "gap_low", "gap_high"}] (gap:
    against scratch on the same fraction, the interval with repeats), with pretraining's
    compute at that step where the checkpoint says ("samples_seen", "tokens_seen" or
    "images_seen", "flops" for transformers); empty otherwise."""
    if not any(a.get("init_step") is not None for a in arms.values()):
        return []
    test, out = on_test(arms), []
    for a in sorted(
        arms.values(), key=lambda a: (a["label_fraction"], a.get("pretrain_step") or 0)
    ):
        if a["base_arm"] not in ("pretrained", "scratch"):
            continue
        values = list(by_seed(a, metric, test).values())
        if not values:
            continue
        mean, sd = stats.mean_sd(values)
        point = {"fraction": a["label_fraction"], "arm": a["arm"], "value": mean, "sd": sd,
                 "step": 0 if a["base_arm"] == "scratch" else a.get("pretrain_step")}  # fmt: skip
        seen = {} if a["base_arm"] == "scratch" else a.get("pretrain_seen") or {}
        point.update({f"{k}_seen" if k != "flops" else k: v for k, v in seen.items()})
        scr = headline(arms, "scratch", a["label_fraction"])
        if a["base_arm"] == "pretrained" and scr is not None:
            theirs = reported(scr, metric, test)
            point["gap"] = None if theirs is None else mean - theirs
            if (interval := gap_interval(a, scr, metric, test)) is not None:
                point.update(gap_low=interval.low, gap_high=interval.high)
        out.append(point)
    return out


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
    pre, scr, base = (headline(s.arms, k, 1.0) for k in ("pretrained", "scratch", "baseline"))
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
        + (f" {'mean':>9}" if majority and s.metric.endswith("mse") else "")
        + (f" {'majority':>9}" if majority and not s.metric.endswith("mse") else ""),
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


def _curve_lines(t) -> list[str]:
    curve = checkpoint_curve(t.arms, t.metric or "")
    if not curve:
        return []
    shown = test_key(t.metric) if on_test(t.arms) else t.metric
    ci = any("gap_low" in p for p in curve)
    lines = [f"  checkpoint curve: {shown} by the pretraining step fine-tuning started from "
             "(step 0: from scratch; gap = pretrained - scratch; seen: pretraining's compute)",
             f"    {'fraction':>8} {'step':>7} {'seen':>22} {'value':>10} {'gap':>8}"
             + (f" {'gap 95% CI':>19}" if ci else "")]  # fmt: skip
    for p in curve:
        gap = f"{p['gap']:+.4f}" if p.get("gap") is not None else "-"
        interval = f"[{p['gap_low']:+.4f}, {p['gap_high']:+.4f}]" if "gap_low" in p else "-"
        lines.append(f"    {p['fraction']:>8g} {p['step']:>7} {_seen(p):>22} {p['value']:>10.4f} "
                     f"{gap:>8}" + (f" {interval:>19}" if ci else ""))  # fmt: skip
    return lines


def _seen(point: dict[str, Any]) -> str:
    """`1.23M tokens, 4.5e+12 FLOPs` (what the checkpoint says), `-` when it says nothing."""
    found = [
        f"{_count(point[f'{u}_seen'])} {u}" for u in ("tokens", "images") if f"{u}_seen" in point
    ]
    if "flops" in point:
        found.append(f"{point['flops']:.2g} FLOPs")
    return ", ".join(found) or "-"


def _count(n: float) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return f"{n:g}"


def _model_lines(model: dict[str, Any], indent: str = "  ") -> list[str]:
    if not model:
        return []
    lines = [f"{indent}model     registered '{model['name']}' version {model['version']} "
             f"({model['arm']} arm, {model['trial']})"]  # fmt: skip
    if model.get("champion"):
        lines.append(
            f"{indent}          alias '{tracking.CHAMPION}' -> version {model['champion']} "
            f"(models:/{model['name']}@{tracking.CHAMPION})"
        )
    return lines


def _task_lines(t) -> list[str]:
    """One task's part of the summary: its arms, label efficiency, checkpoint curve, model."""
    lines = _arm_lines(t) if t.arms else []
    return lines + _label_efficiency_lines(t) + _curve_lines(t) + _model_lines(t.model)


def scoreboard(s: Summary) -> dict[str, Any]:
    """Several tasks side by side: {"rows": one per task and label fraction (its reported
    metric, pretrained, scratch, baseline, and the gain: pretrained - scratch signed so that +
    means pretraining wins, with its interval), "mean_gain": [{"metric", "fraction", "gain",
    "tasks"}] (the mean gain over the tasks that report that metric, with both arms there:
    accuracy and mse are never averaged together)}."""
    rows, gains = [], {}
    for name, t in s.tasks.items():
        sign = -1 if t.mode == "min" else 1
        shown = test_key(t.metric) if on_test(t.arms) else t.metric
        for row in by_fraction(t.arms, t.metric or ""):
            out = {"task": name, "metric": shown, **row}
            pre, scr = row.get("pretrained"), row.get("scratch")
            if pre is not None and scr is not None:
                out["gain"] = sign * (pre - scr)
                gains.setdefault((shown, row["fraction"]), []).append(out["gain"])
                if "gap_low" in row:
                    low, high = sorted((sign * row["gap_low"], sign * row["gap_high"]))
                    out.update(gain_low=low, gain_high=high)
            rows.append(out)
    mean = [{"metric": m, "fraction": f, "gain": sum(g) / len(g), "tasks": len(g)}
            for (m, f), g in sorted(gains.items())]  # fmt: skip
    return {"rows": rows, "mean_gain": mean}


def _scoreboard_lines(s: Summary) -> list[str]:
    board = scoreboard(s)
    if not board["rows"]:
        return []
    width = max(6, *(len(r["task"]) for r in board["rows"]))
    mwidth = max(6, *(len(r["metric"]) for r in board["rows"]))

    def cell(value: float | None, form: str = ".4f") -> str:
        return "-" if value is None else format(value, form)

    lines = ["  scoreboard: each task's reported metric by label fraction (gain = pretrained - "
             "scratch, signed so that + means pretraining wins)",
             f"    {'task':<{width}} {'metric':<{mwidth}} {'fraction':>8} {'pretrained':>10} "
             f"{'scratch':>10} {'gain':>8} {'gain 95% CI':>19} {'baseline':>10}"]  # fmt: skip
    for r in board["rows"]:
        ci = f"[{r['gain_low']:+.4f}, {r['gain_high']:+.4f}]" if "gain_low" in r else "-"
        lines.append(
            f"    {r['task']:<{width}} {r['metric']:<{mwidth}} {r['fraction']:>8g} "
            f"{cell(r.get('pretrained')):>10} {cell(r.get('scratch')):>10} "
            f"{cell(r.get('gain'), '+.4f'):>8} {ci:>19} {cell(r.get('baseline')):>10}"
        )
    for m in board["mean_gain"]:
        lines.append(f"    mean gain in {m['metric']} over {m['tasks']} task(s) at fraction "
                     f"{m['fraction']:g}: {m['gain']:+.4f}")  # fmt: skip
    return lines


def _budget_lines(b: dict[str, Any] | None) -> list[str]:
    if b is None:
        return []

    def hours(seconds: float) -> str:
        return f"{seconds / 3600:.3g}"

    of = f" of {hours(b['limit_s'])}" if b.get("limit_s") is not None else ""
    return [f"  budget    {hours(b['spent_s'])}{of} worker-hours spent (pretraining "
            f"{hours(b['pretrain_s'])}, fine-tuning {hours(b['finetune_s'])}); what it cut is "
            "on the stage lines"]  # fmt: skip


def format_summary(s: Summary) -> str:
    lines = [f"raypipe: pipeline '{s.name}' finished in {s.seconds:.0f}s"]
    width = max(9, *(len(st.name) for st in s.stages)) if s.stages else 9
    for st in s.stages:
        details = ", ".join(f"{k} {v}" for k, v in st.metrics.items())
        lines.append(f"  {st.name:<{width}} {st.status:<7} {st.seconds:6.0f}s  {details}")
    lines += _task_lines(s)
    for name, t in s.tasks.items():
        lines += [f"  task '{name}'"] + ["  " + line for line in _task_lines(t)]
    lines += _scoreboard_lines(s)
    lines += _budget_lines(s.budget)
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
