"""How the DAG `segmentation_pipeline` runs each stage's one command line: settings, plans, runners.

Airflow side only (no torch/mmseg import; of tasks/ only tasks.experiments, which reads the experiment
files' metadata with the standard library). The DAG file is wiring; this module holds the parts worth
testing on their own:

- `Settings.from_env()`: parse-time configuration (runner, images, bucket, schedule, defaults).
- `build_plan()`: validated params + Airflow run id -> the argument list of every stage
  (`python -m tasks <step> ...` without the `python -m tasks` prefix), never a shell string.
- `assign_gpus()`: one docker `DeviceRequest` per experiment, round-robin over SEGPIPE_GPU_IDS.
- `stage_environment()`: S3 and ClearML settings from the Airflow connections `segpipe_s3` and
  `segpipe_clearml` (else the worker's environment), resolved at run time, never written in the DAG.
- `LocalStageOperator` (subprocess in the worker's environment) and `DockerStageOperator`, both
  failing a task by the stage's exit code through `stage_failure` (2 and 3: no retry).
- `RunObjects`: read-only view of a run's objects (runs/<id>/), for the approval request and the
  run-report UI plugin (dags/plugins/segpipe_report.py).
- `approval_command()`: the approval's answer (Airflow's HITL response) -> the promote step's argv.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airflow.configuration import conf
from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.providers.docker.operators.docker import DockerOperator
from airflow.sdk import BaseHook, BaseOperator, Variable
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowNotFoundException
from docker.types import DeviceRequest

from tasks import experiments

DAG_ID = "segmentation_pipeline"
EXPERIMENTS = experiments.names()  # one per file under configs/, in the fixed order
DEFAULT_EXPERIMENTS = experiments.default_names()
PROFILES = ("full", "cpu")
RELABEL_STRATEGIES = ("yolo_sam2", "morphology", "auto")
# The DAG's `recompute` param: stages that compute again whatever the cross-run cache holds
# (their `--recompute` flag, tasks/stage.py); "all" for every one of them.
RECOMPUTE_STAGES = ("eda", "relabel", "train", "evaluate")
RECOMPUTE_ALL = "all"
RUNNERS = ("local", "docker")
APPROVALS = ("none", "required")  # the DAG's `approval` param
APPROVAL_REQUIRED = "required"
APPROVE, REJECT = "Approve", "Reject"  # the approval request's options (Airflow's ApprovalOperator's)
DEFAULT_BUCKET = "segmentation"
DEFAULT_SCHEDULE = "0 3 * * 1"  # weekly, Monday 03:00 UTC
DEFAULT_TRAINER_IMAGE = "segpipe-trainer:0.1.0"  # the tags docker-compose.yml builds
DEFAULT_RELABEL_IMAGE = "segpipe-relabel:0.1.0"
S3_CONN_ID = "segpipe_s3"
CLEARML_CONN_ID = "segpipe_clearml"
GPU_POOL = "gpu"
NO_GPUS = "none"  # SEGPIPE_GPU_IDS value of a docker host without GPUs
# Worker settings that name a path on the worker: meaningless inside a container (the image sets its
# own), so the docker runner does not hand them over.
WORKER_PATH_VARIABLES = frozenset({"CLEARML_CACHE_DIR", "CLEARML_CONFIG_FILE"})
# tasks.cli exit codes that a retry cannot fix: 2 bad input, 3 quality gate failed.
NO_RETRY_EXIT_CODES = {2: "bad input", 3: "quality gate failed"}
# DockerOperator gives a container's exit code only inside its exception's message, the Docker API's
# wait result: "Docker container failed: {'Error': None, 'StatusCode': 2}".
_DOCKER_STATUS_CODE = re.compile(r"'StatusCode': (-?\d+)")
# Same rule as tasks.store.check_run_id (kept here: the Airflow side does not import tasks/).
RUN_ID_MAX = 128
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]")


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Parse-time configuration, all from the environment (the runner also from an Airflow Variable)."""

    runner: str
    bucket: str
    schedule: str
    trainer_image: str
    relabel_image: str
    docker_network: str | None
    docker_gpus: bool
    default_dataset: str
    default_profile: str
    # CeleryExecutor: GPU stages may run on other hosts (README "Scale out"), so they are routed.
    celery: bool = False

    @classmethod
    def from_env(cls) -> Settings:
        runner = os.environ.get("SEGPIPE_RUNNER") or _variable("segpipe_runner") or "local"
        if runner not in RUNNERS:
            raise ValueError(f"SEGPIPE_RUNNER={runner!r}: expected one of {', '.join(RUNNERS)}")
        bucket = os.environ.get("SEGPIPE_BUCKET") or DEFAULT_BUCKET
        profile = os.environ.get("SEGPIPE_DEFAULT_PROFILE") or "full"
        if profile not in PROFILES:
            raise ValueError(f"SEGPIPE_DEFAULT_PROFILE={profile!r}: expected one of {', '.join(PROFILES)}")
        return cls(
            runner=runner,
            bucket=bucket,
            schedule=os.environ.get("SEGPIPE_SCHEDULE") or DEFAULT_SCHEDULE,
            trainer_image=os.environ.get("SEGPIPE_TRAINER_IMAGE") or DEFAULT_TRAINER_IMAGE,
            relabel_image=os.environ.get("SEGPIPE_RELABEL_IMAGE") or DEFAULT_RELABEL_IMAGE,
            docker_network=os.environ.get("SEGPIPE_DOCKER_NETWORK") or None,
            docker_gpus=runner == "docker" and bool(gpu_ids_from_env()),
            default_dataset=os.environ.get("SEGPIPE_DEFAULT_DATASET")
            or f"s3://{bucket}/datasets/pets/latest",
            default_profile=profile,
            celery="CeleryExecutor" in conf.get("core", "executor", fallback=""),
        )

    @property
    def allow_local_paths(self) -> bool:
        # A container sees no host path: the docker runner takes s3:// locations only.
        return self.runner == "local"

    @property
    def location_pattern(self) -> str:
        return location_pattern(self.bucket, self.allow_local_paths)


