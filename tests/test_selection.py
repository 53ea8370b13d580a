"""Selection on crafted metric files in a real S3 API server (moto): rule, tie-break, gate, champion."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tasks import cli, models, selection
from tasks import store as st

CLASSES = ("background", "cat", "dog")


@pytest.fixture(scope="module")
def config_texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The four experiments' resolved configs (CPU profile), dumped as the train stage publishes them."""
    from tasks.experiments import default_names
    from tasks.train import load_experiment_config

    out = tmp_path_factory.mktemp("configs")
    texts = {}
    for experiment in default_names():
        load_experiment_config(experiment, "cpu").dump(str(out / f"{experiment}.py"))
        texts[experiment] = (out / f"{experiment}.py").read_text()
    return texts


def metrics(split: str, experiment: str, mdice: float, miou: float, **extra) -> dict:
    per_class = {
        cls: {"IoU": round(miou + i, 2), "Dice": round(mdice + i, 2), "Acc": 90.0}
        for i, cls in enumerate(CLASSES)
    }
    return {
        "experiment": experiment,
        "split": split,
        "aAcc": 97.0,
        "mIoU": miou,
        "mAcc": 91.0,
        "mDice": mdice,
        "per_class": per_class,
        **extra,
    }


class Run:
    """Publishes crafted train/eval outputs of one run id, as the two stages would."""

    def __init__(self, store: st.Store, run_id: str, root: Path, config_texts: dict[str, str]):
        self.store, self.run_id, self.root, self.config_texts = store, run_id, root, config_texts

    def trained(self, experiment: str, val_mdice: float, val_miou: float) -> None:
        out = self.root / self.run_id / "train" / experiment
        out.mkdir(parents=True)
        (out / "best.pth").write_bytes(f"weights of {experiment} in {self.run_id}".encode())
        (out / "config.py").write_text(self.config_texts[experiment])
        val = metrics("val", experiment, val_mdice, val_miou, dataset_version="v1", best_epoch=7)
        (out / "val_metrics.json").write_text(json.dumps(val))
        self.store.publish(out, st.stage_prefix(self.run_id, "train", experiment), {"dataset_version": "v1"})

    def evaluated(
        self,
        experiment: str,
        test_mdice: float,
        dataset_version: str = "v1",
        test_set_version: str | None = "t1",
    ) -> None:
        out = self.root / self.run_id / "eval" / experiment
        out.mkdir(parents=True)
        weights = self.root / self.run_id / "train" / experiment / "best.pth"
        versions = {"test_set_version": test_set_version} if test_set_version else {}  # None: pre-change
        test = metrics(
            "test",
            experiment,
            test_mdice,
            test_mdice - 8,
            dataset_version=dataset_version,
            checkpoint=f"{st.stage_prefix(self.run_id, 'train', experiment)}/best.pth",
            checkpoint_sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
            **versions,
        )
        (out / "test_metrics.json").write_text(json.dumps(test))
        self.store.publish(out, st.stage_prefix(self.run_id, "eval", experiment), {"dataset_version": "v1"})

    def experiment(self, experiment: str, val_mdice: float, val_miou: float, test_mdice: float) -> None:
        self.trained(experiment, val_mdice, val_miou)
        self.evaluated(experiment, test_mdice)

    def select(self, *extra: str) -> int:
        return cli.main(["select", "--run-id", self.run_id, *extra])

    def winner(self) -> dict:
        return self.store.get_json(st.winner_key(self.run_id))

    def report(self) -> str:
        return self.store.get_text(st.report_key(self.run_id))


@pytest.fixture()
def store(s3_env: dict[str, str]) -> st.Store:
    return st.Store.from_env()


@pytest.fixture()
def run(store: st.Store, tmp_path: Path, config_texts: dict[str, str]) -> Run:
    return Run(store, "run-1", tmp_path, config_texts)


def champion(
    store: st.Store,
    tmp_path: Path,
    test_mdice: float,
    dataset_version: str = "v1",
    test_set_version: str | None = "t1",
    run_id: str = "run-0",
) -> bytes:
    """A production champion from an earlier run (test_set_version None: a card from before test-set
    versions), promoted as select does: its version, then the pointer; returns its weights."""
    weights = f"weights of the champion of {run_id}".encode()
    (tmp_path / f"{run_id}.pth").write_bytes(weights)
    card = {
        "run_id": run_id,
        "experiment": "h1",
        "dataset_version": dataset_version,
        "checkpoint_sha256": hashlib.sha256(weights).hexdigest(),
        "test_metrics": {"mDice": test_mdice},
    }
    if test_set_version is not None:
        card["test_set_version"] = test_set_version
    version = models.publish_version(store, card, tmp_path / f"{run_id}.pth", "# old champion's config\n")
    assert models.move_production(store, version, models.read_production(store), "set up by the test")
    return weights


