"""segmentation_pipeline: validate -> eda -> relabel -> train x N -> evaluate x N -> select.

Wiring only: each stage task runs one `python -m tasks <step> ...` command line that `plan` builds
from the validated params (argument lists, never shell strings); segpipe_runners decides how it runs
(SEGPIPE_RUNNER=local: a subprocess of the worker; docker: a container of the stage image).
Each experiment is one instance of the mapped task group `experiment` (train -> evaluate), so a
failed experiment stops only its own evaluation; `experiments_done` lets `select` run once every
experiment is done and at least one evaluation succeeded (select reports the failed ones).

Runs: weekly by cron (SEGPIPE_SCHEDULE; `off` keeps only the asset trigger), whenever a producer
updates the dataset Asset, or by hand (UI form, `airflow dags test`, REST API) with the params below.
"""

from __future__ import annotations

import copy
from datetime import datetime, timedelta
from typing import Any

import segpipe_runners as runners
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import (
    DAG,
    Asset,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    TriggerRule,
    task,
    task_group,
)
from airflow.sdk.exceptions import AirflowFailException, ParamValidationError

from tasks import overrides

SETTINGS = runners.Settings.from_env()
LOCATION = SETTINGS.location_pattern


def _asset_uri(location: str) -> str:
    return location if location.startswith("s3://") else f"file://{location}"


# A producer that publishes a new dataset version emits an event for this asset (an outlet in its
# DAG, or POST /api/v2/assets/events); extra {"dataset": "<location>"} names the version to train on.
DATASET_ASSET = Asset(name="segpipe_dataset", uri=_asset_uri(SETTINGS.default_dataset))


def _schedule(cron: str) -> Any:
    """Runs on the cron (UTC) or when the dataset asset is updated; SEGPIPE_SCHEDULE=off: asset only.

    With catchup off, unpausing the DAG starts the most recent cron tick's run at once (Airflow's rule).
    """
    if cron == "off":
        return [DATASET_ASSET]
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=[DATASET_ASSET])


# Per-stage limits for the full profile on one GPU (the CPU profile of the demo stays far below).
TIMEOUTS = {
    "validate": timedelta(minutes=30),
    "eda": timedelta(minutes=30),
    "relabel": timedelta(hours=2),
    "train": timedelta(hours=8),
    "evaluate": timedelta(hours=1),
    "select": timedelta(minutes=30),
    "promote": timedelta(minutes=30),
}
# How long an approval request waits for a person; then its default, Reject, applies.
APPROVAL_TIMEOUT = timedelta(days=3)
DEFAULT_ARGS = {
    "owner": "segpipe",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,  # 30 s, 60 s, ... capped below
    "max_retry_delay": timedelta(minutes=10),
}

PARAMS = {
    "dataset": Param(
        SETTINGS.default_dataset,
        type="string",
        pattern=LOCATION,
        title="Dataset location",
        description=(
            f"s3://{SETTINGS.bucket}/<prefix> of a dataset in the study's layout"
            + (" or an absolute local directory" if SETTINGS.allow_local_paths else "")
            + "; '..' is not allowed."
        ),
    ),
    "experiments": Param(
        list(runners.DEFAULT_EXPERIMENTS),
        type="array",
        items={"type": "string", "enum": list(runners.EXPERIMENTS)},
        minItems=1,
        uniqueItems=True,
        title="Experiments",
        description="Which experiments to train (in parallel, one GPU each), one per file under configs/: "
        + "; ".join(f"{e.name}: {e.hypothesis}" for e in runners.experiments.catalogue().values())
        + ".",
    ),
    "profile": Param(
        SETTINGS.default_profile,
        type="string",
        enum=list(runners.PROFILES),
        title="Profile",
        description="full: the study's schedules (GPU); cpu: shrunk schedules for a CPU-only demo.",
    ),
    "max_epochs": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        title="Max epochs",
        description="Override every experiment's epoch count (empty: the profile's own).",
    ),
    "cfg_options": Param(
        None,
        # tasks.overrides' rule itself: exactly the keys and values `train --cfg-options` accepts
        **overrides.cfg_options_schema(),
        title="Config overrides",
        description=(
            "mmseg config overrides for every training (`--cfg-options`), values only, e.g. "
            '{"train_cfg.val_interval": "1", "optim_wrapper.optimizer.lr": "0.005"}; empty: none. '
            "Allowed keys: " + ", ".join(overrides.ALLOWED) + "."
        ),
    ),
    "relabel_strategy": Param(
        "auto",
        type="string",
        enum=list(runners.RELABEL_STRATEGIES),
        title="Relabel strategy",
        description=(
            "yolo_sam2: YOLOv8 boxes -> SAM2 masks; morphology: weights-free; auto: the best available."
        ),
    ),
    "bad_masks": Param(
        None,
        type=["null", "string"],
        pattern=LOCATION,
        title="Bad-mask list",
        description=(
            "JSON list of train masks known to be bad (like the study's bad_mask_paths.json), "
            "s3:// or absolute path; empty: only the masks EDA scores as suspicious."
        ),
    ),
    "quality_gate": Param(
        overrides.DEFAULT_GATE,
        **overrides.GATE_SCHEMA,  # select's own bounds (tasks.overrides.check_gate)
        title="Quality gate",
        description="The winner's test mDice (a fraction in [0, 1)) must exceed it to be promoted.",
    ),
    "recompute": Param(
        [],
        type="array",
        items={"type": "string", "enum": [runners.RECOMPUTE_ALL, *runners.RECOMPUTE_STAGES]},
        uniqueItems=True,
        title="Recompute",
        description=(
            "Stages to compute again although this run or an earlier one published outputs for the same "
            "inputs, config and code (the cross-run cache): all, or any of "
            + ", ".join(runners.RECOMPUTE_STAGES)
            + "; empty: reuse what is cached."
        ),
    ),
    "promote": Param(
        True,
        type="boolean",
        title="Promote",
        description="Promote a winner that passes the gate to production (champion/challenger).",
    ),
    "approval": Param(
        "none",
        type="string",
        enum=list(runners.APPROVALS),
        title="Approval",
        description=(
            "required: a person approves the promotion under Required Actions (the request shows the "
            f"comparison, the gate and the champion decision); Reject, or no answer within "
            f"{APPROVAL_TIMEOUT.days} days, promotes nothing. none: promote without asking."
        ),
    ),
}


