"""Shared fixtures: a real S3 API server process on 127.0.0.1 and a tiny generated dataset."""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_AIRFLOW_HOME: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    """One throwaway Airflow home for the whole session, never the developer's, with example DAGs off.

    Set before any test module imports Airflow: Airflow reads its configuration once, at first import.
    Tests that start Airflow processes give each its own home (AIRFLOW_HOME in their environment).
    """
    global _AIRFLOW_HOME
    _AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="segpipe-airflow-"))
    os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _AIRFLOW_HOME is not None:
        shutil.rmtree(_AIRFLOW_HOME, ignore_errors=True)


@functools.cache
def _group(module_path: str) -> str:
    """The unit `make test`'s workers share out: a test module, or the modules whose module-level
    `pytestmark = pytest.mark.xdist_group(NAME)` names one group (they share a costly session fixture
    or must not overlap). Read from the source, so the controller, which collects nothing, knows it."""
    tree = ast.parse((ROOT / module_path).read_text())
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["pytestmark"]
            and isinstance(node.value, ast.Call)
            and ast.unparse(node.value.func) == "pytest.mark.xdist_group"
        ):
            return str(ast.literal_eval(node.value.args[0]))
    return module_path


def _module_path(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Groups with the most slow tests first (an order kept within each group): on parallel workers
    the longest units start at once instead of last, where one of them would run alone."""
    slow: dict[str, int] = {}
    for item in items:
        group = _group(_module_path(item.nodeid))
        slow[group] = slow.get(group, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[_group(_module_path(item.nodeid))])


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """--dist loadgroup by `_group`. xdist 3.8's own loadgroup groups nothing under pytest 9 (it renames
    Item._nodeid, pytest 9 keeps the id in Item._id) and splits unmarked modules test by test, which
    would start each module-scoped server or topology on every worker."""
    if config.getvalue("dist") != "loadgroup":
        return None
    config.option.loadscopereorder = False  # the collection's order (slow groups first), not test counts
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(_module_path(nodeid))

    return ModuleGroupScheduling(config, log)


def _load_infra(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "infra" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


s3_server_module = _load_infra("s3_server")


@pytest.fixture(autouse=True)
def _offline_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every library off the network and out of $HOME during tests."""
    home = tmp_path_factory.getbasetemp() / "home"
    # ClearML writes ~/.clearml/.session.json at a fixed path: keep it out of the real HOME.
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "1")
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("SEGPIPE_WORK_DIR", str(home / "work"))
    monkeypatch.setenv("MPLCONFIGDIR", str(home / "mpl"))
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(home / "yolo"))
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(home / "clearml"))


class S3Server:
    """A moto_server process; `stop()`/`start()` let fault tests cut the connection for real."""

    def __init__(self, log_path: Path):
        self.port = s3_server_module.free_port()
        self.log_path = log_path
        self.proc = None

    @property
    def endpoint_url(self) -> str:
        return s3_server_module.endpoint_url(self.port)

    def start(self) -> None:
        self.proc = s3_server_module.start(self.port, self.log_path)

    def stop(self) -> None:
        if self.proc is not None:
            s3_server_module.stop(self.proc)
            self.proc = None

    def env(self, bucket: str) -> dict[str, str]:
        return s3_server_module.client_env(self.port, bucket)

    def create_bucket(self, bucket: str) -> None:
        s3_server_module.create_bucket(self.port, bucket)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh bucket on the shared server; the environment points tasks.store at it."""
    if s3_server.proc is None:  # a fault test may have stopped it
        s3_server.start()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    env = s3_server.env(bucket)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated dataset in the study's layout (shared, read-only: copy it to modify)."""
    from tasks.synth import generate

    out = tmp_path_factory.mktemp("tiny_dataset") / "synth"
    generate(out, seed=0, n_train=16, n_val=8, n_test=8, size=64)
    return out


@pytest.fixture(scope="session")
def finished_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A finished `airflow dags test` run on its own S3 server (tests/finished_run.py), read-only."""
    from finished_run import run_pipeline

    base = tmp_path_factory.mktemp("finished_run")
    server = S3Server(base / "moto.log")
    server.start()
    try:
        yield run_pipeline(server, tiny_dataset, base)
    finally:
        server.stop()


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ (with the fixtures' settings) plus extra, for `python -m tasks` subprocesses."""
    return {**os.environ, **extra}