def production_weights(store: st.Store) -> bytes | None:
    """The weights production names, checked as every reader checks them (None: no champion)."""
    production = models.read_production(store)
    if production.version is None:
        return None
    weights = store.get_bytes(f"{st.model_prefix(production.version)}/model.pth")
    assert hashlib.sha256(weights).hexdigest() == production.pointer["checkpoint_sha256"]
    return weights


def production_file(store: st.Store, name: str) -> str:
    return store.get_text(f"{st.model_prefix(models.read_production(store).version)}/{name}")


def test_winner_by_val_not_test(run: Run, store: st.Store, capsys: pytest.CaptureFixture) -> None:
    run.experiment("h1", val_mdice=88.0, val_miou=80.0, test_mdice=95.0)  # best test, worse val: loses
    run.experiment("h2", val_mdice=87.0, val_miou=79.0, test_mdice=86.0)
    run.experiment("exp1", val_mdice=89.0, val_miou=81.0, test_mdice=84.0)
    run.experiment("exp2", val_mdice=93.13, val_miou=87.46, test_mdice=90.39)

    assert run.select() == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["winner"] == "exp2" and printed["promoted"] is True and printed["failed"] == []

    winner = run.winner()
    assert winner["winner"]["experiment"] == "exp2"
    assert winner["winner"]["test_mDice"] == 90.39
    assert [r["experiment"] for r in winner["ranking"]] == ["exp2", "exp1", "h1", "h2"]
    assert winner["gate"] == {"threshold": 0.75, "value": 0.9039, "passed": True}
    assert winner["promotion"]["decision"] == "promoted"
    assert winner["promotion"]["champion_test_mDice"] is None

    assert production_weights(store) == b"weights of exp2 in run-1"
    card = json.loads(production_file(store, "model_card.json"))
    assert card["experiment"] == "exp2" and card["run_id"] == "run-1"
    assert card["dataset_version"] == "v1" and card["test_metrics"]["mDice"] == 90.39
    assert card["test_set_version"] == "t1" and winner["winner"]["test_set_version"] == "t1"
    assert "AdamW" in production_file(store, "config.py")
    pointer = store.get_json(st.PRODUCTION_KEY)
    assert pointer["version"] == card["version"] == f"exp2-{card['checkpoint_sha256'][:16]}"
    assert pointer["previous"] is None and pointer["reason"] == "no champion in production yet"

    report = run.report()
    # the experiments' own descriptions (configs/*.py EXPERIMENT), never the bucket's config.py
    assert "| exp2 | SegFormer-B2 with Exp1's augmentation | SegFormer (SegformerHead), MixVision" in report
    assert "| 93.13 | 87.46 |" in report and report.rstrip().endswith("none")
    h2_row = next(line for line in report.splitlines() if line.startswith("| h2 |"))
    assert "CE class_weight [0.0585, 1.0, 1.0]" in h2_row and h2_row.rstrip().endswith("| 4 |")
    exp1_row = next(line for line in report.splitlines() if line.startswith("| exp1 |"))
    assert "RandomResize 0.5-2.0 + RandomCrop 256 (cat_max_ratio 0.75) + RandomFlip 0.5" in exp1_row
    assert "| 97.00 | 82.39 | 91.00 | 90.39 |" in report  # the winner's test table

    manifest = store.get_json(st.manifest_key("run-1"))
    assert manifest["ended_at"] and manifest["selection"]["winner"] == "exp2"


def test_tie_goes_to_val_miou_then_fixed_order(run: Run, store: st.Store) -> None:
    run.experiment("exp2", val_mdice=90.0, val_miou=82.0, test_mdice=90.0)
    run.experiment("h2", val_mdice=90.0, val_miou=82.5, test_mdice=80.0)  # same mDice, higher mIoU
    run.experiment("h1", val_mdice=89.0, val_miou=90.0, test_mdice=80.0)
    assert run.select("--no-promote") == 0
    assert run.winner()["winner"]["experiment"] == "h2"

    full_tie = Run(store, "run-2", run.root, run.config_texts)
    full_tie.experiment("exp2", val_mdice=90.0, val_miou=82.0, test_mdice=91.0)
    full_tie.experiment("exp1", val_mdice=90.0, val_miou=82.0, test_mdice=85.0)
    assert full_tie.select("--no-promote") == 0
    assert [r["experiment"] for r in full_tie.winner()["ranking"]] == ["exp1", "exp2"]  # fixed order


