"""Ray for a run: connect to a cluster (`--address` / RAY_ADDRESS) or start the embedded local
Ray (or take over the one `localray.start_in_background` began), only when a stage has work
to do; check the cluster can ever hold the training workers; keep the console to raypipe's own
progress lines.
"""

from __future__ import annotations

import os
import socket
import threading

import ray

from raypipe import localray, timing
from raypipe.config import PipelineConfig
from raypipe.errors import UserError
from raypipe.preflight import check_resources
from raypipe.progress import PROGRESS_MARK, STATUS_MARK, console


class RayConnection:
    """Ray, started or connected on first need (a fully reused pipeline never waits for it),
    and shut down at the end if this run started it."""

    def __init__(self, cfg: PipelineConfig, *, address: str | None, verbose: bool):
        self.cfg, self.address, self.verbose = cfg, address, verbose
        self.started = False
        self._lock = threading.Lock()  # fine-tuning tasks run side by side may ask at once

    def ensure(self) -> None:
        with self._lock:
            if not _init_ray(self.address, verbose=self.verbose):
                return
            timing.mark("ray")
            self.started = True
            most = _cluster_resources() if self.address else None
            if most is not None:
                check_resources(self.cfg, most, f"the Ray cluster at {self.address}")

    def capacity(self) -> dict[str, float]:
        """The resources training can have: the cluster's most (connecting if need be), the
        running Ray's own, or, before a local Ray starts, this machine's CPUs."""
        if self.local and not ray.is_initialized():
            return {"CPU": float(os.cpu_count() or 1)}
        self.ensure()
        return _cluster_resources() or {k: float(v) for k, v in ray.cluster_resources().items()}

    @property
    def local(self) -> bool:
        """The embedded local Ray (no cluster address)."""
        return not self.address

    def close(self) -> None:
        if self.started:
            ray.shutdown()


def _forward_progress_only() -> None:
    """Show only raypipe's progress lines from Ray workers on this console.

    Ray forwards every worker's stdout/stderr to the driver (hundreds of lines per run); they
    all stay in Ray's session log directory. Uses Ray's log dispatcher, which is internal: if
    it moves, Ray's default forwarding stays in place.
    """
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return

    def forward(data: dict) -> None:
        for line in data.get("lines", ()):
            if (at := line.find(STATUS_MARK)) >= 0:
                console.status(line[at + len(STATUS_MARK) :].strip())
            elif (at := line.find(PROGRESS_MARK)) >= 0:
                console.line(line[at + len(PROGRESS_MARK) :].strip())

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("raypipe_progress", forward)


def _check_reachable(address: str) -> None:
    """Fail in seconds on a cluster address nothing listens on (Ray itself retries for minutes)."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or "/" in target:
        return  # "auto", "local" and other forms Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(
            f"cannot reach the Ray cluster at '{address}' ({e.strerror or e}); check --address "
            "or RAY_ADDRESS, or leave both unset to start a local Ray"
        ) from None


def _cluster_resources() -> dict[str, float] | None:
    """The most the connected cluster can grow to: from its autoscaler's node types when the
    autoscaler publishes them (autoscaler v2, KubeRay), what it has now when no autoscaler
    runs, and None (unknown) under an autoscaler that does not say."""
    try:  # internal APIs: if they move, no check rather than a wrong one
        from ray._private import ray_constants
        from ray._private.state import state
        from ray.experimental.internal_kv import _internal_kv_get

        most = state.get_max_resources_from_cluster_config()
        if most:
            return {k: float(v) for k, v in most.items()}
        if _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) is not None:
            return None
    except Exception:  # noqa: BLE001
        return None
    return {k: float(v) for k, v in ray.cluster_resources().items()}


def _init_ray(address: str | None, *, verbose: bool) -> bool:
    """Connect to `address` / RAY_ADDRESS, or start an embedded local Ray (or take over the one
    `localray.start_in_background` began). True if we started it."""
    begun_early = not address and localray.join()
    if not begun_early:
        if ray.is_initialized():
            return False
        if address:
            _check_reachable(address)
        try:
            localray.init(address, verbose=verbose)
        except ConnectionError as e:
            raise UserError(
                f"cannot connect to the Ray cluster at '{address}' ({e}); check --address or "
                "RAY_ADDRESS, or leave both unset to start a local Ray"
            ) from None
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if not verbose:
        _forward_progress_only()
    if address:
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        total = ray.cluster_resources()
        console.line(
            f"[ray] connected to the Ray cluster at {address}: {nodes} node(s), "
            f"{total.get('CPU', 0):g} CPU(s), {total.get('GPU', 0):g} GPU(s) now "
            "(an autoscaler may add more)"
        )
    else:
        console.line("[ray] started a local Ray on this machine")
    return True
