"""`python -m tasks review`: a finished run's train split in FiftyOne (its own environment), the App in a
real browser, tags set through FiftyOne's SDK, the exported bad-mask list, and the next run's relabel
repairing exactly the tagged masks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import browser_page, screenshot_path
from conftest import s3_server_module, subprocess_env
from finished_run import FinishedRun, store

from tasks import review
from tasks.store import review_key, stage_prefix

# The modules reading the session's finished run on one worker: it is computed once.
pytestmark = pytest.mark.xdist_group("finished_run")

TAGGED = 3  # masks the "person" tags bad_mask


@pytest.fixture()
def run_env(finished_run: FinishedRun, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process and its children on the finished run's bucket and work dir."""
    for key, value in finished_run.env.items():
        monkeypatch.setenv(key, value)
    return subprocess_env(**finished_run.env)


def sdk(code: str) -> str:
    """Python run with FiftyOne's SDK in the review environment (as a person's notebook would)."""
    result = subprocess.run(
        [str(review.fiftyone_python()), "-c", code],
        env=review.app_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture()
def app(
    finished_run: FinishedRun, run_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[subprocess.Popen, int]]:
    port = s3_server_module.free_port()
    log = open(tmp_path / "review.log", "w")  # noqa: SIM115 - the child writes it
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks", "review", "--run-id", finished_run.run_id, "--port", str(port)],
        env=run_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "review.log").read_text()[-4000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(2)
    else:
        pytest.fail("the FiftyOne App did not answer:\n" + (tmp_path / "review.log").read_text()[-4000:])
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
def test_review_tags_become_the_next_runs_bad_mask_list(
    app: tuple[subprocess.Popen, int], finished_run: FinishedRun, tmp_path: Path
) -> None:
    proc, port = app
    name = review.dataset_name(finished_run.run_id)
    train = sorted(p.name for p in (finished_run.dataset / "labels" / "train").glob("*.png"))

    # The App lists the run's train samples and draws their masks (the ground_truth field is active).
    masks_loaded: list[str] = []
    with browser_page() as page:
        page.on(
            "response",
            lambda r: masks_loaded.append(r.url) if r.status == 200 and "labels%2Ftrain" in r.url else None,
        )
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_text(f"{len(train)} samples").wait_for(timeout=120_000)
        page.get_by_text("suspicion").first.wait_for()
        deadline = time.monotonic() + 60
        while not masks_loaded and time.monotonic() < deadline:
            page.wait_for_timeout(500)
        assert masks_loaded, "the App fetched no mask"
        if page.get_by_text("Dismiss").count():  # FiftyOne's own advert
            page.get_by_text("Dismiss").click()
        page.wait_for_timeout(1000)
        page.screenshot(path=screenshot_path("review_app.png", tmp_path))

    # The dataset: every train image, original + relabeled masks, EDA fields, the winner's prediction.
    summary = json.loads(
        sdk(
            "import json, fiftyone as fo\n"
            f"ds = fo.load_dataset({name!r})\n"
            "s = ds.sort_by('suspicion', reverse=True).first()\n"
            "print(json.dumps({'n': len(ds), 'fields': sorted(ds.get_field_schema()),"
            " 'top': s.mask_key, 'score': s.suspicion, 'gt': s.ground_truth.mask_path,"
            " 'relabeled': s.relabeled.mask_path, 'prediction': s.prediction.mask_path,"
            " 'flagged': len(ds.match(fo.ViewField('flagged') == True))}))"
        )
    )
    assert summary["n"] == len(train)
    assert {"ground_truth", "relabeled", "prediction", "suspicion", "flagged", "signal_straight"} <= set(
        summary["fields"]
    )
    eda = store(finished_run.env).get_json(f"{stage_prefix(finished_run.run_id, 'eda')}/report.json")
    assert (
        summary["top"] == eda["suspicious"][0]["mask"] and summary["score"] == eda["suspicious"][0]["score"]
    )
    assert summary["flagged"] == sum(e["score"] > eda["score_threshold"] for e in eda["suspicious"])
    for field in ("gt", "relabeled", "prediction"):
        assert Path(summary[field]).is_file()

    # A person tags three masks (through the SDK here) while the App runs; ending the review exports them.
    chosen = [f"labels/train/{n}" for n in (train[0], train[len(train) // 2], train[-1])]
    sdk(
        "import fiftyone as fo\n"
        f"ds = fo.load_dataset({name!r})\n"
        f"ds.match(fo.ViewField('mask_key').is_in({chosen!r})).tag_samples({review.BAD_MASK_TAG!r})\n"
        "print(len(ds.match_tags('bad_mask')))"
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    bucket = store(finished_run.env)
    exported = bucket.get_json(review_key(finished_run.run_id))
    assert exported == sorted(chosen)
    # Reviewing the run again rebuilds the dataset and keeps the person's tags (--no-serve: no App).
    again = subprocess.run(
        [sys.executable, "-m", "tasks", "review", "--run-id", finished_run.run_id, "--no-serve"],
        env=subprocess_env(**finished_run.env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["masks"] == sorted(chosen)

    # The next run takes the exported list (the DAG's bad_masks param): relabel repairs exactly those.
    next_run = "after-review"
    uri = bucket.uri(review_key(finished_run.run_id))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tasks",
            "relabel",
            "--run-id",
            next_run,
            "--dataset",
            str(finished_run.dataset),
        ]
        + ["--strategy", "morphology", "--bad-masks", uri, "--score-threshold", "1"],
        env=subprocess_env(**finished_run.env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    local = bucket.fetch(stage_prefix(next_run, "relabel"), tmp_path / "next-relabel")
    report = json.loads((local / "report.json").read_text())
    assert sorted(m["mask"] for m in report["masks"]) == sorted(chosen)
    for mask in train:
        same = (local / "labels_sam2" / "train" / mask).read_bytes() == (
            finished_run.dataset / "labels" / "train" / mask
        ).read_bytes()
        assert same or f"labels/train/{mask}" in chosen, mask


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--no-serve"], "runs/never-ran/manifest.json"),  # no such run: nothing to review
        (["--export"], "no review dataset for run never-ran"),  # nothing reviewed yet
    ],
)
def test_review_of_a_run_that_never_ran_exits_2(
    run_env: dict[str, str], args: list[str], message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tasks", "review", "--run-id", "never-ran", *args],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