def test_gate_failure_promotes_nothing(run: Run, store: st.Store, capsys: pytest.CaptureFixture) -> None:
    run.experiment("h1", val_mdice=80.0, val_miou=70.0, test_mdice=74.9)
    run.experiment("h2", val_mdice=70.0, val_miou=60.0, test_mdice=90.0)  # passes, but is not the winner

    assert run.select("--gate", "0.75") == 3
    captured = capsys.readouterr()
    assert "quality gate failed" in captured.err and "h1" in captured.err and "0.75" in captured.err
    assert json.loads(captured.out)["gate_passed"] is False
    assert production_weights(store) is None
    winner = run.winner()
    assert winner["winner"]["experiment"] == "h1"
    assert winner["gate"]["passed"] is False and winner["promotion"]["promoted"] is False
    assert "FAILED: nothing promoted" in run.report()


def test_champion_kept_when_better_on_same_test_set(run: Run, store: st.Store, tmp_path: Path) -> None:
    old = champion(store, tmp_path, test_mdice=92.0)
    run.experiment("exp2", val_mdice=93.0, val_miou=87.0, test_mdice=91.5)
    assert run.select() == 0
    promotion = run.winner()["promotion"]
    assert promotion["decision"] == "champion kept" and promotion["promoted"] is False
    assert (promotion["challenger_test_mDice"], promotion["champion_test_mDice"]) == (91.5, 92.0)
    assert production_weights(store) == old
    assert promotion["reason"] == "champion kept: winner test mDice 91.5 <= champion 92.0 on test set t1"
    assert "champion test mDice: 92.00" in run.report()
    assert "test set version t1, dataset version v1" in run.report()


def test_champion_replaced_when_beaten(run: Run, store: st.Store, tmp_path: Path) -> None:
    champion(store, tmp_path, test_mdice=85.0)
    run.experiment("exp1", val_mdice=90.0, val_miou=82.0, test_mdice=88.0)
    assert run.select() == 0
    promotion = run.winner()["promotion"]
    assert promotion["decision"] == "promoted"
    assert (promotion["challenger_test_mDice"], promotion["champion_test_mDice"]) == (88.0, 85.0)
    assert production_weights(store) == b"weights of exp1 in run-1"
    pointer = store.get_json(st.PRODUCTION_KEY)
    assert pointer["previous"]["run_id"] == "run-0" and pointer["previous"]["test_mDice"] == 85.0
    assert pointer["previous"]["test_set_version"] == "t1" and pointer["test_set_version"] == "t1"
    assert promotion["champion"]["version"] == pointer["previous"]["version"]
    # the previous version stays browsable and whole: a rollback is one pointer move
    assert [v["run_id"] for v in models.list_versions(store) if not v["production"]] == ["run-0"]


@pytest.mark.parametrize(("champion_mdice", "promoted"), [(92.0, False), (85.0, True)])
def test_champion_from_a_larger_dataset_with_the_same_test_set_is_compared(
    run: Run, store: st.Store, tmp_path: Path, champion_mdice: float, promoted: bool
) -> None:
    """More train images make another dataset version; the test set, and so the comparison, stays."""
    old = champion(store, tmp_path, test_mdice=champion_mdice, dataset_version="v0-more-train")
    run.experiment("exp2", val_mdice=93.0, val_miou=87.0, test_mdice=88.0)
    assert run.select() == 0
    promotion = run.winner()["promotion"]
    assert promotion["promoted"] is promoted
    assert "not comparable" not in promotion["reason"] and "on test set t1" in promotion["reason"]
    assert promotion["champion"]["test_set_version"] == "t1"
    assert production_weights(store) == (b"weights of exp2 in run-1" if promoted else old)


