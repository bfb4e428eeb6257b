"""Real servers on loopback for the cluster and storage tests (a helper module: the tests that
use it assert on what the servers hold): a Ray head with Ray's fake multi-node
autoscaler, an MLflow tracking server, and an S3-compatible object store (moto).

Each runs as its own processes with a marker in their environment, so teardown stops exactly
what it started (`ray stop` would also kill the test session's own Ray).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
MARKER = "RAYPIPE_TEST_SERVER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked_pids(tag: str) -> list[int]:
    """Processes whose environment carries MARKER=tag (Ray renames its processes, so their
    command lines cannot be matched; their environments are inherited)."""
    needle = f"{MARKER}={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            pids.append(int(entry))
    return pids


def stop_marked(tag: str, grace: float = 5.0) -> None:
    """Stop every process carrying the tag; fails if one survives (a leak would slow or break
    the tests after it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _marked_pids(tag)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + grace
        while pids and time.time() < deadline:
            time.sleep(0.2)
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
        if not pids:
            break
    left = [p for p in _marked_pids(tag) if not _zombie(p)]
    assert not left, f"processes of {tag} still running after SIGKILL: {left}"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def marked_env(tag: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update({MARKER: tag, "PATH": f"{BIN}:{env.get('PATH', '')}", **extra})
    return env


def wait_for(check, what: str, timeout: float, interval: float = 0.5):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # still starting
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s (last error: {last})")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


@dataclass
class Server:
    url: str
    tag: str
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # what a client needs (credentials)


@contextlib.contextmanager
def mlflow_server(root: Path, port: int | None = None, *, auth: bool = False) -> Iterator[Server]:
    """`mlflow server` with a sqlite backend and a proxied artifact root (the same `root` and
    `port` again: the same server back after an outage). With `auth`, MLflow's basic-auth app
    as cluster.yaml runs it: an admin the clients log in as, no permission for anyone else."""
    port = port or free_port()
    tag = f"mlflow-{os.getpid()}-{port}"
    log = root / "mlflow-server.log"
    cmd = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"), "--workers", "1",
    ]  # fmt: skip
    extra, client_env = {}, {}
    if auth:
        ini = root / "mlflow-auth.ini"
        ini.write_text(
            "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{root / 'mlflow-auth.db'}\nadmin_username = raypipe\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 60\n"
        )
        password = "test-" + os.urandom(8).hex()
        extra = {
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(),
        }  # for CSRF; fmt: skip
        client_env = {"MLFLOW_TRACKING_USERNAME": "raypipe", "MLFLOW_TRACKING_PASSWORD": password}
        cmd += ["--app-name", "basic-auth"]
    with open(log, "w") as out:
        subprocess.Popen(cmd, env=marked_env(tag, **extra), stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _http_ok(f"{url}/health"), "mlflow server", 120)
        yield Server(url, tag, log, client_env)
    finally:
        stop_marked(tag)


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIARAYPIPETESTKEY",  # not the bucket name: a key is masked wherever it shows
    "AWS_SECRET_ACCESS_KEY": "raypipe-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def s3_server(root: Path, bucket: str) -> Iterator[dict[str, str]]:
    """moto's S3 server; yields the environment a client needs (endpoint and keys)."""
    port, tag = free_port(), f"s3-{os.getpid()}"
    log = root / "s3-server.log"
    with open(log, "w") as out:
        subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            env=marked_env(tag),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        wait_for(lambda: _http_ok(f"{env['AWS_ENDPOINT_URL']}/moto-api/"), "s3 server", 60)
        import boto3

        boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        ).create_bucket(Bucket=bucket)
        yield env
    finally:
        stop_marked(tag)


@dataclass
class Cluster:
    gcs_address: str
    dashboard_url: str
    tag: str
    env: dict[str, str]  # what a client process needs (token auth on)


def fake_autoscaling_config(gcs_address: str, *, idle_timeout_minutes: float) -> dict:
    """Ray's fake multi-node provider: worker "nodes" are extra raylets on this machine,
    launched and terminated by the real autoscaler."""
    return {
        "cluster_name": "raypipe-test",
        "max_workers": 2,
        "idle_timeout_minutes": idle_timeout_minutes,
        "upscaling_speed": 1.0,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {
                "resources": {"CPU": 2},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def ensure_auth_token(env: dict[str, str] | None = None) -> None:
    """Make sure ~/.ray/auth_token exists (Ray's token authentication is on; a no-op when it
    does). `ray start` and Ray's test cluster do not create one; a local ray.init() creates
    and uses the same file."""
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=60)  # fmt: skip


@contextlib.contextmanager
def autoscaling_cluster(root: Path, *, idle_timeout_minutes: float = 0.25) -> Iterator[Cluster]:
    """A head with no CPUs (nothing can train on it) and an autoscaler that adds 2-CPU worker
    nodes on demand and removes them when idle."""
    port, dash, agent = free_port(), free_port(), free_port()
    tag = f"ray-{os.getpid()}"
    gcs = f"127.0.0.1:{port}"
    config = root / "autoscaling.json"
    config.write_text(
        json.dumps(fake_autoscaling_config(gcs, idle_timeout_minutes=idle_timeout_minutes))
    )
    env = marked_env(tag, RAY_FAKE_CLUSTER="1", RAY_AUTH_MODE="token")
    # `ray start` records its address here for bare ray.init() calls; put back what was there.
    current = Path("/tmp/ray/ray_current_cluster")
    before = current.read_text() if current.is_file() else None
    cmd = [
        str(BIN / "ray"), "start", "--head", "--num-cpus", "0", "--node-ip-address", "127.0.0.1",
        "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        # Not the default agent port: another Ray on this machine (the tests' own) may hold it,
        # and the head's job agent would come up without its HTTP server.
        "--dashboard-agent-listen-port", str(agent),
        "--autoscaling-config", str(config), "--disable-usage-stats",
    ]  # fmt: skip
    try:
        ensure_auth_token(env)  # `ray start` does not create one
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=120)
        url = f"http://127.0.0.1:{dash}"
        client_env = {"RAY_AUTH_MODE": "token"}
        yield Cluster(gcs, url, tag, client_env)
    finally:
        stop_marked(tag)
        if before is None:
            current.unlink(missing_ok=True)
        else:
            current.write_text(before)


def alive_worker_nodes(cluster: Cluster) -> int:
    """Alive nodes other than the head, from the dashboard's State API."""
    from ray.util.state import list_nodes

    with patched_env(cluster.env):
        nodes = list_nodes(address=cluster.dashboard_url, limit=1000)
    return sum(1 for n in nodes if n.state == "ALIVE" and not n.is_head_node)


@contextlib.contextmanager
def patched_env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def model_server(root: Path, model_uri: str, tracking_uri: str) -> Iterator[Server]:
    """`mlflow models serve` of a registered model, in this environment (no new virtualenv),
    with MLflow's pickle loading off as raypipe's processes have it."""
    port = free_port()
    tag = f"model-server-{os.getpid()}-{port}"
    log = root / "model-server.log"
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    env = marked_env(tag, MLFLOW_TRACKING_URI=tracking_uri,
                     MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")  # fmt: skip
    with open(log, "w") as out:
        subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _http_ok(f"{url}/ping"), "mlflow models serve", 120)
        yield Server(url, tag, log)
    finally:
        stop_marked(tag)


def post_json(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
