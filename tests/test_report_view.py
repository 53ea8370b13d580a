"""The run's report inside the Airflow UI (dags/plugins/segpipe_report.py), on a real API server.

A finished `airflow dags test` run (tests/finished_run.py) is opened on its DAG-run page's "Report"
tab in headless Chromium: the comparison table and the run's pictures show. Without a token the
plugin refuses, and a user whom the auth manager gives no access to the DAG gets nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import browser_page, screenshot_path
from conftest import s3_server_module, subprocess_env
from finished_run import EXPERIMENT, FinishedRun, store
from test_airflow_rest import Airflow

# The modules reading the session's finished run on one worker: it is computed once.
pytestmark = pytest.mark.xdist_group("finished_run")

TESTS = Path(__file__).resolve().parent
OUTSIDER = "outsider"  # authenticated, but authorized for no DAG (tests/dag_scoped_auth.py)


class ApiServer(Airflow):
    """Only the API server (the run is finished: no scheduler needed), on the run's Airflow home."""

    def start(self) -> None:
        log = open(self.home / "api-server.log", "wb")  # noqa: SIM115 - the child writes it
        script = str(TESTS.parent / "infra" / "airflow_local.sh")
        self.procs.append(
            subprocess.Popen(
                ["bash", script, "api-server", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def token_for(self, user: str) -> str:
        passwords = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())
        status, body = self.request("POST", "/auth/token", {"username": user, "password": passwords[user]})
        assert status in (200, 201), body
        return body["access_token"]


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def ui(finished_run: FinishedRun) -> Iterator[ApiServer]:
    env = subprocess_env(
        **finished_run.env,
        AIRFLOW_HOME=str(finished_run.airflow_home),
        AIRFLOW__API__PORT=str(s3_server_module.free_port()),
        AIRFLOW__CORE__AUTH_MANAGER="dag_scoped_auth.DagScopedAuthManager",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"admin:admin,{OUTSIDER}:viewer",
        SEGPIPE_TEST_USERS_WITHOUT_DAGS=OUTSIDER,
        PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    )
    server = ApiServer(finished_run.airflow_home, env)
    server.start()
    try:
        server.login()
        yield server
    finally:
        server.stop()


def report_url(ui: ApiServer, run: FinishedRun, path: str = "") -> str:
    run_id = urllib.parse.quote(run.airflow_run_id, safe="")
    return f"http://127.0.0.1:{ui.port}/segpipe-report/segmentation_pipeline/{run_id}/{path}"


# An <img> decoded with a size, waiting (at most 30 s) for one still loading: true, or false if broken.
IMAGE_LOADED = """img => (img.complete && img.naturalWidth > 0) || new Promise(resolve => {
    img.addEventListener("load", () => resolve(img.naturalWidth > 0));
    img.addEventListener("error", () => resolve(false));
    setTimeout(() => resolve(img.complete && img.naturalWidth > 0), 30000);
})"""


@pytest.mark.slow
def test_report_tab_shows_the_table_the_pictures_and_every_artifact(
    ui: ApiServer, finished_run: FinishedRun, tmp_path: Path
) -> None:
    status, plugins = ui.request("GET", "/api/v2/plugins")
    assert status == 200, plugins
    (view,) = [v for p in plugins["plugins"] for v in p["external_views"] if v["name"] == "Report"]
    assert view["destination"] == "dag_run"

    with browser_page() as page:
        page.context.add_cookies(
            [{"name": "_token", "value": ui.token, "url": f"http://127.0.0.1:{ui.port}"}]
        )
        run_page = (
            f"http://127.0.0.1:{ui.port}/dags/segmentation_pipeline/runs/"
            f"{urllib.parse.quote(finished_run.airflow_run_id, safe='')}/plugin/{view['url_route']}"
        )
        started = time.monotonic()
        page.goto(run_page)
        frame = page.frame_locator("iframe")
        table = frame.locator("#report table").first
        table.wait_for(timeout=60_000)
        assert "val mDice" in table.inner_text()
        assert EXPERIMENT in table.inner_text()
        # Pictures the run published, loaded (naturalWidth > 0), and the training curves drawn from log.json.
        pictures = frame.locator(".run-section img")
        assert pictures.count() >= 4  # 3 EDA charts + the confusion matrix at least
        frame.locator(f'img[alt="eval/{EXPERIMENT}/confusion.png"]').wait_for()
        for i in range(pictures.count()):
            pictures.nth(i).scroll_into_view_if_needed()  # loading="lazy": it loads once in view
            assert pictures.nth(i).evaluate(IMAGE_LOADED), i
        assert frame.locator("svg.curve").count() >= 1
        artifacts = frame.locator("#artifacts a")
        assert artifacts.count() > 20
        print(f"report tab rendered in {time.monotonic() - started:.1f}s")
        page.screenshot(path=screenshot_path("report_view.png", tmp_path))
        # The same tab scrolled to the experiment's curves and pictures.
        frame.locator(".run-section", has_text=f"Experiment {EXPERIMENT}").evaluate("s => s.scrollIntoView()")
        page.wait_for_timeout(500)
        page.locator("iframe").screenshot(path=screenshot_path("report_view_pictures.png", tmp_path))

    # Every listed artifact has a working link, and the listing is the whole run prefix.
    status, body = get(report_url(ui, finished_run), ui.token)
    assert status == 200
    text = body.decode()
    bucket = store(finished_run.env)
    keys = bucket.list_keys(f"runs/{finished_run.run_id}")
    for key in keys:
        relative = key.split("/", 2)[2]
        assert f'href="artifacts/{relative}"' in text, relative
    status, winner = get(report_url(ui, finished_run, "artifacts/winner.json"), ui.token)
    assert status == 200 and json.loads(winner)["winner"]["experiment"] == EXPERIMENT


@pytest.mark.slow
def test_unauthenticated_and_unauthorized_requests_see_nothing(
    ui: ApiServer, finished_run: FinishedRun
) -> None:
    page, picture = report_url(ui, finished_run), report_url(ui, finished_run, "artifacts/winner.json")
    for url in (page, picture):
        status, body = get(url)
        assert status == 401, (url, status, body[:200])
        status, body = get(url, "not-a-token")
        assert status in (401, 403), (url, status)
        assert b"mDice" not in body
        status, body = get(url, ui.token_for(OUTSIDER))
        assert status == 403, (url, status, body[:200])
        assert b"mDice" not in body and b"winner" not in body
    # Nothing outside the run's prefix, and only runs that exist for this DAG.
    assert get(report_url(ui, finished_run, "artifacts/../manifest.json"), ui.token)[0] in (400, 404)
    missing = f"http://127.0.0.1:{ui.port}/segpipe-report/segmentation_pipeline/no_such_run/"
    assert get(missing, ui.token)[0] == 404
    other_dag = f"http://127.0.0.1:{ui.port}/segpipe-report/other_dag/{finished_run.airflow_run_id}/"
    assert get(other_dag, ui.token)[0] == 404
