"""Approval before promotion (the DAG's `approval: required`): Airflow's own human-in-the-loop request.

select decides and reports without promoting ("awaiting approval"); the request (HITLOperator) shows
select's report; the answer decides: approve -> promote, reject or timeout -> nothing promoted;
winner.json and report.md say which and who. The last test runs it all on Airflow as deployed: the
request appears under Required Actions in a real browser, a REST answer approves, the run promotes.
"""

# Fixtures are imported from the tests they come from, and tests take them by name (F811).
# ruff: noqa: F811

from __future__ import annotations

import time
import urllib.parse
from pathlib import Path

import pytest
from browser import browser_page, screenshot_path
from test_airflow_rest import DAG_ID, Airflow, airflow, dataset  # noqa: F401 - fixtures
from test_dag import runners
from test_selection import Run, config_texts, production_weights, run, store  # noqa: F401 - fixtures

from tasks import models
from tasks import store as st

PROMOTE = ["select", "--run-id", "r1", "--gate", "0.75", "--experiments", "h1"]
ALICE = {"id": "alice", "name": "alice"}


def test_the_answer_becomes_the_promote_steps_arguments() -> None:
    approve = {"chosen_options": [runners.APPROVE], "responded_by_user": ALICE}
    reject = {"chosen_options": [runners.REJECT], "responded_by_user": ALICE}
    timeout = {"chosen_options": [runners.REJECT], "responded_by_user": None}  # the default, nobody's
    assert runners.approval_command(PROMOTE, approve)[-4:] == [
        "--approval",
        "approved",
        "--responder",
        "alice",
    ]
    assert runners.approval_command(PROMOTE, reject)[-4:] == [
        "--approval",
        "rejected",
        "--responder",
        "alice",
    ]
    assert runners.approval_command(PROMOTE, timeout)[len(PROMOTE) :] == ["--approval", "timed-out"]
    with pytest.raises(runners.AirflowFailException):
        runners.approval_command(PROMOTE, {"chosen_options": ["Maybe"], "responded_by_user": ALICE})


def test_plan_with_approval_decides_first_and_promotes_after_the_answer() -> None:
    params = {
        "dataset": "s3://segmentation/datasets/pets/v1",
        "experiments": ["h1"],
        "profile": "cpu",
        "max_epochs": None,
        "cfg_options": None,
        "relabel_strategy": "morphology",
        "bad_masks": None,
        "quality_gate": 0.75,
        "promote": True,
        "approval": "required",
    }
    plan = runners.build_plan(params, "manual__1")
    assert plan["approval"] is True
    assert plan["select"] == [*plan["promote"], "--approval", "pending"]
    assert "--approval" not in plan["promote"] and "--no-promote" not in plan["promote"]
    assert runners.build_plan({**params, "approval": "none"}, "manual__1")["approval"] is False
    assert runners.build_plan({**params, "promote": False}, "manual__1")["approval"] is False


@pytest.mark.parametrize(
    ("answer", "decision"),
    [
        (["--approval", "rejected", "--responder", "bob"], "not promoted: rejected by bob"),
        (["--approval", "timed-out"], "not promoted: approval timed out"),
    ],
)
def test_pending_then_reject_or_timeout_promotes_nothing(
    run: Run, store: st.Store, answer: list[str], decision: str
) -> None:
    run.experiment("h1", 80.0, 70.0, test_mdice=85.0)
    assert run.select("--experiments", "h1", "--approval", "pending") == 0
    pending = run.winner()
    assert pending["promotion"]["decision"] == "awaiting approval (would replace the champion)"
    assert pending["approval"]["status"] == "pending" and pending["approval"]["by"] is None
    assert "## Approval" in run.report() and "**pending**" in run.report()
    assert production_weights(store) is None

    assert run.select("--experiments", "h1", *answer) == 0
    result = run.winner()
    assert result["promotion"]["decision"].startswith(decision)
    assert result["promotion"]["promoted"] is False
    assert result["approval"]["status"] == answer[1]
    assert decision in run.report()
    assert production_weights(store) is None
    assert models.read_production(store).version is None


