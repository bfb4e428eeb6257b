"""The embedded local Ray that `raypipe run` starts when no cluster is given.

Its start (GCS, raylet, dashboard: about 4 s of mostly waiting on those processes) can overlap
the driver's own imports and checks: `start_in_background` begins it on a thread as soon as the
config is read, and the pipeline takes it over with `join` when a stage first needs Ray. A run
that never needs it (every stage reused, or a check failed) hands it to `discard`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

#: Background work of an embedded local Ray, slowed where nothing depends on its pace: on a
#: small machine it competes with the trainer for CPU (bench/pretrain_speed.py measures it).
#: Task events (the State API, which Tune's clean-up of stopped trials needs) and log
#: forwarding (progress lines) keep Ray's defaults. Set any of these to override.
LOCAL_RAY_ENV = {
    "REPORTER_UPDATE_INTERVAL_MS": "30000",  # dashboard agent's node stats sweep (5 s)
    "RAY_metrics_report_interval_ms": "30000",  # every process's metrics export (10 s)
    "RAY_health_check_period_ms": "10000",  # GCS -> raylet health checks, one node (3 s)
    # One machine is not preempted: no watcher process polling for it per Train run.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Data lists Parquet by reading the footers on a pool of actors (32 by default, each
    # with 128 IO threads), started per read and killed once listed: on one machine, up to 32
    # worker processes for a few local footers, each kill a failed task in the dashboard.
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2",
}

_pending: dict[str, object] = {}  # "done" (an Event), and "error" if the start failed


def init(address: str | None, *, verbose: bool) -> None:
    """`ray.init` for raypipe: a new embedded Ray (address None) or the given cluster, with
    the pipeline's plugins shipped to every process (raypipe/plugins.py)."""
    import ray

    from raypipe import plugins

    if not address:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
    ray.init(
        # "local": always a new embedded Ray; a bare ray.init() would join whatever cluster
        # `ray start` last ran on this machine, even one that is gone.
        address=address or "local",
        logging_level=logging.INFO if verbose else logging.ERROR,
        log_to_driver=True,
        runtime_env=plugins.runtime_env(),
    )


def start_in_background(*, verbose: bool) -> None:
    """Begin starting the embedded local Ray on a thread (once; not if Ray is up already)."""
    import ray

    if "done" in _pending or ray.is_initialized():
        return
    # Set on the main thread: Ray sets its SIGTERM handler (exit, so that its processes are
    # cleaned up) only when ray.init runs there.
    try:  # Ray's helper (internal): if it moves, Python's default SIGTERM handling stays
        ray._private.utils.set_sigterm_handler(lambda signum, frame: sys.exit(signum))
    except AttributeError:
        pass
    logging.getLogger("ray._private.worker").addFilter(_not_main_thread_warning)
    # Also on the main thread, before the thread starts (its `init` then finds them set): a
    # setenv on one thread while another reads the environment is not safe in C.
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)

    done = threading.Event()

    def start() -> None:
        try:
            init(None, verbose=verbose)
        except BaseException as e:  # noqa: BLE001 - handed to whoever joins
            _pending["error"] = e
        finally:
            done.set()
        # Ray's processes die with the *thread* that started them (Linux PR_SET_PDEATHSIG
        # follows the creating thread): this one lives as long as the process.
        threading.Event().wait()

    _pending["done"] = done
    threading.Thread(target=start, name="raypipe-ray-start", daemon=True).start()


def _not_main_thread_warning(record: logging.LogRecord) -> bool:
    return "SIGTERM handler is not set" not in record.getMessage()


def join() -> bool:
    """Wait for a background start: True if there was one (Ray is now up), False if none was
    begun. Raises what the start raised."""
    done = _pending.pop("done", None)
    if done is None:
        return False
    done.wait()
    error = _pending.pop("error", None)
    if error is not None:
        raise error
    return True


def discard() -> None:
    """A background start nobody took over: wait for it, then stop that Ray."""
    try:
        started = join()
    except BaseException:  # noqa: BLE001 - it failed to start: nothing to stop
        return
    if started:
        import ray

        ray.shutdown()