def test_champion_on_another_test_set_is_replaced_with_reason(
    run: Run, store: st.Store, tmp_path: Path
) -> None:
    champion(store, tmp_path, test_mdice=99.0, test_set_version="t0")  # same dataset version label
    run.experiment("h1", val_mdice=90.0, val_miou=82.0, test_mdice=88.0)
    assert run.select() == 0
    promotion = run.winner()["promotion"]
    assert promotion["promoted"] is True
    assert promotion["reason"].startswith(
        "not comparable: champion measured on test set t0, challenger on t1 -> re-evaluating the champion"
    )
    assert production_weights(store) == b"weights of h1 in run-1"


def test_old_champion_card_falls_back_to_the_dataset_version(
    run: Run, store: st.Store, tmp_path: Path
) -> None:
    """A model card written before test-set versions: the whole dataset versions are compared."""
    old = champion(store, tmp_path, test_mdice=99.0, test_set_version=None)
    run.experiment("h1", val_mdice=90.0, val_miou=82.0, test_mdice=88.0)
    assert run.select("--no-promote") == 0
    reason = run.winner()["promotion"]["reason"]
    assert reason.startswith("champion kept: winner test mDice 88.0 <= champion 99.0 on dataset version v1")
    assert "the champion's model card predates test-set versions" in reason
    assert production_weights(store) == old

    run2 = Run(store, "run-2", run.root, run.config_texts)
    run2.trained("h1", val_mdice=90.0, val_miou=82.0)
    run2.evaluated("h1", test_mdice=88.0, dataset_version="v2")
    assert run2.select() == 0
    promotion = run2.winner()["promotion"]
    assert promotion["promoted"] is True
    assert promotion["reason"].startswith(
        "not comparable: champion measured on dataset version v1, challenger on v2"
    )
    assert "predates test-set versions" in promotion["reason"]
    assert production_weights(store) == b"weights of h1 in run-2"


def test_old_evaluation_falls_back_to_the_dataset_version(run: Run, store: st.Store, tmp_path: Path) -> None:
    """test_metrics.json published (and cached) before test-set versions: dataset versions are compared."""
    champion(store, tmp_path, test_mdice=85.0)
    run.trained("exp1", val_mdice=90.0, val_miou=82.0)
    run.evaluated("exp1", test_mdice=88.0, test_set_version=None)
    assert run.select() == 0
    promotion = run.winner()["promotion"]
    assert promotion["promoted"] is True
    assert promotion["reason"].startswith("winner test mDice 88.0 > champion 85.0 on dataset version v1")
    assert "the winner's test_metrics.json predates test-set versions" in promotion["reason"]


def test_failed_experiments_are_reported(run: Run, store: st.Store, capsys: pytest.CaptureFixture) -> None:
    run.experiment("h1", val_mdice=85.0, val_miou=75.0, test_mdice=84.0)
    run.trained("h2", val_mdice=95.0, val_miou=90.0)  # trained, never evaluated
    run.trained("exp1", val_mdice=96.0, val_miou=90.0)
    run.evaluated("exp1", test_mdice=90.0)
    # exp1 retrained after its evaluation: the evaluated checkpoint is stale
    (run.root / "run-1" / "train" / "exp1" / "best.pth").write_bytes(b"retrained weights")
    store.publish(run.root / "run-1" / "train" / "exp1", st.stage_prefix("run-1", "train", "exp1"), {})
    # exp2 never trained

    assert run.select() == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["winner"] == "h1" and printed["failed"] == ["exp1", "exp2", "h2"]
    failed = run.winner()["failed"]
    assert "evaluate stage has not published outputs" in failed["h2"]
    assert "stale evaluation" in failed["exp1"]
    assert "train stage has not published outputs" in failed["exp2"]
    report = run.report()
    assert "- exp2: train stage has not published outputs" in report
    assert [r["experiment"] for r in run.winner()["ranking"]] == ["h1"]


def test_no_experiment_left_exits_1(run: Run, store: st.Store, capsys: pytest.CaptureFixture) -> None:
    run.trained("h1", val_mdice=85.0, val_miou=75.0)
    assert run.select("--experiments", "h1,exp2") == 1
    err = capsys.readouterr().err
    assert "none of h1, exp2 has published train and eval outputs" in err
    assert run.winner()["winner"] is None and set(run.winner()["failed"]) == {"h1", "exp2"}


def test_no_promote_never_touches_production(run: Run, store: st.Store, tmp_path: Path) -> None:
    old = champion(store, tmp_path, test_mdice=80.0)
    run.experiment("exp2", val_mdice=93.0, val_miou=87.0, test_mdice=90.0)
    assert run.select("--no-promote") == 0
    promotion = run.winner()["promotion"]
    assert promotion["promoted"] is False
    assert promotion["decision"] == "not promoted: --no-promote (would replace the champion)"
    assert production_weights(store) == old


