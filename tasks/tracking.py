"""Experiment tracking with ClearML: the ONLY module that imports clearml.

One ClearML task per stage (and experiment) in project `segmentation_pipeline/<run_id>`.
Offline by default: the session is written under ClearML's cache dir (CLEARML_CACHE_DIR, defaulting to
<work_dir>/clearml here, never ~/.clearml) and `Tracker.close()` copies its zip into `session_dir`, so
the stage publishes it with its outputs; `Task.import_offline_session(zip)` loads it into a server later.
Online when CLEARML_API_HOST, CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY are set (and
CLEARML_OFFLINE_MODE is not): artifacts and models then go to s3://<bucket>/runs/<id>/clearml.

Tracking never stops a stage: if ClearML fails (not installed, server unreachable, an SDK error), the
Tracker logs one warning and becomes a no-op. Nor does it change how a stage reacts to signals: the
handlers ClearML installs are taken back (see `_init_task`).
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tasks import store

log = logging.getLogger(__name__)

PROJECT_ROOT = "segmentation_pipeline"
ONLINE_VARIABLES = ("CLEARML_API_HOST", "CLEARML_API_ACCESS_KEY", "CLEARML_API_SECRET_KEY")
TASK_TYPES = {"train": "training", "evaluate": "testing", "eval": "testing"}  # others: data_processing
# ClearML's own API retries default to 240 with backoff up to 120 s: an unreachable server would block
# Task.init for hours. Bounded retries let a dead server fail in seconds so the stage goes on untracked.
API_RETRIES = {"total": 4, "connect": 4, "read": 4, "status": 4, "backoff_factor": 0.5, "backoff_max": 8.0}


def offline_mode() -> bool:
    """Offline unless CLEARML_OFFLINE_MODE is off and server credentials are in the environment."""
    requested = os.environ.get("CLEARML_OFFLINE_MODE", "").strip().lower() in ("1", "true", "yes", "on")
    return requested or not all(os.environ.get(name) for name in ONLINE_VARIABLES)


def output_uri(run_id: str) -> str:
    """ClearML's destination for a run's artifacts: the run's prefix in our bucket.

    With a custom endpoint (MinIO) ClearML wants the host in the URI: s3://host:port/bucket/path.
    """
    path = f"{store.bucket_name()}/{store.clearml_prefix(run_id)}"
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    return f"s3://{urlsplit(endpoint).netloc}/{path}" if endpoint else f"s3://{path}"


def _sdk_overrides(offline: bool) -> dict:
    """Settings applied through ClearML's own config keys (the ones clearml.conf documents)."""
    overrides: dict = {
        "api": {"http": {"retries": API_RETRIES}},
        # Report from threads, not a forked subprocess: close() takes ~0.1 s instead of 7-12 s, and
        # nothing forks a process that holds torch. No uncommitted-code diff: the session zip is
        # published to the bucket, and a working tree's diff may hold anything (even secrets).
        "sdk": {"development": {"report_use_subprocess": False, "store_uncommitted_code_diff": False}},
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not offline and endpoint:
        # MinIO: ClearML's storage layer needs the endpoint as a credentials entry (http -> secure off).
        parts = urlsplit(endpoint)
        overrides["sdk"]["aws"] = {
            "s3": {
                "credentials": [
                    {
                        "host": parts.netloc,
                        "bucket": store.bucket_name(),
                        "key": os.environ.get("AWS_ACCESS_KEY_ID", ""),
                        "secret": os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
                        "region": os.environ.get("AWS_DEFAULT_REGION", ""),
                        "secure": parts.scheme == "https",
                        "multipart": False,
                    }
                ]
            }
        }
    return overrides


def _init_task(run_id: str, stage: str, experiment: str | None, offline: bool) -> Any:
    # ClearML resolves its cache dir (where offline sessions live) from the environment.
    os.environ.setdefault("CLEARML_CACHE_DIR", str(store.work_dir() / "clearml"))
    from clearml import Task
    from clearml.config import config_obj

    config_obj.set_overrides(_sdk_overrides(offline))
    Task.set_offline(offline)
    # Task.init marks its process in CLEARML_PROC_MASTER_ID ("pid:task id"); a child process that
    # inherits the mark becomes a do-nothing stub (or reports into the parent's task). A stage is its
    # own task whatever launched it: a worker, a notebook or a test runner that used ClearML itself.
    for name in ("CLEARML_PROC_MASTER_ID", "TRAINS_PROC_MASTER_ID"):
        if os.environ.get(name, "").partition(":")[0] != str(os.getpid()):
            os.environ.pop(name, None)
    # urllib3 logs one warning per retry of ClearML's login; when the server is down, the single
    # warning of open_task says it instead. Only this thread's records are held back, only meanwhile.
    quiet = _OtherThreadsOnly()
    logging.getLogger("urllib3.connectionpool").addFilter(quiet)
    handlers = _signal_handlers()
    try:
        return Task.init(
            project_name=f"{PROJECT_ROOT}/{run_id}",
            task_name=stage if experiment is None else f"{stage}/{experiment}",
            task_type=TASK_TYPES.get(stage, "data_processing"),
            reuse_last_task_id=False,
            output_uri=None if offline else output_uri(run_id),
            # We report explicitly; automatic framework hooks would upload every torch.save a second time.
            auto_connect_frameworks=False,
            auto_resource_monitoring=not offline,
        )
    finally:
        logging.getLogger("urllib3.connectionpool").removeFilter(quiet)
        _restore_signal_handlers(handlers)


def _signal_handlers() -> dict[int, Any]:
    """The process's Python-level signal handlers (only the main thread may change them)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in signal.valid_signals()}


def _restore_signal_handlers(handlers: dict[int, Any]) -> None:
    """Put back the handlers Task.init replaced. ClearML's own (SIGTERM, SIGINT, SIGQUIT, SIGABRT, ...)
    does nothing at all when the previous handler was the default one (SIG_DFL is 0, falsy): the stage
    then ignored the SIGTERM Airflow sends on a timeout or kill (tasks.cli.exit_on_sigterm)."""
    for sig, handler in handlers.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


class _OtherThreadsOnly(logging.Filter):
    """Lets through the records of every thread but the one that created it."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread


def _plain(obj: Any) -> Any:
    """JSON-safe copy (configs hold tuples and the odd object): what ClearML can store as params."""
    return json.loads(json.dumps(obj, default=str))


class Tracker:
    """A ClearML task, or nothing at all once ClearML has failed (every method then does nothing)."""

    def __init__(self, task: Any | None, offline: bool, session_dir: Path | None = None):
        self.task = task
        self.offline = offline
        self.session_dir = Path(session_dir) if session_dir is not None else None

    @property
    def enabled(self) -> bool:
        return self.task is not None

    def _safely(self, what: str, action: Callable[[Any], Any]) -> Any:
        if self.task is None:
            return None
        try:
            return action(self.task)
        except Exception as err:
            log.warning(
                "ClearML failed (%s: %s: %s); tracking is off, the stage goes on",
                what,
                type(err).__name__,
                err,
            )
            self.task = None
            return None

    def connect_params(self, params: dict, name: str = "params") -> None:
        """Hyperparameters (nested dicts are flattened by ClearML into section/a/b)."""
        self._safely("connect params", lambda task: task.connect(_plain(params), name=name))

    def report_scalar(self, title: str, series: str, value: float, iteration: int) -> None:
        self._safely(
            "report scalar",
            lambda task: task.get_logger().report_scalar(
                title, series, float(value), iteration=int(iteration)
            ),
        )

    def report_image(self, title: str, series: str, path: Path, iteration: int = 0) -> None:
        self._safely(
            "report image",
            lambda task: task.get_logger().report_image(
                title, series, iteration=iteration, local_path=str(path)
            ),
        )

    def upload_artifact(self, name: str, path: Path) -> None:
        # Synchronously: an upload left to ClearML's background pool was once missing from the offline
        # session (a process that had opened and closed tasks before); our artifacts are small files.
        self._safely(
            "upload artifact",
            lambda task: task.upload_artifact(name, artifact_object=Path(path), wait_on_upload=True),
        )

    def close(self) -> Path | None:
        """Close the task; offline, copy the session zip into session_dir and return that copy."""
        task = self.task
        if task is None:
            return None
        folder = (
            self._safely("offline folder", lambda t: t.get_offline_mode_folder()) if self.offline else None
        )
        self._safely("close", lambda t: t.close())
        self.task = None
        if folder is None:
            return None
        session_zip = Path(f"{folder}.zip")
        if not session_zip.is_file():
            log.warning("ClearML wrote no offline session zip at %s", session_zip)
            return None
        if self.session_dir is None:
            return session_zip
        self.session_dir.mkdir(parents=True, exist_ok=True)
        copy = Path(shutil.copy2(session_zip, self.session_dir / session_zip.name))
        log.info("ClearML offline session %s (import later with Task.import_offline_session)", copy)
        return copy

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_task(
    run_id: str,
    stage: str,
    experiment: str | None = None,
    params: dict | None = None,
    session_dir: Path | None = None,
) -> Tracker:
    """Start the ClearML task of one stage run; never raises because of ClearML."""
    store.check_run_id(run_id)
    offline = offline_mode()
    try:
        task = _init_task(run_id, stage, experiment, offline)
    except Exception as err:  # ImportError, LoginError, unreachable server, bad config...
        log.warning(
            "ClearML unavailable (%s: %s); the stage goes on without tracking", type(err).__name__, err
        )
        return Tracker(None, offline, session_dir)
    tracker = Tracker(task, offline, session_dir)
    log.info("ClearML task %s/%s (%s)", PROJECT_ROOT, run_id, "offline" if offline else "online")
    if params:
        tracker.connect_params(params)
    return tracker


# ---------------------------------------------------------------- mmengine hook


def _metric_items(metrics: dict) -> Iterator[tuple[str, str, float]]:
    """(title, series, value) of a metrics dict: 'mIoU' -> (mIoU, val); 'IoU.cat' or {'IoU': {'cat'}}
    -> (IoU, cat); nested per_class {'cat': {'IoU'}} -> (IoU, cat)."""
    for key, value in metrics.items():
        if isinstance(value, dict):
            for inner, sub in value.items():
                if isinstance(sub, dict):  # per_class: {class: {metric: value}}
                    for metric, number in sub.items():
                        yield metric, inner, float(number)
                else:
                    yield key, inner, float(sub)
        elif isinstance(value, numbers.Real):  # numpy scalars too
            title, _, series = key.rpartition(".") if "." in key else (key, "", "val")
            yield title, series, float(value)


def _build_tracker_hook() -> type:
    from mmengine.hooks import Hook  # mmengine pulls torch: only stages that train pay for it

    class TrackerHook(Hook):
        """Reports train scalars (loss, lr, ...) every `interval` iterations and the metrics of each
        validation to a Tracker; connects the resolved config as hyperparameters at the start."""

        priority = "LOW"  # after RuntimeInfoHook has put this iteration's values in the message hub

        def __init__(self, tracker: Tracker, interval: int = 10):
            self.tracker = tracker
            self.interval = interval

        def before_run(self, runner: Any) -> None:
            self.tracker.connect_params(runner.cfg.to_dict(), name="config")

        def after_train_iter(
            self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: dict | None = None
        ) -> None:
            if not self.every_n_train_iters(runner, self.interval):
                return
            for name, buffer in runner.message_hub.log_scalars.items():
                if name.startswith("train/"):
                    self.tracker.report_scalar(
                        name[len("train/") :], "train", buffer.current(), runner.iter + 1
                    )

        def after_val_epoch(self, runner: Any, metrics: dict | None = None) -> None:
            for title, series, value in _metric_items(metrics or {}):
                self.tracker.report_scalar(title, series, value, runner.iter)

    return TrackerHook


def __getattr__(name: str) -> Any:
    # TrackerHook subclasses mmengine's Hook; build it on first use so importing tracking stays light.
    if name == "TrackerHook":
        globals()[name] = _build_tracker_hook()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