def test_approved_promotes_and_says_who(run: Run, store: st.Store) -> None:
    run.experiment("h1", 80.0, 70.0, test_mdice=85.0)
    assert run.select("--experiments", "h1", "--approval", "pending") == 0
    assert run.select("--experiments", "h1", "--approval", "approved", "--responder", "alice") == 0
    result = run.winner()
    assert result["promotion"]["decision"] == "promoted (approved by alice)"
    assert result["promotion"]["promoted"] is True
    assert result["approval"]["by"] == "alice"
    assert "**approved** by alice" in run.report()
    assert production_weights(store) == (run.root / "run-1" / "train" / "h1" / "best.pth").read_bytes()


@pytest.mark.parametrize(
    "args",
    [
        ["--approval", "approved"],  # who approved?
        ["--approval", "rejected", "--responder", "bob\nevil"],
        ["--approval", "timed-out", "--responder", "bob"],  # nobody answered a timeout
        ["--responder", "bob"],
    ],
)
def test_bad_approval_arguments_exit_2(run: Run, store: st.Store, args: list[str]) -> None:
    run.experiment("h1", 80.0, 70.0, test_mdice=85.0)
    assert run.select("--experiments", "h1", *args) == 2
    assert not store.exists(st.winner_key(run.run_id))


@pytest.mark.slow
def test_the_request_appears_under_required_actions_and_approval_promotes(
    airflow: Airflow,
    dataset: Path,
    tmp_path: Path,
) -> None:
    airflow.login()
    airflow.wait_for(
        "the DAG to be parsed", lambda: airflow.request("GET", f"/api/v2/dags/{DAG_ID}")[0] == 200, 180
    )
    assert airflow.request("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})[0] == 200
    conf = {
        "dataset": str(dataset),
        "experiments": ["h1"],
        "profile": "cpu",
        "max_epochs": 1,
        "cfg_options": {"train_cfg.val_interval": "1"},
        "relabel_strategy": "morphology",
        "quality_gate": 0.0,
        "approval": "required",
    }
    run_id = "approval-1"
    status, body = airflow.request(
        "POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"dag_run_id": run_id, "logical_date": None, "conf": conf}
    )
    assert status == 200, body
    ti_path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances"

    def waiting() -> bool:
        run_state = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")[1]["state"]
        assert run_state in ("queued", "running"), f"{airflow.task_states(run_id)}\n{airflow.logs()}"
        return airflow.request("GET", f"{ti_path}/approve")[1].get("state") in ("awaiting_input", "deferred")

    started = time.monotonic()
    airflow.wait_for("the approval request", waiting, 900)
    print(f"approval requested after {time.monotonic() - started:.0f}s")
    bucket = st.Store.from_env()
    pending = bucket.get_json(st.winner_key(run_id))
    assert pending["promotion"]["decision"].startswith("awaiting approval")
    assert models.read_production(bucket).version is None

    with browser_page() as page:
        page.context.add_cookies(
            [{"name": "_token", "value": airflow.token, "url": f"http://127.0.0.1:{airflow.port}"}]
        )
        page.goto(
            f"http://127.0.0.1:{airflow.port}/dags/{DAG_ID}/runs/{urllib.parse.quote(run_id)}/required_actions"
        )
        page.get_by_text(f"Promote the winner of run {run_id}?").first.wait_for(timeout=120_000)
        page.get_by_text(f"Promote the winner of run {run_id}?").first.click()
        page.get_by_text("Comparison (validation split)").first.wait_for(timeout=60_000)
        assert page.get_by_text("Quality gate").count() and page.get_by_text("Champion / challenger").count()
        assert page.get_by_role("button", name=runners.APPROVE).count()
        page.wait_for_timeout(1000)
        page.screenshot(path=screenshot_path("approval_request.png", tmp_path))

    status, answer = airflow.request(
        "PATCH",
        f"{ti_path}/approve/-1/hitlDetails",
        {"chosen_options": [runners.APPROVE], "params_input": {}},
    )
    assert status == 200, answer
    finished = airflow.wait_for_run(run_id, timeout_s=600)
    states = airflow.task_states(run_id)
    assert finished["state"] == "success", f"{states}\n{airflow.logs()}"
    assert states["promote"] == [("success", None)]
    result = bucket.get_json(st.winner_key(run_id))
    assert result["promotion"]["promoted"] is True
    assert result["promotion"]["decision"] == "promoted (approved by admin)"
    assert result["approval"]["status"] == "approved" and result["approval"]["by"] == "admin"
    assert "**approved** by admin" in bucket.get_text(st.report_key(run_id))
    assert models.read_production(bucket).card["run_id"] == result["run_id"]
