"""Credentials never leak: after the pipeline run with known fake secrets (worker AWS_* variables, the
Airflow connection segpipe_s3, CLEARML_API_*), none appears in a task log, an XCom, a rendered
template, an object of the bucket (zip members included) or a file the stages wrote on the worker."""

from __future__ import annotations

import json
import re

import pytest

from .support import (
    CLEARML_DOWN_EXPERIMENT,
    CLEARML_SECRET,
    CONN_S3_KEY,
    CONN_S3_SECRET,
    SECRETS,
    PipelineRun,
    members,
)

# Every kind of artifact the promise names: manifests, reports, configs, markers, ClearML sessions.
SEARCHED = (
    r"/manifest\.json$",
    r"/eda/report\.json$",
    r"/relabel/report\.json$",
    r"/config\.py$",
    r"/_SUCCESS$",
    r"/clearml/.*\.zip$",
    r"/best\.pth$",
    r"/winner\.json$",
    r"/report\.md$",
)


def leaks(name: str, data: bytes) -> list[str]:
    return [
        f"{secret} in {part}"
        for part, blob in members(name, data)
        for secret in SECRETS
        if secret.encode() in blob
    ]


@pytest.mark.slow
def test_no_secret_in_logs_xcoms_templates_store_or_worker_files(pipeline: PipelineRun) -> None:
    # The stages really held the secrets: the local runner handed them the connection's credentials,
    # and the ClearML secret was used for a login attempt (its failure is in the h1 log).
    assert pipeline.stage_env["AWS_SECRET_ACCESS_KEY"] == CONN_S3_SECRET
    assert pipeline.stage_env["AWS_ACCESS_KEY_ID"] == CONN_S3_KEY
    assert pipeline.stage_env["CLEARML_API_SECRET_KEY"] == CLEARML_SECRET
    assert "ClearML unavailable" in pipeline.logs["first"][f"train/{CLEARML_DOWN_EXPERIMENT}"]

    found = []
    for run, logs in pipeline.logs.items():
        for task, log in logs.items():
            found += leaks(f"task log {run}/{task}", log.encode())
    xcoms = {f"{task}.{key}": value for (task, key), value in pipeline.xcoms.items()}
    found += leaks("XComs", json.dumps(xcoms).encode())
    found += leaks("rendered templates", json.dumps(pipeline.rendered, default=str).encode())
    for key, data in pipeline.objects.items():
        found += leaks(f"s3 {key}", data)
    for run, documents in pipeline.documents.items():  # what select wrote after the first run too
        for key, data in documents.items():
            found += leaks(f"s3 {key} ({run} run)", data)
    for path in pipeline.local_files:
        found += leaks(f"worker file {path}", path.read_bytes())
    assert found == []

    # What was searched: every kind of artifact the promise names is there (the search is not empty).
    keys = list(pipeline.objects)
    for pattern in SEARCHED:
        assert any(re.search(pattern, key) for key in keys), pattern
    zipped = [part for key in keys if key.endswith(".zip") for part, _ in members(key, pipeline.objects[key])]
    assert any(part.endswith("!log.jsonl") for part in zipped)  # ClearML's copy of the console output
