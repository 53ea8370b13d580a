@pytest.fixture()
def stage_processes() -> Iterator[list[StageProcess]]:
    """Stage processes a test starts; any still running at the end is killed (only those)."""
    started: list[StageProcess] = []
    yield started
    for process in started:
        process.stop()


@pytest.fixture()
def private_s3(s3_server: Any, tmp_path: Path) -> Iterator[Any]:
    """A moto_server of this test alone (same class as the shared one): stopping it harms no one."""
    server = type(s3_server)(tmp_path / "moto.log")
    server.start()
    yield server
    server.stop()


# ---------------------------------------------------------------- one pipeline run, twice


@dataclass
class PipelineRun:
    """What two runs of the DAG's stage commands (same Airflow run id) left behind."""

    run_id: str
    bucket: str
    xcoms: dict[tuple[str, str], Any]
    rendered: list[dict[str, Any]]  # the local operators' rendered template fields
    logs: dict[str, dict[str, str]] = field(default_factory=dict)  # pass -> task -> its log
    train_times: dict[str, tuple[float, float]] = field(default_factory=dict)  # exp -> (start, end)
    state: dict[str, dict[str, str]] = field(default_factory=dict)  # pass -> key -> ETag
    objects: dict[str, bytes] = field(default_factory=dict)  # the bucket after both passes
    local_files: list[Path] = field(default_factory=list)  # what the stages wrote on the worker
    stage_env: dict[str, str] = field(default_factory=dict)  # what the local runner gave the stages


def _operator_log(task_id: str, command: list[str]) -> str:
    """Run one command with the DAG's local runner; its task log (the operator's log events)."""
    with structlog.testing.capture_logs() as events:
        try:
            runners.LocalStageOperator(task_id=task_id, command=command).execute({})
        except Exception as err:
            log = "\n".join(str(e.get("event")) for e in events)
            raise AssertionError(f"{task_id} failed: {err}\n{log[-6000:]}") from err
    return "\n".join(str(e.get("event")) for e in events)


def _train(spec: dict[str, Any], clearml_down_env: dict[str, str]) -> tuple[str, float, float]:
    start = time.monotonic()
    if spec["name"] == CLEARML_DOWN_EXPERIMENT:
        # The local runner's own environment, plus ClearML "online" at a closed port.
        env = {**os.environ, **runners.stage_environment(), **clearml_down_env}
        result = subprocess.run(
            [sys.executable, "-m", "tasks", *spec["train"]],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-6000:]
    else:
        log = _operator_log(f"train/{spec['name']}", spec["train"])
    return log, start, time.monotonic()


def _run_pass(run: PipelineRun, clearml_down_env: dict[str, str]) -> dict[str, str]:
    plan = {key: value for (task_id, key), value in run.xcoms.items() if task_id == "plan"}
    specs = run.xcoms[("plan_experiments", "return_value")]
    logs = {stage: _operator_log(stage, plan[stage]) for stage in ("validate", "eda", "relabel")}
    # The mapped experiments run at the same time, as the DAG's parallel task instances do. The
    # operator's log capture is process-wide: one trains through it, the other as its own process.
    with ThreadPoolExecutor(max_workers=len(specs)) as pool:
        trainings = {spec["name"]: pool.submit(_train, spec, clearml_down_env) for spec in specs}
        for name, future in trainings.items():
            logs[f"train/{name}"], *times = future.result()
            run.train_times.setdefault(name, tuple(times))
    with structlog.testing.capture_logs() as events, ThreadPoolExecutor(max_workers=len(specs)) as pool:
        evaluations = [
            pool.submit(runners.LocalStageOperator(task_id="evaluate", command=spec["evaluate"]).execute, {})
            for spec in specs
        ]
        for future in evaluations:
            future.result()
    logs["evaluate"] = "\n".join(str(e.get("event")) for e in events)
    logs["select"] = _operator_log("select", plan["select"])
    return logs


@pytest.fixture(scope="session")
def pipeline(s3_server: Any, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    """The DAG's stage commands run by its local runner, twice with the same Airflow run id.

    Fake secrets sit in the worker's AWS_* variables, in the Airflow connection `segpipe_s3` (which the
    runner prefers) and in CLEARML_API_*; h1 trains with ClearML online at a closed port (unreachable)
    while exp2 trains at the same time with ClearML offline (a session zip is published). A private S3
    server keeps fault tests from wiping the results; everything is recorded before it stops.
    """
    base = tmp_path_factory.mktemp("pipeline")
    server = type(s3_server)(base / "moto.log")
    server.start()
    env = {
        **offline_env(base / "home"),
        **server.env(PIPELINE_BUCKET),
        "AWS_ACCESS_KEY_ID": WORKER_S3_KEY,
        "AWS_SECRET_ACCESS_KEY": WORKER_S3_SECRET,
        "AIRFLOW_CONN_SEGPIPE_S3": (
            f"aws://{CONN_S3_KEY}:{CONN_S3_SECRET}@/?endpoint_url="
            f"http%3A%2F%2F127.0.0.1%3A{server.port}&region_name=us-east-1"
        ),
        "CLEARML_API_HOST": f"http://127.0.0.1:{closed_port()}",
        "CLEARML_API_ACCESS_KEY": CLEARML_ACCESS,
        "CLEARML_API_SECRET_KEY": CLEARML_SECRET,
    }
    clearml_down_env = {"CLEARML_OFFLINE_MODE": "0"}
    try:
        server.create_bucket(PIPELINE_BUCKET)
        with pytest.MonkeyPatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            dag = parse_dag(mp, SEGPIPE_BUCKET=PIPELINE_BUCKET)
            params = run_params(
                dag,
                dataset=str(tiny_dataset),
                experiments=list(PIPELINE_EXPERIMENTS),
                profile="cpu",
                max_epochs=1,
                relabel_strategy="morphology",
                quality_gate=0.0,
            )
            xcoms = plan_xcoms(dag, params)
            rendered = [
                render(dag.get_task(task_id), xcoms) for task_id in ("validate", "eda", "relabel", "select")
            ]
            run = PipelineRun(xcoms[("plan", "run_id")], PIPELINE_BUCKET, xcoms, rendered)
            run.stage_env = runners.stage_environment()
            store = Store.from_env()
            for name in ("first", "second"):
                run.logs[name] = _run_pass(run, clearml_down_env)
                run.state[name] = bucket_state(store)
            run.objects = bucket_objects(store)
        run.local_files = sorted(p for p in (base / "home").rglob("*") if p.is_file())
    finally:
        server.stop()
    return run


def json_without(data: bytes, *keys: str) -> Any:
    """A JSON document without some (timestamp) keys, at any depth."""

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in keys}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip(json.loads(data))
