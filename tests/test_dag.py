"""The DAG segmentation_pipeline: structure, schedules, retries, both runners, credentials at run time."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

# Airflow's home for this session: tests/conftest.py (pytest_configure), before this import.
from airflow.dag_processing.dagbag import BundleDagBag
from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, TriggerRule
from airflow.sdk.definitions.taskgroup import MappedTaskGroup
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from airflow.sdk.serde import deserialize, serialize
from airflow.serialization.serialized_objects import DagSerialization
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"

# Airflow puts a DAG bundle's folder on sys.path (BundleDagBag): the DAG file imports its sibling so.
if str(DAGS) not in sys.path:
    sys.path.append(str(DAGS))
import segpipe_runners as runners  # noqa: E402
from docker.api.client import APIClient  # noqa: E402
from docker.errors import DockerException  # noqa: E402

DAG_ID = "segmentation_pipeline"
STAGES = ("validate", "eda", "relabel", "experiment.train", "experiment.evaluate", "select", "promote")
EDGES = {  # task -> its upstream tasks (plan: command lines; plan_experiments: the mapping)
    "plan": set(),
    "validate": {"plan"},
    "eda": {"plan", "validate"},
    "relabel": {"plan", "eda"},
    "plan_experiments": {"relabel"},
    "experiment.train": {"plan_experiments"},
    "experiment.evaluate": {"plan_experiments", "experiment.train"},
    "experiments_done": {"experiment.evaluate"},
    "select": {"plan", "experiments_done"},
    # approval: required (else approval_request short-circuits the rest): a person's answer, then promote
    "approval_request": {"plan", "select"},
    "approve": {"approval_request"},
    "approval_outcome": {"plan", "approve"},
    "promote": {"approve", "approval_outcome"},
}
SEGPIPE_ENV = (
    "SEGPIPE_RUNNER",
    "SEGPIPE_BUCKET",
    "SEGPIPE_SCHEDULE",
    "SEGPIPE_DEFAULT_DATASET",
    "SEGPIPE_DEFAULT_PROFILE",
    "SEGPIPE_TRAINER_IMAGE",
    "SEGPIPE_RELABEL_IMAGE",
    "SEGPIPE_DOCKER_NETWORK",
    "SEGPIPE_GPU_IDS",
)
DOCKER_ENV = {
    "SEGPIPE_RUNNER": "docker",
    "SEGPIPE_TRAINER_IMAGE": "registry.example/segpipe-trainer:1.2",
    "SEGPIPE_RELABEL_IMAGE": "registry.example/segpipe-relabel:1.2",
    "SEGPIPE_DOCKER_NETWORK": "segpipe-net",
    "SEGPIPE_GPU_IDS": "0,1,2,3",
}
# Known fake secrets in the connections: none may appear in a rendered field.
S3_SECRET = "fake-s3-secret-7f3a9c"
S3_KEY = "FAKEACCESSKEY7F3A9C"
CLEARML_SECRET = "fake-clearml-secret-51be02"
CONNECTIONS = {
    "AIRFLOW_CONN_SEGPIPE_S3": (
        f"aws://{S3_KEY}:{S3_SECRET}@/?endpoint_url=http%3A%2F%2Fminio%3A9000&region_name=eu-west-1"
    ),
    "AIRFLOW_CONN_SEGPIPE_CLEARML": json.dumps(
        {
            "conn_type": "http",
            "host": "clearml-apiserver",
            "port": 8008,
            "login": "fake-clearml-access",
            "password": CLEARML_SECRET,
            "extra": {"web_host": "http://clearml-web:8080", "files_host": "http://clearml-files:8081"},
        }
    ),
}
AIRFLOW_RUN_ID = "manual__2026-11-25T18:00:00+00:00"


def parse_dag(monkeypatch: pytest.MonkeyPatch, **env: str) -> Any:
    """Parse dags/ the way Airflow does (bundle dir on sys.path) under the given SEGPIPE_* settings."""
    for name in SEGPIPE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SEGPIPE_RUNNER", "local")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    started = time.perf_counter()
    bag = BundleDagBag(str(DAGS), bundle_path=DAGS)
    runner = env.get("SEGPIPE_RUNNER", "local")
    print(f"DagBag parse of dags/ ({runner}): {time.perf_counter() - started:.3f}s")
    assert bag.import_errors == {}
    assert list(bag.dags) == [DAG_ID]
    return bag.dags[DAG_ID]


def run_params(dag: Any, **conf: Any) -> dict[str, Any]:
    """The params a run gets, as the API server makes them: the serialized DAG's defaults merged with
    the conf and validated against the params' JSON schema (ParamValidationError if refused)."""
    serialized = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    return serialized.params.deep_merge(conf).validate()