def _plan(params: Any, run_id: str | None, triggering_asset_events: Any) -> dict[str, Any]:
    if not run_id:
        raise AirflowFailException("no run_id in the task context")
    params = dict(params)
    if dataset := runners.dataset_from_events(triggering_asset_events):
        # Not a param of this run's conf: validate it with the same schema before it is used.
        try:
            params["dataset"] = copy.copy(PARAMS["dataset"]).resolve(dataset)
        except ParamValidationError as err:
            raise AirflowFailException(f"asset event dataset {dataset!r} refused: {err}") from err
    return runners.build_plan(params, run_id)


with DAG(
    dag_id=runners.DAG_ID,
    description=__doc__.splitlines()[0],
    schedule=_schedule(SETTINGS.schedule),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    user_defined_filters={"segpipe_key": runners.safe_run_id},
    tags=["segmentation", "mmseg", SETTINGS.runner],
    doc_md=__doc__,
) as dag:
    # Plans take Airflow's context by keyword (params, run_id, triggering_asset_events); a plan
    # error fails the run before any stage, without retry.
    @task(multiple_outputs=True, retries=0)
    def plan(
        params: Any = None, run_id: str | None = None, triggering_asset_events: Any = None
    ) -> dict[str, Any]:
        """Every stage's command line, from the validated params (and an asset event's dataset)."""
        return _plan(params, run_id, triggering_asset_events)

    @task(retries=0)
    def plan_experiments(
        params: Any = None, run_id: str | None = None, triggering_asset_events: Any = None
    ) -> list[dict[str, Any]]:
        """One spec per experiment (train and evaluate commands; docker: its own GPU, round-robin)."""
        experiments = _plan(params, run_id, triggering_asset_events)["experiments"]
        if SETTINGS.runner == "docker":
            return runners.assign_gpus(experiments, runners.gpu_ids_from_env())
        return experiments

    def stage(task_id: str, command: Any, **kwargs: Any) -> Any:
        image = SETTINGS.relabel_image if task_id == "relabel" else SETTINGS.trainer_image
        return runners.stage_operator(
            SETTINGS, task_id, command, image=image, execution_timeout=TIMEOUTS[task_id], **kwargs
        )

    @task_group(group_id="experiment")
    def experiment(train: list[str], evaluate: list[str], device_requests: Any) -> None:
        # Both commands start with [step, "--experiment", NAME]: label mapped instances by NAME.
        label = "{{ task.command[2] }}"
        trained = stage("train", train, gpu=True, device_requests=device_requests, map_index_template=label)
        trained >> stage("evaluate", evaluate, map_index_template=label)

    # approval: required. Otherwise approval_request short-circuits: it and everything after are skipped.
    @task.short_circuit(retries=0)
    def approval_request(needed: bool, run_id: str | None = None) -> str | bool:
        """The request's body: select's report.md (comparison table, gate, champion decision)."""
        if not needed:
            return False
        report = runners.RunObjects(run_id).read("report.md")
        if report is None:
            raise AirflowFailException(f"run {run_id}: select published no report.md")
        return report.decode(errors="replace")

    # Airflow's human-in-the-loop request (listed under Required Actions); Reject on timeout.
    approve = HITLOperator(
        task_id="approve",
        subject="Promote the winner of run {{ run_id }}?",
        body="{{ ti.xcom_pull(task_ids='approval_request') }}",
        options=[runners.APPROVE, runners.REJECT],
        defaults=[runners.REJECT],
        response_timeout=APPROVAL_TIMEOUT,
        retries=0,
    )

    @task(retries=0)
    def approval_outcome(promote: list[str], response: dict[str, Any]) -> list[str]:
        """Who answered what -> select's promote step (approved: promotes; rejected, timed out: not)."""
        return runners.approval_command(promote, response)

    commands = plan()
    experiments = plan_experiments()
    (
        commands
        >> stage("validate", commands["validate"])
        >> stage("eda", commands["eda"])
        >> stage("relabel", commands["relabel"], gpu=True)
        >> experiments
        >> experiment.expand_kwargs(experiments)
        # The join holds the trigger rule: select itself also depends on `plan` (its command), and a
        # success there must not count as "one experiment succeeded".
        >> EmptyOperator(task_id="experiments_done", trigger_rule=TriggerRule.ALL_DONE_MIN_ONE_SUCCESS)
        >> stage("select", commands["select"])
        >> approval_request(commands["approval"])
        >> approve
        >> stage("promote", approval_outcome(commands["promote"], approve.output))
    )