def _variable(key: str) -> str | None:
    # Variable.get also reads AIRFLOW_VAR_<KEY>; only consulted when SEGPIPE_RUNNER is unset.
    return Variable.get(key, default=None)


def location_pattern(bucket: str, allow_local: bool) -> str:
    """JSON-schema pattern of a dataset / bad-mask location: s3://<bucket>/... or an absolute path.

    '..' is refused anywhere; local paths may hold any printable character (they reach the command
    as one inert argv item), s3 keys only [A-Za-z0-9._/-].
    """
    s3 = f"s3://{re.escape(bucket)}/[A-Za-z0-9._/-]+"
    local = r"|/[^\x00-\x1f\x7f]*" if allow_local else ""
    # (?!.*\n): Python's `$` also matches before a final newline.
    return rf"^(?!.*\.\.)(?!.*\n)(?:{s3}{local})$"


def safe_run_id(airflow_run_id: str) -> str:
    """Airflow run id -> artifact-key-safe run id, the same for every task of a run.

    `manual__2026-11-25T18:00:00+00:00` -> `manual__2026-11-25T18-00-00-00-00`.
    """
    key = _UNSAFE_KEY_CHARS.sub("-", airflow_run_id)
    if not key[:1].isalnum():
        key = "r" + key
    return key[:RUN_ID_MAX]


# ---------------------------------------------------------------- plans


def dataset_from_events(triggering_asset_events: Mapping[Any, Sequence[Any]] | None) -> str | None:
    """The dataset location a producer named in the newest triggering asset event (extra.dataset)."""
    events = [event for seq in (triggering_asset_events or {}).values() for event in seq]
    named = [event for event in events if (event.extra or {}).get("dataset")]
    if not named:
        return None
    return max(named, key=lambda event: event.timestamp).extra["dataset"]


