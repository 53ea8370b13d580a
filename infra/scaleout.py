"""The scale-out topology on one machine: Airflow with the CeleryExecutor and a GPU host of its own.

    infra/scaleout.sh start     # prints the UI's address and how to log in
    infra/scaleout.sh publish DIR   # a local dataset to the bucket: prints its s3:// location
    infra/scaleout.sh env       # `export ...` lines pointing tasks.store at the S3 server
    infra/scaleout.sh stop      # no process, namespace or veth is left behind

What runs (data and logs under .work/scaleout/, or --state-dir):
- PostgreSQL (metadata DB and Celery result backend), Redis (the Celery broker, append-only file) and
  the embedded S3 server (infra/s3_server.py), each listening on the main host's address only;
- the main host: api-server (UI, REST and execution API), scheduler, dag-processor, triggerer and a
  Celery worker on the `default` queue;
- the GPU host: a Celery worker on the `gpu` queue in its own network namespace and UTS namespace
  (hostname `gpu-host`), its own Airflow home and stage caches. A veth pair joins it to the main host
  (10.213.N.1 main, 10.213.N.2 GPU host): it reaches PostgreSQL, Redis, the execution API and S3 only
  through 10.213.N.1, the addresses it would use across a network. The main host's services use the
  same addresses, so each service has one address.

Pool `gpu` gets --gpu-slots slots (infra/airflow_setup.py, as airflow-init does); task logs go to the
bucket under airflow-logs/ (remote logging), so the UI shows the GPU host's logs. Needs root (network
namespaces); PostgreSQL then runs as the `postgres` user.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "infra"))
import s3_server  # noqa: E402 - the embedded S3 server's helpers (infra/, not a package)

DEFAULT_STATE_DIR = ROOT / ".work" / "scaleout"
BUCKET = "segmentation"
GPU_HOSTNAME = "gpu-host"
GPU_QUEUE = "gpu"  # dags/segpipe_runners.GPU_POOL: the queue and the pool of GPU stages
DEFAULT_QUEUE = "default"  # Airflow's [operators] default_queue
DB_NAME = DB_USER = "airflow"
ADMIN = "admin"  # the simple auth manager's user
# Passed on to every Airflow process: SEGPIPE_RUNNER=docker runs the stages in containers of the
# engine DOCKER_HOST names (default its unix socket, which the GPU host's namespace sees too).
RUNNER_SETTINGS = (
    "SEGPIPE_DOCKER_NETWORK",
    "SEGPIPE_GPU_IDS",
    "SEGPIPE_TRAINER_IMAGE",
    "SEGPIPE_RELABEL_IMAGE",
    "DOCKER_HOST",
)
SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer", "worker-main")


class TopologyError(Exception):
    """A precondition or a service that failed; the message says which and where its log is."""


@dataclass
class State:
    """Everything `stop` (another process) needs; written to STATE_DIR/state.json (mode 600)."""

    state_dir: str
    net: int  # 10.213.<net>.0/24
    gpu_slots: int
    heartbeat_timeout_s: int
    secrets: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return Path(self.state_dir)

    @property
    def netns(self) -> str:
        return f"segpipe-gpu{self.net}"

    @property
    def veth_main(self) -> str:
        return f"spgpu{self.net}m"

    @property
    def veth_gpu(self) -> str:
        return f"spgpu{self.net}g"

    @property
    def main_address(self) -> str:
        return f"10.213.{self.net}.1"

    @property
    def gpu_address(self) -> str:
        return f"10.213.{self.net}.2"

    @property
    def api_url(self) -> str:
        return f"http://{self.main_address}:{self.ports['api']}"

    @property
    def s3_url(self) -> str:
        return f"http://{self.main_address}:{self.ports['s3']}"

    def log(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    def save(self) -> None:
        path = self.dir / "state.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(asdict(self), out, indent=2)

    @classmethod
    def load(cls, state_dir: Path) -> State | None:
        path = state_dir / "state.json"
        return cls(**json.loads(path.read_text())) if path.is_file() else None


# ---------------------------------------------------------------- processes


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)


def _spawn(state: State, name: str, argv: list[str], env: dict[str, str]) -> int:
    """A service in its own session (process group), its output appended to logs/<name>.log."""
    with open(state.log(name), "ab") as log:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    state.pids[name] = proc.pid
    state.save()
    return proc.pid


def _tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (collected before any is signalled: orphans escape a walk)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _terminate(procs: Iterable[psutil.Process], timeout_s: float) -> None:
    procs = list(procs)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


def stop_service(state: State, name: str, timeout_s: float = 20) -> None:
    """SIGTERM a service and every process it started (stages run in their own sessions), then SIGKILL."""
    pid = state.pids.pop(name, None)
    if pid is not None:
        _terminate(_tree(pid), timeout_s)
    state.save()


def _netns_pids(state: State) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", state.netns], capture_output=True, text=True)
    return [int(pid) for pid in result.stdout.split()] if result.returncode == 0 else []


def kill_gpu_host(state: State) -> list[int]:
    """SIGKILL every process of the GPU host's namespace at once: the host lost its power."""
    pids = _netns_pids(state)
    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.kill()
            procs.append(proc)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    state.pids.pop("worker-gpu", None)
    state.save()
    return pids