def test_bad_arguments_exit_2(run: Run, capsys: pytest.CaptureFixture) -> None:
    assert run.select("--experiments", "h1,h3") == 2
    assert run.select("--gate", "75") == 2
    err = capsys.readouterr().err
    assert "--experiments 'h1,h3'" in err and "--gate 75.0" in err


# ---------------------------------------------------------------- promotion as a transaction


class Crash(BaseException):
    """A process dying at a write: not an Exception, so no retry or handler of ours catches it."""


def crash_at_write(store: st.Store, at: int) -> list[str]:
    """Make the store die at its `at`-th write (0-based: before it); returns the keys written before.

    Every write of the store goes through one of three methods (files, small objects, conditional
    PUTs); the crash is raised in the caller's thread, before the request, as a killed process stops.
    """
    written: list[str] = []

    def wrap(method, key_at: int):
        def write(*args, **kwargs):
            key = args[key_at]
            if len(written) == at:
                raise Crash(f"crashed before writing {key}")
            result = method(*args, **kwargs)
            written.append(key)
            return result

        return write

    store._upload_file = wrap(store._upload_file, 1)
    store.put_bytes = wrap(store.put_bytes, 0)
    store.put_json_if = wrap(store.put_json_if, 0)
    return written


# select's writes when it promotes: the version's 3 files and marker, the pointer, then the reports
PROMOTION_WRITES = 8


@pytest.mark.parametrize("crash_at", range(PROMOTION_WRITES))
def test_a_crash_at_any_write_of_a_promotion_leaves_a_valid_champion(
    run: Run, store: st.Store, tmp_path: Path, crash_at: int
) -> None:
    old = champion(store, tmp_path, test_mdice=85.0)
    old_version = models.read_production(store).version
    run.experiment("exp1", val_mdice=90.0, val_miou=82.0, test_mdice=88.0)

    crashing = st.Store.from_env()
    written = crash_at_write(crashing, crash_at)
    with pytest.raises(Crash):
        selection.select(crashing, "run-1", ["exp1"])
    assert len(written) == crash_at
    pointer_written = st.PRODUCTION_KEY in written
    # production names a complete model whose weights match its pointer: the old one or the winner
    assert production_weights(store) == (b"weights of exp1 in run-1" if pointer_written else old)

    # the next run of select compares against the champion production really names, and finishes
    assert run.select() == 0
    promotion = run.winner()["promotion"]
    assert production_weights(store) == b"weights of exp1 in run-1"
    if pointer_written:
        assert promotion["decision"] == "champion kept"
        assert promotion["reason"] == "the winner already is the production champion"
    else:
        assert promotion["decision"] == "promoted" and promotion["champion"]["version"] == old_version
        assert promotion["reason"] == "winner test mDice 88.0 > champion 85.0 on test set t1"
    assert store.get_json(st.PRODUCTION_KEY)["previous"]["version"] == old_version


def test_every_write_of_a_promotion_is_covered_by_the_crash_test(
    run: Run, store: st.Store, tmp_path: Path
) -> None:
    champion(store, tmp_path, test_mdice=85.0)
    run.experiment("exp1", val_mdice=90.0, val_miou=82.0, test_mdice=88.0)
    counting = st.Store.from_env()
    written = crash_at_write(counting, PROMOTION_WRITES + 100)
    selection.select(counting, "run-1", ["exp1"])
    version = st.model_prefix(models.read_production(store).version)
    assert written == [
        f"{version}/config.py",
        f"{version}/model.pth",
        f"{version}/model_card.json",
        f"{version}/_SUCCESS",
        st.PRODUCTION_KEY,  # last of the promotion: production moves in one PUT
        st.report_key("run-1"),
        st.winner_key("run-1"),
        st.manifest_key("run-1"),
    ]