def build_plan(p: Mapping[str, Any], airflow_run_id: str) -> dict[str, Any]:
    """Every stage's argument list for one run (`python -m tasks` + these items).

    `p` are params validated by the DAG's schema: each value becomes one argv item (never parsed by a
    shell), choices come from enums and locations start with '/' or 's3://', so none reads as an option.
    """
    run_id = safe_run_id(airflow_run_id)
    dataset = p["dataset"]
    recorded = {**p, "airflow_run_id": airflow_run_id}
    recompute = set(p.get("recompute") or ())
    flag = {s: ["--recompute"] if {s, RECOMPUTE_ALL} & recompute else [] for s in RECOMPUTE_STAGES}
    relabel = ["relabel", "--run-id", run_id, "--dataset", dataset, "--strategy", p["relabel_strategy"]]
    relabel += flag["relabel"]
    if p["bad_masks"] is not None:
        relabel += ["--bad-masks", p["bad_masks"]]
    select = ["select", "--run-id", run_id, "--gate", str(p["quality_gate"])]
    select += ["--experiments", ",".join(p["experiments"])]
    # approval required: select decides and reports (pending); `promote` (select again, with the
    # approval's answer from approval_command) promotes once a person approved.
    approval = p["approval"] == APPROVAL_REQUIRED and p["promote"]
    promote = list(select)
    if not p["promote"]:
        select.append("--no-promote")
    elif approval:
        select += ["--approval", "pending"]
    experiments = []
    for name in p["experiments"]:
        # "--experiment NAME" first: the DAG's map_index_template labels mapped tasks with item 2.
        train = ["train", "--experiment", name, "--run-id", run_id, "--dataset", dataset]
        train += ["--profile", p["profile"], *flag["train"]]
        if p["max_epochs"] is not None:
            train += ["--max-epochs", str(p["max_epochs"])]
        if p.get("cfg_options"):  # last: --cfg-options takes every item after it
            train += ["--cfg-options", *(f"{key}={value}" for key, value in p["cfg_options"].items())]
        evaluate = ["evaluate", "--experiment", name, "--run-id", run_id, "--split", "test"]
        evaluate += ["--dataset", dataset, *flag["evaluate"]]
        experiments.append({"name": name, "train": train, "evaluate": evaluate, "device_requests": None})
    return {
        "run_id": run_id,
        "validate": ["validate", dataset, "--run-id", run_id, "--params-json", json.dumps(recorded)],
        "eda": ["eda", "--run-id", run_id, "--dataset", dataset, *flag["eda"]],
        "relabel": relabel,
        "experiments": experiments,
        "select": select,
        "approval": approval,
        "promote": promote,
    }


def gpu_ids_from_env() -> list[str]:
    """SEGPIPE_GPU_IDS='0,1,2,3' (default '0'): the GPU ids docker may hand to trainings.

    SEGPIPE_GPU_IDS=none: a docker host without GPUs (no device request at all; the stages run on CPU).
    """
    value = os.environ.get("SEGPIPE_GPU_IDS") or "0"
    if value.strip().lower() == NO_GPUS:
        return []
    ids = [i.strip() for i in value.split(",") if i.strip()]
    if not ids or not all(re.fullmatch(r"[A-Za-z0-9-]+", i) for i in ids):
        raise ValueError(f"SEGPIPE_GPU_IDS={os.environ.get('SEGPIPE_GPU_IDS')!r}: expected e.g. '0,1,2,3'")
    return ids


def gpu_request(device_ids: list[str] | None = None) -> dict[str, Any]:
    """A docker-py DeviceRequest as the plain dict it is (JSON-safe for XCom).

    DeviceRequest subclasses dict with API-cased keys (Driver, Count, DeviceIDs, ...), and docker-py's
    create_host_config rebuilds a DeviceRequest from such a dict, so the plain dict round-trips.
    """
    if device_ids:
        return dict(DeviceRequest(device_ids=device_ids, capabilities=[["gpu"]]))
    return dict(DeviceRequest(count=1, capabilities=[["gpu"]]))


def assign_gpus(experiments: list[dict[str, Any]], gpu_ids: list[str]) -> list[dict[str, Any]]:
    """One GPU per experiment, round-robin: parallel trainings on one host get different GPUs.

    No GPU ids (a docker host without GPUs): no device request, the specs as planned.
    """
    if not gpu_ids:
        return experiments
    return [
        {**spec, "device_requests": [gpu_request([gpu_ids[index % len(gpu_ids)]])]}
        for index, spec in enumerate(experiments)
    ]


# ---------------------------------------------------------------- credentials at run time


def _connection(conn_id: str) -> Any | None:
    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None


