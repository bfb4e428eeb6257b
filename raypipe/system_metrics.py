"""MLflow's system metrics of a training node, on the run it trains for."""

from __future__ import annotations

import contextlib

from raypipe.tracking import RunRef


@contextlib.contextmanager
def system_metrics(run: RunRef | None, *, every_s: float | None, node: str):
    """MLflow's system metrics monitor on `run` while the block runs: CPU, memory, disk and
    network (psutil), and GPU utilisation and memory where nvidia-ml-py finds a GPU, every
    `every_s` seconds, as `system/<node>/<metric>`. Nothing when either is None."""
    if run is None or not every_s:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run.run_id, sampling_interval=every_s, node_id=node,
                                   tracking_uri=run.tracking_uri)  # fmt: skip
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
