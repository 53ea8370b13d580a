"""The DAG's params: the form's JSON schema refuses bad values before a run exists; values that pass
reach the stages as inert argument-list items (no shell, no template, no option injection)."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException, ParamValidationError
from airflow.sdk.execution_time.comms import AssetEventDagRunReferenceResult
from airflow.sdk.execution_time.context import TriggeringAssetEventsAccessor
from conftest import subprocess_env
from test_dag import AIRFLOW_RUN_ID, DOCKER_ENV, ROOT, parse_dag, plan_xcoms, render, run_params, runners

from tasks import cli, experiments, overrides, relabel, store, train
from tasks.errors import InputError

BAD_CONFS = {
    "unknown experiment": {"experiments": ["h1", "h3"]},
    "no experiment": {"experiments": []},
    "duplicate experiment": {"experiments": ["h1", "h1"]},
    "experiments not a list": {"experiments": "h1"},
    "gate above 1": {"quality_gate": 1.5},
    "gate of 1 (select refuses it: nothing can exceed it)": {"quality_gate": 1},
    "gate below 0": {"quality_gate": -0.1},
    "gate not a number": {"quality_gate": "high"},
    "unknown profile": {"profile": "gpu"},
    "zero epochs": {"max_epochs": 0},
    "epochs as text": {"max_epochs": "3"},
    "unknown relabel strategy": {"relabel_strategy": "sam3"},
    "promote as text": {"promote": "yes"},
    "s3 path traversal": {"dataset": "s3://segmentation/datasets/../../etc"},
    "local path traversal": {"dataset": "/data/pets/../../etc"},
    "other bucket": {"dataset": "s3://someone-elses-bucket/datasets/pets"},
    "relative path": {"dataset": "data/pets"},
    "option-looking dataset": {"dataset": "--help"},
    "bucket only": {"dataset": "s3://segmentation/"},
    "traversal in bad-mask list": {"bad_masks": "/data/../etc/passwd"},
    "newline in dataset": {"dataset": "/data/pets\n--max-epochs"},
    "trailing newline": {"dataset": "s3://segmentation/datasets/pets\n"},
    "cfg options not an object": {"cfg_options": ["train_cfg.val_interval=1"]},
    "cfg option value not a string": {"cfg_options": {"train_cfg.val_interval": 1}},
    "option-looking cfg option key": {"cfg_options": {"--max-epochs": "9"}},
    "cfg option key with a space": {"cfg_options": {"train_cfg val_interval": "1"}},
    "empty cfg option key part": {"cfg_options": {"train_cfg..val_interval": "1"}},
    "newline in cfg option key": {"cfg_options": {"train_cfg.val_interval\n": "1"}},
    "newline in cfg option value": {"cfg_options": {"train_cfg.val_interval": "1\n--max-epochs"}},
    "cfg option running a command": {"cfg_options": {"default_hooks.timer.type": "subprocess.Popen"}},
    "cfg option importing a module": {"cfg_options": {"custom_imports.imports": "[somemodule]"}},
    "cfg option outside the allow-list": {"cfg_options": {"model.backbone.depth": "101"}},
    "cfg option of the wrong kind": {"cfg_options": {"train_cfg.val_interval": "often"}},
}
# Absolute, no '..': the schema lets it through, so it must stay one inert argument.
HOSTILE = (
    "/tmp/x; touch {out}/semicolon $(touch {out}/subshell) `touch {out}/backtick` | tee {out}/pipe"
    " && echo {{{{ 7*7 }}}} > {out}/template"
)


@pytest.fixture()
def dag(monkeypatch: pytest.MonkeyPatch) -> Any:
    return parse_dag(monkeypatch)


@pytest.mark.parametrize("case", sorted(BAD_CONFS))
def test_schema_refuses_bad_values(dag: Any, case: str) -> None:
    with pytest.raises(ParamValidationError):
        run_params(dag, **BAD_CONFS[case])


def test_schema_accepts_the_defaults_and_a_full_conf(dag: Any) -> None:
    defaults = run_params(dag)
    assert defaults == {
        "dataset": "s3://segmentation/datasets/pets/latest",
        "experiments": ["h1", "h2", "exp1", "exp2"],
        "profile": "full",
        "max_epochs": None,
        "cfg_options": None,
        "relabel_strategy": "auto",
        "bad_masks": None,
        "quality_gate": 0.75,
        "promote": True,
        "approval": "none",
        "recompute": [],
    }
    conf = {
        "dataset": "/data/pets v2",
        "experiments": ["exp2", "h1"],
        "profile": "cpu",
        "max_epochs": 3,
        "cfg_options": {"train_cfg.val_interval": "1", "model.decode_head.dilations": "(1, 2, 4, 8)"},
        "relabel_strategy": "morphology",
        "bad_masks": "s3://segmentation/datasets/pets/bad_mask_paths.json",
        "quality_gate": 0.8,
        "promote": False,
        "approval": "required",  # nothing to approve without promotion: select stays --no-promote
        "recompute": [],
    }
    assert run_params(dag, **conf) == conf
    plan = plan_xcoms(dag, run_params(dag, **conf))
    assert plan[("plan", "select")] == [
        "select",
        "--run-id",
        "manual__2026-11-25T18-00-00-00-00",
        "--gate",
        "0.8",
        "--experiments",
        "exp2,h1",
        "--no-promote",
    ]
    # every training gets the overrides, each one argv item KEY=VALUE, after --cfg-options (last)
    for spec in plan[("plan_experiments", "return_value")]:
        assert spec["train"][-7:] == [
            "--profile",
            "cpu",
            "--max-epochs",
            "3",
            "--cfg-options",
            "train_cfg.val_interval=1",
            "model.decode_head.dilations=(1, 2, 4, 8)",
        ]
        parsed = overrides.parse_items(spec["train"][-2:])  # as the stage reads them
        assert parsed == {"train_cfg.val_interval": 1, "model.decode_head.dilations": (1, 2, 4, 8)}
    # no overrides (null or {}): no --cfg-options at all
    for cfg_options in (None, {}):
        plan = plan_xcoms(dag, run_params(dag, cfg_options=cfg_options))
        assert all("--cfg-options" not in s["train"] for s in plan[("plan_experiments", "return_value")])


def test_docker_runner_takes_s3_locations_only(monkeypatch: pytest.MonkeyPatch) -> None:
    dag = parse_dag(monkeypatch, **DOCKER_ENV)
    with pytest.raises(ParamValidationError):
        run_params(dag, dataset="/data/pets")
    assert run_params(dag, dataset="s3://segmentation/datasets/pets/v3")["dataset"].endswith("/v3")


def test_shell_metacharacters_and_templates_stay_inert(
    dag: Any, s3_env: dict[str, str], tmp_path: Path
) -> None:
    hostile = HOSTILE.format(out=tmp_path)
    params = run_params(dag, dataset=hostile, bad_masks=hostile)
    xcoms = plan_xcoms(dag, params)
    # One argv item each, exactly as given, in the position of a value (never an option).
    eda = render(dag.get_task("eda"), xcoms)["command"]
    assert eda == ["eda", "--run-id", "manual__2026-11-25T18-00-00-00-00", "--dataset", hostile]
    relabel_cmd = render(dag.get_task("relabel"), xcoms)["command"]
    assert relabel_cmd[relabel_cmd.index("--bad-masks") + 1] == hostile
    assert "echo {{ 7*7 }}" in eda[-1] and "echo 49" not in json.dumps(eda)  # never rendered

    # Run for real: the stage gets the literal path, says it is not a dataset, and nothing executes.
    validate = render(dag.get_task("validate"), xcoms)["command"]
    assert validate[1] == hostile
    with pytest.raises(AirflowFailException, match="exited 2"):
        runners.LocalStageOperator(task_id="validate", command=validate).execute({})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _asset_events(dataset: str) -> TriggeringAssetEventsAccessor:
    asset = {"name": "segpipe_dataset", "uri": "s3://segmentation/datasets/pets/latest", "extra": {}}
    event = AssetEventDagRunReferenceResult(
        asset=asset,
        extra={"dataset": dataset, "from_rest_api": True},
        source_task_id=None,
        source_dag_id=None,
        source_run_id=None,
        source_map_index=None,
        source_aliases=[],
        timestamp=datetime(2026, 11, 25, 18, tzinfo=UTC),
    )
    return TriggeringAssetEventsAccessor.build([event])


def test_asset_event_names_the_dataset_and_is_validated_too(dag: Any) -> None:
    plan = dag.get_task("plan").python_callable
    context = {"params": run_params(dag), "run_id": "asset_triggered__2026-11-25T18:00:00+00:00"}
    commands = plan(**context, triggering_asset_events=_asset_events("s3://segmentation/datasets/pets/v7"))
    assert commands["eda"][-1] == "s3://segmentation/datasets/pets/v7"
    assert commands["run_id"] == "asset_triggered__2026-11-25T18-00-00-00-00"
    with pytest.raises(
        AirflowFailException, match="asset event dataset 's3://segmentation/datasets/../x' refused"
    ):
        plan(**context, triggering_asset_events=_asset_events("s3://segmentation/datasets/../x"))


@pytest.mark.parametrize(
    "airflow_run_id",
    [
        AIRFLOW_RUN_ID,
        "scheduled__2026-11-30T03:00:00+00:00",
        "asset_triggered__2026-11-25T18:00:00.123456+00:00",
        "_my run/with:odd chars é",
        "x" * 250,
    ],
)
def test_run_ids_are_key_safe_and_stable(airflow_run_id: str) -> None:
    run_id = runners.safe_run_id(airflow_run_id)
    assert store.check_run_id(run_id) == run_id
    assert runners.safe_run_id(airflow_run_id) == run_id


def test_choices_match_the_stage_clis() -> None:
    assert experiments.names() == runners.EXPERIMENTS  # one source: the files under configs/
    assert runners.PROFILES == train.PROFILES
    assert runners.RELABEL_STRATEGIES == relabel.STRATEGIES


def test_the_form_accepts_exactly_the_cfg_options_the_train_cli_accepts(dag: Any) -> None:
    """One rule (tasks.overrides): the params schema is generated from the list the CLI checks."""
    from test_train import REFUSED_CFG_OPTIONS

    good = ["optim_wrapper.type=AmpOptimWrapper", "custom_hooks.0.min_delta=0.5", "randomness.seed=7"]
    items = good + [item for _, item, _ in REFUSED_CFG_OPTIONS if "=" in item]
    for item in items:
        key, _, value = item.partition("=")
        try:
            run_params(dag, cfg_options={key: value})
            form = True
        except ParamValidationError:
            form = False
        try:
            overrides.parse_items([item])
            cli_accepts = True
        except InputError:
            cli_accepts = False
        assert form == cli_accepts, item
    assert all(overrides.parse_items([item]) for item in good)


@pytest.mark.parametrize("gate", [-0.1, 0, 0.5, 0.999, 1, 1.5])
def test_a_gate_the_form_accepts_is_one_select_accepts(
    dag: Any, s3_env: dict, gate: float, capsys: pytest.CaptureFixture
) -> None:
    try:
        run_params(dag, quality_gate=gate)
        form = True
    except ParamValidationError:
        form = False
    # select with an accepted gate goes on (and finds no experiment: exit 1); a refused one exits 2
    code = cli.main(["select", "--run-id", "r1", "--gate", str(gate), "--experiments", "h1"])
    assert code in (1, 2)
    assert form == (code == 1), capsys.readouterr().err
    assert form == (0 <= gate < 1)


@pytest.mark.slow
def test_airflow_refuses_a_bad_conf_before_any_task_runs(tmp_path: Path) -> None:
    env = subprocess_env(AIRFLOW_HOME=str(tmp_path / "airflow"), SEGPIPE_RUNNER="local")
    conf = json.dumps({"experiments": ["h1", "h9"]})
    result = subprocess.run(
        [
            "bash",
            str(ROOT / "infra" / "airflow_local.sh"),
            "dags",
            "test",
            "segmentation_pipeline",
            "-c",
            conf,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "ParamValidationError" in output and "h9" in output
    assert "Task started" not in output and "running: " not in output