def stage_environment() -> dict[str, str]:
    """S3 and ClearML settings for a stage, read when the task runs (never stored in the DAG).

    From the connection `segpipe_s3` (aws: login/password, extra endpoint_url, region_name) when it
    exists, else the worker's AWS_* variables; from `segpipe_clearml` (login/password = API keys,
    host = API server, extra web_host/files_host) when it exists, else the worker's CLEARML_*.
    """
    env = {"SEGPIPE_BUCKET": os.environ.get("SEGPIPE_BUCKET") or DEFAULT_BUCKET}
    if s3 := _connection(S3_CONN_ID):
        extra = s3.extra_dejson
        env |= {"AWS_ACCESS_KEY_ID": s3.login or "", "AWS_SECRET_ACCESS_KEY": s3.password or ""}
        if endpoint := extra.get("endpoint_url"):
            env["AWS_ENDPOINT_URL"] = endpoint
        if region := extra.get("region_name"):
            env["AWS_DEFAULT_REGION"] = region
    else:
        env |= {key: value for key, value in os.environ.items() if key.startswith("AWS_")}
    if clearml := _connection(CLEARML_CONN_ID):
        extra = clearml.extra_dejson
        scheme = clearml.schema or "http"
        port = f":{clearml.port}" if clearml.port else ""
        env |= {
            "CLEARML_API_HOST": extra.get("api_host") or f"{scheme}://{clearml.host}{port}",
            "CLEARML_API_ACCESS_KEY": clearml.login or "",
            "CLEARML_API_SECRET_KEY": clearml.password or "",
        }
        env |= {f"CLEARML_{key.upper()}": extra[key] for key in ("web_host", "files_host") if key in extra}
    else:
        # tasks.tracking runs offline unless these name a server.
        env |= {key: value for key, value in os.environ.items() if key.startswith("CLEARML_")}
    return env


# ---------------------------------------------------------------- runners


def stage_failure(step: str, code: int) -> AirflowException:
    """What fails a stage task whose command exited with a non-zero code, for both runners: exit 2 or
    3 (NO_RETRY_EXIT_CODES) fails without retry, any other code lets Airflow retry."""
    if code in NO_RETRY_EXIT_CODES:
        return AirflowFailException(f"{step} exited {code} ({NO_RETRY_EXIT_CODES[code]}): not retried")
    return AirflowException(f"{step} exited {code}")


def docker_exit_code(err: DockerContainerFailedException) -> int | None:
    """The container's exit code in DockerOperator's failure (None if its message has none)."""
    found = _DOCKER_STATUS_CODE.search(str(err))
    return int(found.group(1)) if found else None


def _check_command(command: Any) -> list[str]:
    if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
        raise AirflowFailException(f"a stage command must be a non-empty list of strings, got {command!r}")
    return command


class LocalStageOperator(BaseOperator):
    """`python -m tasks <command...>` as a subprocess of the worker, its output streamed to the log.

    Exit 2 (bad input) and 3 (quality gate) fail the task without retry; any other non-zero exit
    fails it and lets Airflow retry.
    """

    template_fields: Sequence[str] = ("command",)
    ui_color = "#e8f4e8"

    def __init__(self, *, command: list[str] | Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.command = command
        self._proc: subprocess.Popen | None = None

    def execute(self, context: Any) -> None:
        argv = [sys.executable, "-m", "tasks", *_check_command(self.command)]
        self.log.info("running: %s", shlex.join(argv))
        self._proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **stage_environment()},
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: a timeout or kill stops all of it
        )
        try:
            for line in self._proc.stdout:
                self.log.info("%s", line.rstrip())
            code = self._proc.wait()
        finally:
            self._stop()
        if code != 0:
            raise stage_failure(argv[3], code)

    def _stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()

    def on_kill(self) -> None:
        self._stop()


class DockerStageOperator(DockerOperator):
    """DockerOperator for one stage: credentials and GPUs resolved when the task runs.

    `device_requests` is made templated so a planned, per-experiment value (an XComArg or a mapped
    task group argument) reaches docker; credentials go to `private_environment`, which is neither
    templated nor rendered in the UI. A container's exit code fails the task as the local runner's
    does (`stage_failure`: 2 and 3 without retry).
    """

    template_fields: Sequence[str] = (*DockerOperator.template_fields, "device_requests")

    def execute(self, context: Any) -> Any:
        env = {k: v for k, v in stage_environment().items() if k not in WORKER_PATH_VARIABLES}
        self._private_environment = {**self._private_environment, **env}
        try:
            return super().execute(context)
        except DockerContainerFailedException as err:
            code = docker_exit_code(err)
            if code is None:
                raise  # no exit code to judge by: Airflow's default, a retry
            raise stage_failure(_check_command(self.command)[0], code) from err