@pytest.mark.parametrize("first", ["run-a", "run-b"])
def test_two_selects_at_once_make_one_champion_and_two_truthful_decisions(
    store: st.Store, tmp_path: Path, config_texts: dict[str, str], first: str
) -> None:
    """Both decide against the same champion, then race to move the pointer: the second one's
    conditional PUT fails and it decides again against the first one's winner."""
    import threading

    champion(store, tmp_path, test_mdice=70.0)
    original = models.read_production(store).version
    scores = {"run-a": 80.0, "run-b": 85.0}
    for run_id, test_mdice in scores.items():
        Run(store, run_id, tmp_path, config_texts).experiment("h1", 90.0, 82.0, test_mdice)

    both_decided = threading.Barrier(2, timeout=60)
    first_moved = threading.Event()

    def racing_store(run_id: str) -> st.Store:
        racer = st.Store.from_env()
        put = racer.client.put_object

        def put_object(**kwargs):
            if kwargs["Key"] == st.PRODUCTION_KEY and not first_moved.is_set():
                both_decided.wait()  # both have read the same champion and decided against it
                if run_id != first:
                    assert first_moved.wait(60)
                    return put(**kwargs)
                try:
                    return put(**kwargs)
                finally:
                    first_moved.set()
            return put(**kwargs)

        racer.client.put_object = put_object
        return racer

    results: dict[str, dict] = {}

    def select(run_id: str) -> None:
        results[run_id] = selection.select(racing_store(run_id), run_id, ["h1"])

    threads = [threading.Thread(target=select, args=(run_id,)) for run_id in scores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert set(results) == set(scores), "a select failed"

    # one champion, the better model, and production names it whole
    assert production_weights(store) == b"weights of h1 in run-b"
    pointer = store.get_json(st.PRODUCTION_KEY)
    a, b = (results[run_id]["promotion"] for run_id in ("run-a", "run-b"))
    if first == "run-a":  # a promoted against the original; b decided again against a and won
        assert a["decision"] == b["decision"] == "promoted"
        assert a["champion"]["version"] == original and a["champion_test_mDice"] == 70.0
        assert b["champion"]["run_id"] == "run-a" and b["champion_test_mDice"] == 80.0
        assert b["reason"] == "winner test mDice 85.0 > champion 80.0 on test set t1"
        assert pointer["previous"]["run_id"] == "run-a"
    else:  # b promoted first; a decided again against b and kept it
        assert b["decision"] == "promoted" and b["champion"]["version"] == original
        assert a["decision"] == "champion kept" and a["champion"]["run_id"] == "run-b"
        assert a["reason"] == "champion kept: winner test mDice 80.0 <= champion 85.0 on test set t1"
        assert pointer["previous"]["version"] == original
    for run_id in scores:  # what each winner.json says is what its select did
        recorded = Run(store, run_id, tmp_path, config_texts).winner()["promotion"]
        assert recorded == results[run_id]["promotion"]


def test_rollback_moves_the_pointer_to_a_kept_version(
    run: Run, store: st.Store, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    old = champion(store, tmp_path, test_mdice=85.0)
    old_version = models.read_production(store).version
    run.experiment("exp1", val_mdice=90.0, val_miou=82.0, test_mdice=88.0)
    assert run.select() == 0
    capsys.readouterr()

    assert cli.main(["models", "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {v["run_id"]: v["production"] for v in listed} == {"run-0": False, "run-1": True}

    assert cli.main(["models", "rollback", "--to", old_version]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == old_version
    assert production_weights(store) == old
    assert store.get_json(st.PRODUCTION_KEY)["reason"] == f"rollback by hand to {old_version}"
    # the next select compares against the rolled-back champion (and promotes the better winner again)
    assert run.select() == 0
    assert run.winner()["promotion"]["champion"]["version"] == old_version

    assert cli.main(["models", "rollback", "--to", "h1-0000000000000000"]) == 2
    assert "--to h1-0000000000000000: " in capsys.readouterr().err
    assert production_weights(store) == b"weights of exp1 in run-1"


def test_a_broken_pointer_stops_select_instead_of_passing_any_winner(
    run: Run, store: st.Store, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    champion(store, tmp_path, test_mdice=95.0)
    version = models.read_production(store).version
    store.put_bytes(f"{st.model_prefix(version)}/model_card.json", b'{"checkpoint_sha256": "forged"}')
    run.experiment("exp1", val_mdice=90.0, val_miou=82.0, test_mdice=88.0)
    with pytest.raises(models.ProductionError, match="names a broken model .* rollback --to VERSION"):
        selection.select(store, "run-1", ["exp1"])
    assert run.select() == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "names a broken model" in err and "Traceback" not in err
    assert not store.exists(st.winner_key("run-1"))  # no decision recorded against a broken champion