class PlannedRun:
    """The task instance part of a template context: the XComs the plan tasks pushed for one run.

    Serves `xcom_pull` from real plan outputs so the operators' templates render as in a run.
    """

    def __init__(self, xcoms: dict[tuple[str, str], Any], task_id: str, map_index: int, try_number: int):
        self.xcoms, self.task_id, self.map_index, self.try_number = xcoms, task_id, map_index, try_number
        self.dag_id = DAG_ID

    def xcom_pull(self, task_ids: str, key: str, default: Any = None, map_indexes: Any = None) -> Any:
        return self.xcoms[(task_ids, key)]


def render(
    op: Any, xcoms: dict[tuple[str, str], Any], map_index: int = -1, try_number: int = 1
) -> dict[str, Any]:
    """The operator's template fields rendered for one task instance (the operator is not changed)."""
    ti = PlannedRun(xcoms, op.task_id, map_index, try_number)
    context = {"ti": ti, "task_instance": ti, "run_id": AIRFLOW_RUN_ID, "task": op}
    return {field: op.render_template(getattr(op, field), context) for field in op.template_fields}


def plan_xcoms(dag: Any, params: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """Call the DAG's two plan tasks as Airflow would (context by keyword) and keep their XComs."""
    context = {"params": params, "run_id": AIRFLOW_RUN_ID, "triggering_asset_events": None}
    commands = dag.get_task("plan").python_callable(**context)
    experiments = dag.get_task("plan_experiments").python_callable(**context)
    # What XCom storage does to them (serde JSON), e.g. docker's DeviceRequest becomes a plain dict.
    xcoms = {("plan", key): deserialize(serialize(value)) for key, value in commands.items()}
    xcoms[("plan_experiments", "return_value")] = deserialize(serialize(experiments))
    return xcoms


# ---------------------------------------------------------------- structure


def test_dag_has_the_stages_edges_and_experiment_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    dag = parse_dag(monkeypatch)
    assert {task.task_id: set(task.upstream_task_ids) for task in dag.tasks} == EDGES
    group = dag.task_group_dict["experiment"]
    assert isinstance(group, MappedTaskGroup)
    # One instance of {train -> evaluate} per planned experiment: evaluate of experiment i waits
    # only for train of experiment i.
    assert {op.task_id for op in group.iter_mapped_dependencies()} == {"plan_experiments"}
    assert {t.task_id for t in group} == {"experiment.train", "experiment.evaluate"}
    # The join lets select run when every experiment is done and at least one evaluation succeeded.
    rules = {task.task_id: task.trigger_rule for task in dag.tasks}
    assert rules.pop("experiments_done") == TriggerRule.ALL_DONE_MIN_ONE_SUCCESS
    assert set(rules.values()) == {TriggerRule.ALL_SUCCESS}
    for stage in STAGES:
        assert type(dag.get_task(stage)).__name__ == "LocalStageOperator"


def test_schedule_cron_and_dataset_asset(monkeypatch: pytest.MonkeyPatch) -> None:
    dag = parse_dag(monkeypatch)
    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    assert isinstance(dag.timetable.timetable, CronTriggerTimetable)
    assert dag.timetable.timetable.expression == "0 3 * * 1"
    assert [a.uri for a in dag.timetable.asset_condition.objects] == [
        "s3://segmentation/datasets/pets/latest"
    ]
    assert dag.catchup is False
    assert dag.max_active_runs == 1

    dag = parse_dag(monkeypatch, SEGPIPE_SCHEDULE="30 1 * * *", SEGPIPE_DEFAULT_DATASET="/data/pets")
    assert dag.timetable.timetable.expression == "30 1 * * *"
    assert [a.uri for a in dag.timetable.asset_condition.objects] == ["file:///data/pets"]
    assert dag.params["dataset"] == "/data/pets"

    dag = parse_dag(monkeypatch, SEGPIPE_SCHEDULE="off")
    assert not isinstance(dag.timetable, AssetOrTimeSchedule)
    assert [a.uri for a in dag.timetable.asset_condition.objects] == [
        "s3://segmentation/datasets/pets/latest"
    ]


def test_stages_retry_with_exponential_backoff_and_time_out(monkeypatch: pytest.MonkeyPatch) -> None:
    dag = parse_dag(monkeypatch)
    for stage in STAGES:
        op = dag.get_task(stage)
        assert op.retries == 2
        assert op.retry_exponential_backoff == 2.0
        assert op.max_retry_delay.total_seconds() == 600
        assert op.execution_timeout is not None and op.execution_timeout.total_seconds() > 0
    # A plan error is bad input: retrying cannot fix it.
    assert dag.get_task("plan").retries == 0
    assert dag.get_task("plan_experiments").retries == 0


def test_parsing_the_dag_imports_nothing_of_the_ml_side(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path\n"
        "from airflow.dag_processing.dagbag import BundleDagBag\n"
        f"t = time.perf_counter(); bag = BundleDagBag({str(DAGS)!r}, bundle_path=Path({str(DAGS)!r}))\n"
        "print('parse_s', round(time.perf_counter() - t, 3))\n"
        "assert not bag.import_errors, bag.import_errors\n"
        "heavy = ('torch', 'mmseg', 'mmengine', 'mmcv', 'ultralytics', 'sam2', 'clearml', 'tasks')\n"
        # the experiment catalogue and the override rule: standard library only (tests/test_environment.py)
        "light = ('tasks', 'tasks.errors', 'tasks.experiments', 'tasks.overrides')\n"
        "print('loaded', sorted(m for m in sys.modules if m.split('.')[0] in heavy and m not in light))\n"
    )
    env = subprocess_env(AIRFLOW_HOME=str(tmp_path / "airflow"), SEGPIPE_RUNNER="local")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    print(next(line for line in result.stdout.splitlines() if line.startswith("parse_s")))
    assert "loaded []" in result.stdout


# ---------------------------------------------------------------- docker runner (constructed only)


def test_docker_mode_operators_images_pools_and_network(monkeypatch: pytest.MonkeyPatch) -> None:
    dag = parse_dag(monkeypatch, **DOCKER_ENV)
    for stage in STAGES:
        op = dag.get_task(stage)
        assert type(op).__name__ == "DockerStageOperator"
        image = DOCKER_ENV["SEGPIPE_RELABEL_IMAGE" if stage == "relabel" else "SEGPIPE_TRAINER_IMAGE"]
        assert op.image == image
        assert op.network_mode == "segpipe-net"
        assert op.mount_tmp_dir is False
        assert op.auto_remove == "force"
        # Nothing secret (nor anything else) is written into the DAG's environment fields.
        assert op.environment == {}
        assert op._private_environment == {}
        assert op.retries == 2
        gpu = stage in ("relabel", "experiment.train")
        assert op.pool == ("gpu" if gpu else "default_pool")
        assert op.queue == ("gpu" if gpu else "default")
        assert (op.device_requests is not None) == gpu
    assert dag.get_task("relabel").device_requests == [
        {"Driver": "", "Count": 1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    ]


def test_docker_mode_gives_each_training_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    dag = parse_dag(monkeypatch, **DOCKER_ENV)
    xcoms = plan_xcoms(dag, run_params(dag, dataset="s3://segmentation/datasets/pets/v1"))
    specs = xcoms[("plan_experiments", "return_value")]
    assert [spec["name"] for spec in specs] == ["h1", "h2", "exp1", "exp2"]
    train = dag.get_task("experiment.train")
    device_ids = []
    for index, spec in enumerate(specs):
        rendered = render(train, xcoms, map_index=index)
        assert rendered["command"] == spec["train"]
        # docker-py turns the XCom's plain dicts back into DeviceRequests (API version 1.40+).
        host_config = APIClient(version="1.41").create_host_config(
            device_requests=rendered["device_requests"]
        )
        (request,) = host_config["DeviceRequests"]
        assert request["Capabilities"] == [["gpu"]]
        device_ids += request["DeviceIDs"]
    assert sorted(device_ids) == ["0", "1", "2", "3"]

    # Fewer GPUs than experiments: round-robin.
    monkeypatch.setenv("SEGPIPE_GPU_IDS", "5,7")
    specs = plan_xcoms(dag, run_params(dag, dataset="s3://segmentation/datasets/pets/v1"))[
        ("plan_experiments", "return_value")
    ]
    assert [spec["device_requests"][0]["DeviceIDs"] for spec in specs] == [["5"], ["7"], ["5"], ["7"]]


def test_docker_mode_rendered_commands_names_and_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    dag = parse_dag(monkeypatch, **DOCKER_ENV)
    for name, value in CONNECTIONS.items():
        monkeypatch.setenv(name, value)
    xcoms = plan_xcoms(dag, run_params(dag, dataset="s3://segmentation/datasets/pets/v1", max_epochs=3))
    plan = {key: value for (task_id, key), value in xcoms.items() if task_id == "plan"}
    run_id = plan["run_id"]
    assert run_id == "manual__2026-11-25T18-00-00-00-00"
    expected = {
        "validate": plan["validate"],
        "eda": ["eda", "--run-id", run_id, "--dataset", "s3://segmentation/datasets/pets/v1"],
        "relabel": plan["relabel"],
        "select": ["select", "--run-id", run_id, "--gate", "0.75", "--experiments", "h1,h2,exp1,exp2"],
        "promote": [*plan["promote"], "--approval", "approved", "--responder", "alice"],
    }
    approved = {"chosen_options": [runners.APPROVE], "responded_by_user": {"id": "alice", "name": "alice"}}
    xcoms[("approval_outcome", "return_value")] = runners.approval_command(plan["promote"], approved)
    names = set()
    for stage in STAGES:
        op = dag.get_task(stage)
        indexes = range(4) if stage.startswith("experiment.") else [-1]
        for index in indexes:
            for try_number in (1, 2):
                rendered = render(op, xcoms, map_index=index, try_number=try_number)
                if stage in expected:
                    assert rendered["command"] == expected[stage]
                else:
                    spec = xcoms[("plan_experiments", "return_value")][index]
                    step = stage.split(".")[1]
                    assert rendered["command"] == spec[step]
                    assert rendered["command"][:3] == [step, "--experiment", spec["name"]]
                name = rendered["container_name"]
                assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", name), name
                names.add(name)
                text = json.dumps(rendered, default=str)
                for secret in (S3_SECRET, S3_KEY, CLEARML_SECRET):
                    assert secret not in text
    # Unique per task, map index and try: a retry never meets the container of the last try.
    assert len(names) == 2 * (4 + 4 + 5)
    assert "segpipe-manual__2026-11-25T18-00-00-00-00-experiment.train-2-try2" in names


def test_docker_mode_credentials_reach_private_environment_at_run_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dag = parse_dag(monkeypatch, **DOCKER_ENV)
    for name, value in CONNECTIONS.items():
        monkeypatch.setenv(name, value)
    op = dag.get_task("eda")
    xcoms = plan_xcoms(dag, run_params(dag, dataset="s3://segmentation/datasets/pets/v1"))
    op.command = render(op, xcoms)["command"]
    # No Docker engine here: execute resolves the credentials, then fails to reach the engine.
    op.docker_url = f"unix://{tempfile.gettempdir()}/segpipe-no-docker-engine.sock"
    with pytest.raises((DockerException, AirflowException)):
        op.execute({"ti": PlannedRun(xcoms, "eda", -1, 1)})
    assert op._private_environment == {
        "SEGPIPE_BUCKET": "segmentation",
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "CLEARML_API_HOST": "http://clearml-apiserver:8008",
        "CLEARML_API_ACCESS_KEY": "fake-clearml-access",
        "CLEARML_API_SECRET_KEY": CLEARML_SECRET,
        "CLEARML_WEB_HOST": "http://clearml-web:8080",
        "CLEARML_FILES_HOST": "http://clearml-files:8081",
    }
    assert "private_environment" not in op.template_fields
    assert op.environment == {}


class ExitingDockerClient(APIClient):
    """docker-py's API client with a container that prints one line and exits with `code` (no engine:
    the provider's own DockerOperator code runs up to the container's exit)."""

    def __init__(self, code: int) -> None:
        super().__init__(version="1.41")
        self.code = code

    def images(self, *args: Any, **kwargs: Any) -> list[dict]:
        return [{"Id": "sha256:segpipe"}]  # present: nothing to pull

    def create_container(self, *args: Any, **kwargs: Any) -> dict:
        return {"Id": "segpipe-container"}

    def attach(self, *args: Any, **kwargs: Any) -> Any:
        return iter([b"error: some problem\n"])

    def start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> dict:
        return {"Error": None, "StatusCode": self.code}

    def remove_container(self, *args: Any, **kwargs: Any) -> None:
        pass


def docker_stage(monkeypatch: pytest.MonkeyPatch, command: list[str]) -> Any:
    monkeypatch.setenv("SEGPIPE_RUNNER", "docker")
    return runners.stage_operator(runners.Settings.from_env(), command[0], command, image="segpipe:test")


def exits_with(op: Any, code: int) -> Any:
    """The operator, its container exiting with code: DockerOperator.hook is a cached_property."""
    op.__dict__["hook"] = type("FakeDockerHook", (), {"api_client": ExitingDockerClient(code)})()
    return op


@pytest.mark.parametrize(
    ("code", "expected"),
    [(2, r"eda exited 2 \(bad input\): not retried"), (3, r"eda exited 3 \(quality gate failed\)")],
)
def test_docker_runner_fails_exit_2_and_3_without_retry(
    monkeypatch: pytest.MonkeyPatch, code: int, expected: str
) -> None:
    op = docker_stage(monkeypatch, ["eda", "--run-id", "r1", "--dataset", "s3://segmentation/x"])
    with pytest.raises(AirflowFailException, match=expected):
        exits_with(op, code).execute({})


def test_docker_runner_retries_other_exit_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    op = docker_stage(monkeypatch, ["train", "--experiment", "h1", "--run-id", "r1", "--dataset", "/x"])
    for code in (1, 137):  # a crash, a container killed
        with pytest.raises(AirflowException, match=f"train exited {code}$") as info:
            exits_with(op, code).execute({})
        assert not isinstance(info.value, AirflowFailException)
    assert exits_with(op, 0).execute({}) == "error: some problem"  # success: the provider's result


def test_both_runners_map_exit_codes_alike() -> None:
    for code in (2, 3):
        assert isinstance(runners.stage_failure("select", code), AirflowFailException)
    assert type(runners.stage_failure("select", 1)) is AirflowException
    # a provider failure without an exit code (no container status) is left to Airflow: retried
    assert runners.docker_exit_code(DockerContainerFailedException("Docker container failed")) is None


# ---------------------------------------------------------------- local runner (real subprocesses)


def test_local_runner_streams_a_stage_into_the_task_log(
    s3_env: dict[str, str], tiny_dataset: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from tasks.dataset import content_hash

    runners.LocalStageOperator(task_id="validate", command=["validate", str(tiny_dataset)]).execute({})
    # validate prints the dataset version: the child's output went through the operator's logger.
    version = content_hash(tiny_dataset)
    version_lines = [line for line in capfd.readouterr().out.splitlines() if version in line]
    assert version_lines and all("LocalStageOperator" in line for line in version_lines)


def test_local_runner_bad_input_fails_without_retry(s3_env: dict[str, str], tmp_path: Path) -> None:
    op = runners.LocalStageOperator(task_id="validate", command=["validate", str(tmp_path / "missing")])
    with pytest.raises(AirflowFailException, match=r"validate exited 2 \(bad input\)"):
        op.execute({})


def test_local_runner_crash_is_retryable(s3_env: dict[str, str]) -> None:
    # An unknown logging level makes tasks.cli raise before the stage: a plain crash, exit 1.
    command = ["--log-level", "NO-SUCH-LEVEL", "validate", "/x"]
    with pytest.raises(AirflowException, match="exited 1") as info:
        runners.LocalStageOperator(task_id="validate", command=command).execute({})
    assert not isinstance(info.value, AirflowFailException)


def test_stage_environment_falls_back_to_the_workers_settings(
    monkeypatch: pytest.MonkeyPatch, s3_env: dict[str, str]
) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_SEGPIPE_S3", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_SEGPIPE_CLEARML", raising=False)
    env = runners.stage_environment()
    assert {key: env[key] for key in s3_env} == s3_env
    assert env["CLEARML_OFFLINE_MODE"] == "1"  # from the tests' offline environment