def stage_operator(
    settings: Settings,
    task_id: str,
    command: Any,
    *,
    image: str,
    gpu: bool = False,
    device_requests: Any = None,
    **kwargs: Any,
) -> BaseOperator:
    """The operator that runs one stage command with the configured runner.

    A GPU stage takes a slot of the `gpu` pool (slots = GPUs) and goes to the Celery `gpu` queue with
    the docker runner or the CeleryExecutor (GPU hosts). docker: it asks for `device_requests`
    (default: any one GPU; none on a host without GPUs, SEGPIPE_GPU_IDS=none), and containers are named
    per run, task, map index and try (a retry never collides with the container a failed try left behind).
    """
    if gpu and (settings.runner == "docker" or settings.celery):
        kwargs |= {"pool": GPU_POOL, "queue": GPU_POOL}
    if settings.runner == "local":
        return LocalStageOperator(task_id=task_id, command=command, **kwargs)
    return DockerStageOperator(
        task_id=task_id,
        command=command,
        image=image,
        container_name=CONTAINER_NAME,
        # Removed when it exits, whatever the outcome (its output is in the task log): what the
        # provider's "success" does too (apache-airflow-providers-docker 4.6.1 removes in a `finally`),
        # "force" says so and also removes it when Airflow kills the task. Names are per try anyway.
        auto_remove="force",
        mount_tmp_dir=False,
        network_mode=settings.docker_network,
        device_requests=(device_requests or [gpu_request()]) if gpu and settings.docker_gpus else None,
        **kwargs,
    )


# Docker container names allow [a-zA-Z0-9][a-zA-Z0-9_.-]: run ids go through safe_run_id.
CONTAINER_NAME = (
    "segpipe-{{ run_id | segpipe_key }}-{{ ti.task_id }}"
    "{{ '-%d' % ti.map_index if ti.map_index >= 0 else '' }}-try{{ ti.try_number }}"
)


# ---------------------------------------------------------------- approval and the run's objects


def approval_command(promote: list[str], response: Mapping[str, Any]) -> list[str]:
    """The promote step's argv from the approval request's answer (HITLOperator's return value).

    Approve -> `--approval approved --responder NAME`; Reject -> `rejected`; the timeout's default
    (Reject with no responder: Airflow answers for nobody) -> `timed-out`.
    """
    chosen = list(response.get("chosen_options") or [])
    user = response.get("responded_by_user") or None
    if chosen == [APPROVE] and user:
        status = "approved"
    elif chosen == [REJECT]:
        status = "rejected" if user else "timed-out"
    else:
        raise AirflowFailException(f"unexpected approval answer {chosen!r} by {user!r}")
    command = [*promote, "--approval", status]
    if user:
        command += ["--responder", str(user.get("name") or user.get("id"))]
    return command


class RunObjects:
    """Read-only view of one run's objects, runs/<key-safe run id>/, with the stages' S3 settings."""

    def __init__(self, airflow_run_id: str):
        # boto3 when a run's objects are read (a task, a page), not when the DAG file is parsed.
        import boto3
        from botocore.config import Config

        env = stage_environment()
        self.bucket = env["SEGPIPE_BUCKET"]
        self.prefix = f"runs/{safe_run_id(airflow_run_id)}/"
        endpoint = env.get("AWS_ENDPOINT_URL") or None
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            # MinIO and moto behind a plain host:port need path-style addressing (as tasks/store.py).
            config=Config(s3={"addressing_style": "path" if endpoint else "auto"}),
            aws_access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
            aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            region_name=env.get("AWS_DEFAULT_REGION") or None,
        )

    def list(self) -> list[tuple[str, int]]:
        """(key relative to the run's prefix, size) of every object, sorted."""
        found = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            found += [(obj["Key"][len(self.prefix) :], obj["Size"]) for obj in page.get("Contents", [])]
        return sorted(found)

    def open(self, key: str) -> dict[str, Any] | None:
        """boto3's get_object answer (Body, ContentLength, ...), None if there is no such object."""
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def read(self, key: str, limit: int = 32 * 1024 * 1024) -> bytes | None:
        obj = self.open(key)
        if obj is None:
            return None
        try:
            return obj["Body"].read(limit)
        finally:
            obj["Body"].close()
