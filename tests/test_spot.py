"""Spot preemption, for real: `raypipe run --address` against a Ray cluster of separate
raylets on this machine (Ray's own multi-node test cluster: a head with no CPUs and two 2-CPU
worker nodes). The node pretraining or a running trial is on is drained as a preemption and, at
its deadline, removed, as a cloud reclaims a spot machine. (Ray's fake autoscaling provider,
tests/test_cluster_jobs.py, does not end a drained node and its autoscaler goes on counting
the node's CPUs, so a restart there could wait for a node that never comes.)"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient
from servers import BIN, ensure_auth_token, patched_env
from test_faults import _Driver
from test_pipeline_e2e import tiny_config

from raypipe.localray import LOCAL_RAY_ENV

pytestmark = pytest.mark.slow
#: Ray's node health checks, quicker than the defaults, so a removed node is seen dead soon.
FAST_HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@contextlib.contextmanager
def _cluster_env():
    """This process's environment as a cluster's processes and drivers should see it: without
    the settings of raypipe's embedded local Ray (which turn the preemption watcher off) that
    an earlier test's pipeline may have left here."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k in LOCAL_RAY_ENV}
    try:
        with patched_env(FAST_HEALTH):
            yield
    finally:
        os.environ.update(saved)


def _processes(node) -> list[psutil.Process]:
    """A node's raylet and what it started (agents, workers): a node killed without grace
    leaves its agents behind, which the test then ends."""
    try:
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        return [raylet, *raylet.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _actor_node(address: str, class_name: str) -> str | None:
    """The node of the (one) live actor of `class_name`, from the GCS's actor table, asked
    by a process of its own."""
    ask = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR')\n"
        "for a in ray._private.state.actors().values():\n"
        f"    if a['ActorClassName'] == {class_name!r} and a['State'] == 'ALIVE':\n"
        "        print('node', a['Address']['NodeID'])\n"
    )
    out = subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True, timeout=120)
    found = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("node ")]
    return found[0] if found else None


def _reclaim_mid_run(tmp_path, started: str, actor: str, noticed: str) -> _Driver:
    """`raypipe run p.yaml` on a fresh two-node cluster; once `started` is printed, the node
    of the (one) `actor` doing the work is drained as a preemption (a deadline 5 s away), and at the
    deadline, the notice (`noticed`) seen, removed without grace. Returns the finished driver;
    every process of the cluster is ended."""
    from ray.cluster_utils import Cluster

    ensure_auth_token()
    with _cluster_env():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        nodes = {n.node_id: n for n in (cluster.add_node(num_cpus=2) for _ in range(2))}
        left: list[psutil.Process] = []  # processes to end with the test
        driver = None
        try:
            cluster.wait_for_nodes()
            driver = _Driver(["run", "p.yaml", "--address", cluster.address], tmp_path,
                             RAYPIPE_PROGRESS_EVERY_S="0")  # fmt: skip
            # Its node is looked up first, so the drain follows `started` within seconds.
            node = driver.wait_for(lambda: _actor_node(cluster.address, actor), 300)
            assert node in nodes, (node, list(nodes))
            driver.wait_for(lambda: driver.seen(started), 300)
            subprocess.run(
                [str(BIN / "ray"), "drain-node", "--address", cluster.address, "--node-id", node,
                 "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot (test)",
                 "--deadline-remaining-seconds", "5"],
                check=True, capture_output=True, timeout=120,
            )  # fmt: skip
            deadline = time.time() + 5
            driver.wait_for(lambda: driver.seen(noticed), 120)
            time.sleep(max(deadline - time.time(), 0))
            left += _processes(nodes[node])
            cluster.remove_node(nodes[node], allow_graceful=False)  # the machine is gone
            assert driver.finish(timeout=600) == 0, "\n".join(driver.lines[-40:])
        finally:
            if driver is not None and driver.proc.poll() is None:
                driver.kill()
            left += [p for n in cluster.list_all_nodes() for p in _processes(n)]
            cluster.shutdown()
            for proc in left:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
    return driver


def _runs(tmp_path, name: str):
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "tiny"]
    (run,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    return client, run


def test_a_reclaimed_pretraining_resumes_at_the_step_of_the_notice(quickstart_data, tmp_path):
    """The Ray Train worker writes a checkpoint at the step of the notice and stops stepping;
    its node goes at the deadline; Ray Train restarts the run on the other node from that
    checkpoint without counting a failure (pretraining allows none): no step lost, none
    logged twice."""
    raw = tiny_config(quickstart_data, tmp_path / "runs", finetune=None)
    raw["pretrain"].update(max_steps=1200, log_every=50, checkpoint_every=1000, max_failures=0)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    driver = _reclaim_mid_run(tmp_path, "pretrain step 50/", "RayTrainWorker",
                              "node reclaim notice at step")  # fmt: skip
    notice = next(line for line in driver.lines if "node reclaim notice at step" in line)
    step = int(notice.split("node reclaim notice at step ")[1].split(":")[0])
    assert driver.seen(f"pretrain resumed at step {step} "), "\n".join(driver.lines[-40:])
    client, pre = _runs(tmp_path, "pretrain")
    assert pre.info.status == "FINISHED"
    resumed = client.get_metric_history(pre.info.run_id, "train/resumed_from_step")
    assert [m.value for m in resumed] == [step]
    steps = [m.step for m in client.get_metric_history(pre.info.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 1200  # each step logged once


def test_a_reclaimed_trial_resumes_at_the_batch_of_the_notice(quickstart_data, tmp_path):
    """The trial writes a checkpoint inside the epoch at the notice and stops stepping; its
    node goes at the deadline; Ray Tune restarts it on the other node without counting a
    failure (the sweep allows none), and the restarted trial starts at the batch of the
    notice: every epoch logged to MLflow once, none lost."""
    raw = tiny_config(quickstart_data, tmp_path / "runs", pretrain=None)
    raw["finetune"].update(init="scratch", epochs=20, batch_size=4, baseline="none")
    raw["finetune"]["sweep"].update(num_samples=1, max_failures=0)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    # Tune's function trainables are `ImplicitFunc` actors.
    driver = _reclaim_mid_run(tmp_path, "scratch-00000 epoch 2/", "ImplicitFunc",
                              "scratch-00000: node reclaim notice at")  # fmt: skip
    notice = next(line for line in driver.lines if "node reclaim notice at" in line)
    at = notice.split("node reclaim notice at ")[1].split(":")[0]  # "epoch E, batch k"
    assert driver.seen(f"scratch-00000 resumed at {at} "), "\n".join(driver.lines[-40:])
    client, trial = _runs(tmp_path, "scratch-00000")
    assert trial.info.status == "FINISHED"
    epochs = [m.step for m in client.get_metric_history(trial.info.run_id, "val/accuracy")]
    assert epochs == list(range(1, 21))  # each epoch logged once, none lost