def _wait(what: str, check, timeout_s: float, log: Path | None = None, pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pid is not None and not _alive(pid):
            raise TopologyError(f"{what}: the process exited (log: {log})\n{_tail(log)}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TopologyError(f"{what}: not ready after {timeout_s:.0f}s (log: {log})\n{_tail(log)}")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tail(log: Path | None, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log and log.is_file() else ""


def _listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- network


def _ip(*args: str, netns: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    _run([*prefix, "ip", *args])


def create_network(state: State) -> None:
    """The GPU host's namespace and the veth pair that joins it to the main host (one /24 of our own)."""
    _run(["ip", "netns", "add", state.netns])
    _ip("link", "add", state.veth_main, "type", "veth", "peer", "name", state.veth_gpu)
    _ip("link", "set", state.veth_gpu, "netns", state.netns)
    _ip("addr", "add", f"{state.main_address}/24", "dev", state.veth_main)
    _ip("link", "set", state.veth_main, "up")
    _ip("addr", "add", f"{state.gpu_address}/24", "dev", state.veth_gpu, netns=state.netns)
    _ip("link", "set", state.veth_gpu, "up", netns=state.netns)
    _ip("link", "set", "lo", "up", netns=state.netns)


def delete_network(state: State) -> None:
    subprocess.run(["ip", "netns", "del", state.netns], capture_output=True)  # takes its veth end along
    subprocess.run(["ip", "link", "del", state.veth_main], capture_output=True)


def network_exists(state: State) -> bool:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    return state.netns in names or f"{state.veth_main}@" in links or f"{state.veth_main} " in links


# ---------------------------------------------------------------- PostgreSQL, Redis, S3


def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if found:
        return str(found[-1])
    if path := shutil.which(name):
        return path
    raise TopologyError(f"PostgreSQL's {name} not found: install postgresql (infra/system_deps.sh)")


# initdb and postgres refuse to run as root (start needs root): they run as Debian's `postgres` user.
DB_OS_USER = "postgres"
AS_DB_USER = ["runuser", "-u", DB_OS_USER, "--"]


def start_postgres(state: State) -> None:
    data, sock = state.dir / "postgres" / "data", state.dir / "postgres" / "socket"
    # A fresh cluster: start() begins from an empty state dir.
    data.mkdir(parents=True, exist_ok=True)
    sock.mkdir(parents=True, exist_ok=True)
    pwfile = state.dir / "postgres" / "pwfile"
    pwfile.write_text(state.secrets["postgres"] + "\n")
    for path in (data.parent, data, sock, pwfile):
        shutil.chown(path, DB_OS_USER, DB_OS_USER)
    _run(
        [
            *AS_DB_USER,
            _pg_bin("initdb"),
            "-D",
            str(data),
            "-U",
            DB_USER,
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
        ]
    )
    pwfile.unlink()
    hba = data / "pg_hba.conf"
    hba.write_text(
        hba.read_text() + f"host all all {state.main_address.rsplit('.', 1)[0]}.0/24 scram-sha-256\n"
    )
    options = f"-c listen_addresses={state.main_address} -p {state.ports['postgres']} -k {sock}"
    log = state.log("postgres")
    log.touch()
    shutil.chown(log, DB_OS_USER, DB_OS_USER)
    _run([*AS_DB_USER, _pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start"])
    state.pids["postgres"] = int((data / "postmaster.pid").read_text().split()[0])
    state.save()
    import psycopg2  # the venv's driver (requirements/airflow.txt)

    conn = psycopg2.connect(
        host=state.main_address,
        port=state.ports["postgres"],
        user=DB_USER,
        password=state.secrets["postgres"],
        dbname="postgres",
    )
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,))
        if cur.fetchone() is None:
            cur.execute(f"CREATE DATABASE {DB_NAME}")
    conn.close()


def stop_postgres(state: State) -> None:
    data = state.dir / "postgres" / "data"
    if state.pids.pop("postgres", None) is not None and (data / "postmaster.pid").exists():
        subprocess.run(
            [*AS_DB_USER, _pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
        )
    state.save()


def start_redis(state: State) -> None:
    """Redis with an append-only file under the state dir: a restart keeps the queued messages."""
    data = state.dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    conf = data / "redis.conf"
    # The password goes through a file, not the command line (visible in `ps`).
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(
            f"bind {state.main_address}\nport {state.ports['redis']}\nrequirepass {state.secrets['redis']}\n"
            f'dir {data}\nappendonly yes\nappendfsync always\nsave ""\ndaemonize no\n'
        )
    redis = shutil.which("redis-server")
    if redis is None:
        raise TopologyError("redis-server not found: install redis-server (infra/system_deps.sh)")
    pid = _spawn(state, "redis", [redis, str(conf)], dict(os.environ))
    _wait("redis", lambda: _listening(state.main_address, state.ports["redis"]), 30, state.log("redis"), pid)


def restart_redis(state: State, down_s: float = 2.0) -> None:
    """Stop Redis (SIGTERM: it writes its append-only file) and start it again on the same port."""
    stop_service(state, "redis")
    time.sleep(down_s)
    start_redis(state)


def start_s3(state: State) -> None:
    moto = Path(sys.executable).with_name("moto_server")
    host, port = state.main_address, state.ports["s3"]
    pid = _spawn(state, "s3", [str(moto), "-H", host, "-p", str(port)], dict(os.environ))
    _wait("the S3 server", lambda: _listening(host, port), 30, state.log("s3"), pid)
    s3_server.create_bucket(port, BUCKET, host=host)


def s3_env(state: State) -> dict[str, str]:
    """What points boto3 (and so tasks.store) at this topology's S3 server."""
    return s3_server.client_env(state.ports["s3"], BUCKET, host=state.main_address)


def publish_dataset(state: State, local_dir: Path) -> str:
    """Validate a local dataset and publish it to the topology's bucket; its s3:// location."""
    os.environ.update(s3_env(state))
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tasks.materialize import materialize_dataset

    return materialize_dataset(str(local_dir)).uri


# ---------------------------------------------------------------- Airflow


def airflow_env(state: State, host: str) -> dict[str, str]:
    """The environment of every Airflow process of `host` (main or gpu): settings by variable only."""
    pg = f"{DB_USER}:{state.secrets['postgres']}@{state.main_address}:{state.ports['postgres']}/{DB_NAME}"
    home = state.dir / host
    cache = home / "cache"
    s3 = s3_server.LOCAL_CREDENTIALS
    env = {
        # Only what a host needs: PATH, locale and the proxy's CA bundle, not the caller's whole env.
        **{k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE")},
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "PYTHONPATH": str(ROOT),  # this checkout's tasks/ for the stages (not another editable install)
        "HOME": str(home / "home"),
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__CORE__FERNET_KEY": state.secrets["fernet"],
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{state.api_url}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{pg}",
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://{pg}",
        "AIRFLOW__CELERY__BROKER_URL": f"redis://:{state.secrets['redis']}@{state.main_address}:{state.ports['redis']}/0",
        "AIRFLOW__API__HOST": state.main_address,
        "AIRFLOW__API__PORT": str(state.ports["api"]),
        "AIRFLOW__API__BASE_URL": state.api_url,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": state.secrets["api"],
        "AIRFLOW__API_AUTH__JWT_SECRET": state.secrets["jwt"],
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "300",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(state.heartbeat_timeout_s),
        "AIRFLOW__LOGGING__REMOTE_LOGGING": "True",
        "AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER": f"s3://{BUCKET}/airflow-logs",
        "AIRFLOW__LOGGING__REMOTE_LOG_CONN_ID": "segpipe_s3",
        # What infra/airflow_setup.py turns into the `segpipe_s3` connection and the `gpu` pool.
        "SEGPIPE_S3_ACCESS_KEY": s3["AWS_ACCESS_KEY_ID"],
        "SEGPIPE_S3_SECRET_KEY": s3["AWS_SECRET_ACCESS_KEY"],
        "SEGPIPE_S3_ENDPOINT_URL": state.s3_url,
        "SEGPIPE_GPU_POOL_SLOTS": str(state.gpu_slots),
        # The runner's settings as the caller gives them (README "Runner settings"); default local.
        **{k: v for k, v in os.environ.items() if k in RUNNER_SETTINGS},
        "SEGPIPE_RUNNER": os.environ.get("SEGPIPE_RUNNER") or "local",
        "SEGPIPE_BUCKET": BUCKET,
        "SEGPIPE_SCHEDULE": "off",
        "SEGPIPE_DEFAULT_PROFILE": "cpu",
        # The stages' caches stay on their host, offline (ClearML too unless CLEARML_* name a server).
        "SEGPIPE_WORK_DIR": str(cache / "segpipe"),
        "CLEARML_OFFLINE_MODE": "1",
        "CLEARML_CACHE_DIR": str(cache / "clearml"),
        "YOLO_OFFLINE": "1",
        "YOLO_CONFIG_DIR": str(cache / "yolo"),
        "MPLCONFIGDIR": str(cache / "mpl"),
        "TORCH_HOME": str(cache / "torch"),
    }
    return env


def _airflow(state: State, *args: str) -> None:
    env = airflow_env(state, "main")
    result = subprocess.run(["airflow", *args], env=env, capture_output=True, text=True)
    with open(state.log("setup"), "a") as log:
        log.write(f"$ airflow {shlex.join(args)}\n{result.stdout}{result.stderr}\n")
    if result.returncode != 0:
        raise TopologyError(
            f"airflow {' '.join(args)} failed (log: {state.log('setup')})\n{result.stderr[-3000:]}"
        )


def init_airflow(state: State) -> None:
    """Migrate the metadata DB; the `gpu` pool and the `segpipe_s3` connection as airflow-init makes them."""
    _airflow(state, "db", "migrate")
    setup = state.dir / "setup"
    setup.mkdir(mode=0o700, exist_ok=True)
    env = airflow_env(state, "main")
    _run([sys.executable, str(ROOT / "infra" / "airflow_setup.py"), str(setup)], env=env)
    try:
        _airflow(state, "pools", "import", str(setup / "pools.json"))
        _airflow(state, "connections", "import", "--overwrite", str(setup / "connections.json"))
    finally:
        shutil.rmtree(setup)


def _service_argv(name: str, concurrency: int) -> list[str]:
    return {
        "api-server": ["airflow", "api-server"],
        # Their log servers would bind 0.0.0.0: task logs are read from the bucket instead.
        "scheduler": ["airflow", "scheduler", "--skip-serve-logs"],
        "dag-processor": ["airflow", "dag-processor"],
        "triggerer": ["airflow", "triggerer", "--skip-serve-logs"],
        "worker-main": [
            "airflow",
            "celery",
            "worker",
            "--queues",
            DEFAULT_QUEUE,
            "--concurrency",
            str(concurrency),
            "--skip-serve-logs",
        ],
        "worker-gpu": [
            "airflow",
            "celery",
            "worker",
            "--queues",
            GPU_QUEUE,
            "--concurrency",
            str(concurrency),
            "--skip-serve-logs",
        ],
    }[name]


def start_service(state: State, name: str) -> int:
    host = "gpu" if name == "worker-gpu" else "main"
    env = airflow_env(state, host)
    for folder in ("home", "airflow", "cache"):
        (state.dir / host / folder).mkdir(parents=True, exist_ok=True)
    argv = _service_argv(name, concurrency=state.gpu_slots + 2 if host == "gpu" else 2)
    if host == "gpu":
        # The GPU host: its own network and hostname (what the task instances record).
        argv = [
            "ip",
            "netns",
            "exec",
            state.netns,
            "unshare",
            "--uts",
            "--",
            "sh",
            "-c",
            'hostname "$0" && exec "$@"',
            GPU_HOSTNAME,
            *argv,
        ]
    return _spawn(state, name, argv, env)


def wait_worker_ready(state: State, name: str, since: int = 0, timeout_s: float = 240) -> None:
    """Until the Celery worker's log says `ready` after byte offset `since`."""
    log = state.log(name)
    _wait(
        f"Celery {name}", lambda: b" ready." in log.read_bytes()[since:], timeout_s, log, state.pids.get(name)
    )


def start_gpu_worker(state: State, timeout_s: float = 240) -> None:
    log = state.log("worker-gpu")
    since = log.stat().st_size if log.exists() else 0
    start_service(state, "worker-gpu")
    wait_worker_ready(state, "worker-gpu", since, timeout_s)


def restart_scheduler(state: State) -> None:
    stop_service(state, "scheduler")
    start_service(state, "scheduler")


def admin_password(state: State) -> str:
    path = state.dir / "main" / "airflow" / "simple_auth_manager_passwords.json.generated"
    return json.loads(path.read_text())[ADMIN]


def _api_healthy(state: State) -> bool:
    with urllib.request.urlopen(f"{state.api_url}/api/v2/monitor/health", timeout=5) as response:
        return response.status == 200


# ---------------------------------------------------------------- REST client (tests, bench)

DAG_ID = "segmentation_pipeline"
TERMINAL = {"success", "failed"}


class Api:
    """The Airflow REST API of a topology, logged in as the admin (simple auth manager's token)."""

    def __init__(self, state: State):
        self.base = state.api_url
        status, body = self.request(
            "POST", "/auth/token", {"username": ADMIN, "password": admin_password(state)}
        )
        if status not in (200, 201):
            raise TopologyError(f"login failed: {status} {body}")
        self.token = body["access_token"]

    def request(self, method: str, path: str, body: object = None, raw: bool = False) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if getattr(self, "token", None):
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.base + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                payload = response.read()
                return response.status, payload.decode() if raw else json.loads(payload or b"null")
        except urllib.error.HTTPError as err:
            payload = err.read()
            try:
                return err.code, json.loads(payload or b"null")
            except json.JSONDecodeError:
                return err.code, payload.decode(errors="replace")

    def get(self, path: str) -> object:
        status, body = self.request("GET", path)
        if status != 200:
            raise TopologyError(f"GET {path}: {status} {body}")
        return body

    def wait_for_dag(self, timeout_s: float = 300) -> None:
        _wait(
            "the DAG to be parsed", lambda: self.request("GET", f"/api/v2/dags/{DAG_ID}")[0] == 200, timeout_s
        )
        status, body = self.request("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
        if status != 200:
            raise TopologyError(f"unpausing {DAG_ID}: {status} {body}")

    def trigger(self, run_id: str, conf: dict) -> None:
        body = {"dag_run_id": run_id, "logical_date": None, "conf": conf}
        status, run = self.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", body)
        if status != 200:
            raise TopologyError(f"trigger {run_id}: {status} {run}")

    def run(self, run_id: str) -> dict:
        return self.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")

    def wait_for_run(self, run_id: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (run := self.run(run_id))["state"] in TERMINAL:
                return run
            time.sleep(3)
        raise TopologyError(
            f"run {run_id} not finished after {timeout_s:.0f}s: {self.task_instances(run_id)}"
        )

    def task_instances(self, run_id: str) -> list[dict]:
        return self.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]

    def tries(self, run_id: str, task_id: str, map_index: int = -1) -> list[dict]:
        path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/tries"
        if map_index < 0:
            path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/tries"
        return self.get(path)["task_instances"]

    def log(self, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        """A task try's log as the UI shows it (JSON lines from the remote store, joined as text)."""
        path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}"
        path += f"?full_content=true&map_index={map_index}"
        body = self.get(path)
        lines = []
        for item in body["content"]:
            if isinstance(item, dict):
                lines.append(" ".join(str(item.get(k, "")) for k in ("timestamp", "event") if item.get(k)))
            else:
                lines.append(str(item))
        return "\n".join(lines)


# ---------------------------------------------------------------- start / stop


def start(
    state_dir: Path = DEFAULT_STATE_DIR, net: int = 0, gpu_slots: int = 2, heartbeat_timeout_s: int = 300
) -> State:
    """Start the whole topology; on any failure stop what was started and raise TopologyError."""
    if os.geteuid() != 0:
        raise TopologyError("the GPU host's network namespace needs root: run as root (or with sudo)")
    if not 0 <= net <= 255:
        raise TopologyError(f"--net {net}: expected 0..255 (the GPU host's network is 10.213.<net>.0/24)")
    state_dir = state_dir.resolve()
    if (old := State.load(state_dir)) is not None and old.pids:
        raise TopologyError(f"{state_dir} holds a running topology: stop it first (infra/scaleout.sh stop)")
    names = ("postgres", "redis", "fernet", "api", "jwt")
    state = State(str(state_dir), net, gpu_slots, heartbeat_timeout_s)
    state.secrets = {name: secrets.token_urlsafe(24) for name in names}
    state.secrets["fernet"] = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()  # Fernet's form
    if state_dir.exists():
        shutil.rmtree(state_dir)
    (state_dir / "logs").mkdir(parents=True)
    state_dir.chmod(0o755)  # the postgres user reads its data dir below
    state.save()
    try:
        if network_exists(state):
            raise TopologyError(
                f"namespace {state.netns} or link {state.veth_main} exists: pick another --net"
            )
        create_network(state)
        state.ports = {name: _free_port(state.main_address) for name in ("postgres", "redis", "s3", "api")}
        state.save()
        start_postgres(state)
        start_redis(state)
        start_s3(state)
        init_airflow(state)
        for name in SERVICES:
            start_service(state, name)
        start_service(state, "worker-gpu")
        _wait(
            "the API server",
            lambda: _api_healthy(state),
            300,
            state.log("api-server"),
            state.pids["api-server"],
        )
        wait_worker_ready(state, "worker-main")
        wait_worker_ready(state, "worker-gpu")
    except BaseException:
        stop(state)
        raise
    return state


def stop(state: State) -> None:
    """Stop every service (workers first), delete the namespace and veth; the data dir stays."""
    kill_gpu_host(state)
    for name in ("worker-main", "triggerer", "dag-processor", "scheduler", "api-server", "s3", "redis"):
        stop_service(state, name)
    stop_postgres(state)
    for name in list(state.pids):  # anything else recorded
        stop_service(state, name)
    delete_network(state)
    state.save()


def leftovers(state: State) -> list[str]:
    """What a stop left behind: live processes of the topology, its namespace or veth."""
    found = []
    marker = str(state.dir)
    for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
        try:
            text = (
                " ".join(proc.info["cmdline"] or []) + " " + " ".join((proc.info["environ"] or {}).values())
            )
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if marker in text and proc.pid != os.getpid():
            found.append(f"process {proc.pid}: {' '.join(proc.info['cmdline'] or [])[:120]}")
    if network_exists(state):
        found.append(f"namespace {state.netns} or link {state.veth_main}")
    return found


def _main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "env", "publish"])
    parser.add_argument("dataset", nargs="?", type=Path, help="publish: a local dataset directory")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--net", type=int, default=0, help="the GPU host's network: 10.213.NET.0/24")
    parser.add_argument("--gpu-slots", type=int, default=2, help="slots of the `gpu` pool")
    parser.add_argument(
        "--heartbeat-timeout", type=int, default=300, help="seconds until a silent task fails"
    )
    args = parser.parse_args()
    state_dir = args.state_dir.resolve()
    if args.action == "stop":
        state = State.load(state_dir)
        if state is None:
            print(f"scaleout: nothing to stop in {state_dir}")
            return 0
        stop(state)
        left = leftovers(state)
        for item in left:
            print(f"scaleout: still there: {item}", file=sys.stderr)
        print(f"scaleout: stopped (data and logs kept in {state_dir})")
        return 1 if left else 0
    if args.action in ("env", "publish"):
        state = State.load(state_dir)
        if state is None or not state.pids:
            print(f"scaleout: no topology running in {state_dir}", file=sys.stderr)
            return 2
        if args.action == "publish":
            if args.dataset is None:
                print("scaleout: publish needs a dataset directory", file=sys.stderr)
                return 2
            print(publish_dataset(state, args.dataset))
            return 0
        for key, value in s3_env(state).items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    if args.gpu_slots < 1:
        print(f"scaleout: --gpu-slots {args.gpu_slots}: expected >= 1", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        state = start(state_dir, args.net, args.gpu_slots, args.heartbeat_timeout)
    except TopologyError as err:
        print(f"scaleout: {err}", file=sys.stderr)
        return 2
    print(f"scaleout: up in {time.monotonic() - started:.0f}s")
    print(f"  Airflow UI and REST API: {state.api_url}  (user {ADMIN}, password {admin_password(state)})")
    print(
        f"  S3: {state.s3_url} bucket {BUCKET}; "
        f"GPU host {GPU_HOSTNAME} at {state.gpu_address} (netns {state.netns})"
    )
    print(f"  logs: {state_dir / 'logs'}; stop: infra/scaleout.sh stop")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
