"""What a pipeline run produced, and how the console shows it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raypipe import tracking


@dataclass
class StageReport:
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
    stages: list[StageReport] = field(default_factory=list)
    metric: str | None = None
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_summary(s: Summary) -> str:
    lines = [f"raypipe: pipeline '{s.name}' finished in {s.seconds:.0f}s"]
    for st in s.stages:
        details = ", ".join(f"{k} {v}" for k, v in st.metrics.items())
        lines.append(f"  {st.name:<9} {st.status:<7} {st.seconds:6.0f}s  {details}")
    if s.arms:
        lines.append(f"  best {s.metric} on the validation split:")
        for arm, a in s.arms.items():
            value = "n/a" if a["best_metric"] is None else f"{a['best_metric']:.4f}"
            params = ", ".join(f"{k}={_short(v)}" for k, v in a["best_params"].items())
            lines.append(
                f"    {arm:<10} {value}  ({a['best_trial'] or 'no trial finished'}: {params})"
            )
        pre, scr = s.arms.get("pretrained"), s.arms.get("scratch")
        if pre and scr and pre["best_metric"] is not None and scr["best_metric"] is not None:
            lines.append(
                f"    gap        {pre['best_metric'] - scr['best_metric']:+.4f} (pretrained - scratch)"
            )
    if s.model:
        lines.append(
            f"  model     registered '{s.model['name']}' version {s.model['version']} "
            f"({s.model['arm']} arm, {s.model['trial']})"
        )
    lines.append(f"  mlflow    run {s.run_id} in {s.tracking_uri}")
    lines.append(f"  open the UI: {tracking.ui_command(s.tracking_uri)}")
    return tracking.redact("\n".join(lines))
