"""Select: winner by val mDice, quality gate on its test mDice, champion/challenger promotion, report.

Rule (the study's): the winner is the experiment with the highest validation mDice. Test metrics are
reported, never used to choose. Ties (mmseg reports 2 decimals, so equal values happen) go to the
higher val mIoU, then to the earlier experiment in the fixed order of tasks.experiments (each file's
`order`, then its name: h1, h2, exp1, exp2, ...; the simpler setting wins a full tie), defined for
any set of experiment files.
Gate: the winner's test mDice / 100 must exceed the gate (a fraction, default 0.75), else nothing is
promoted, winner.json/report.md say so and the step exits 3.
Champion/challenger: the winner becomes production (tasks.models: models/<version>/ written once,
then the pointer models/production.json, conditionally) only if its test mDice beats the champion's
on the same test set, i.e. the same test-set version (test_set_version: the content hash of
images/test and labels/test, written by evaluate into test_metrics.json and by promotion into
model_card.json; strictly: an equal score keeps the champion). More train or val data makes a new
dataset version but leaves the test set, and so the comparison, unchanged. A model card or an
evaluation written before test-set versions existed has only the whole dataset version: then the two
dataset versions are compared instead, and the reason says so. A champion measured on another test
set cannot be compared, and re-evaluating it is not this step's job (its checkpoint may come from code
or a config this image no longer runs), so the gated winner is promoted and winner.json says why.
Two selects promoting at once: the pointer's conditional PUT lets one win; the other decides again
against the new champion (`promote`), so winner.json always names the champion it was compared to.
`champion_decision` (decide) and `promote` (write) are separate steps: an approval can sit between.
Approval (the DAG's `approval: required`): `--approval pending` decides and reports without promoting
("awaiting approval"); once a person answers, select runs again with `--approval approved|rejected|
timed-out --responder NAME`: the same decision taken again (against production as it is then), the
winner promoted only if approved; winner.json (`approval`) and report.md say which and who.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks import experiments as ex
from tasks import models, overrides
from tasks import store as st
from tasks.errors import InputError, QualityGateError
from tasks.experiments import PER_CLASS_KEYS, SUMMARY_KEYS
from tasks.manifest import update_manifest

log = logging.getLogger(__name__)

DEFAULT_GATE = overrides.DEFAULT_GATE  # one default for the CLI and the DAG form
TEST_SET_VERSION = "test_set_version"  # in test_metrics.json (evaluate) and model_card.json
TIE_BREAK = "higher val mDice; tie -> higher val mIoU; tie -> fixed order " + ", ".join(ex.names())
# --approval: the request's state -> the decision when the winner is not (yet) promoted
APPROVAL_HELD = {
    "pending": "awaiting approval",
    "rejected": "not promoted: rejected by {by}",
    "timed-out": "not promoted: approval timed out (no answer)",
}
APPROVAL_STATES = ("approved", *APPROVAL_HELD)
RESPONDER = re.compile(r"[^\x00-\x1f\x7f]{1,128}")  # a user name: one line of printable text


class NoCandidateError(RuntimeError):
    """None of the requested experiments has published train and eval outputs."""


@dataclass
class Candidate:
    experiment: str
    val: dict
    test: dict
    checkpoint_key: str  # the evaluated checkpoint, a key under the train stage's prefix
    description: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)  # the train stage's recorded inputs (its marker)
    rank: int = 0

    def sort_key(self) -> tuple:
        return (-self.val["mDice"], -self.val["mIoU"], ex.get(self.experiment).sort_key())

    def val_class(self, cls: str, key: str) -> float | None:
        return self.val["per_class"].get(cls, {}).get(key)


# ---------------------------------------------------------------- reading the stages' outputs


def parse_experiments(text: str) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in ex.catalogue()]
    if not names or unknown:
        raise InputError(f"--experiments {text!r}: expected a comma list of {', '.join(ex.names())}")
    return names


def _check_metrics(doc: Any, key: str, text_keys: tuple[str, ...] = ()) -> list[str]:
    if not isinstance(doc, dict):
        return [f"{key}: not a JSON object"]
    problems = [
        f"{key}: '{name}' missing or not a number"
        for name in SUMMARY_KEYS
        if not isinstance(doc.get(name), int | float)
    ]
    problems += [
        f"{key}: '{name}' missing or not a string" for name in text_keys if not isinstance(doc.get(name), str)
    ]
    per_class = doc.get("per_class")
    if not isinstance(per_class, dict) or not all(isinstance(v, dict) for v in per_class.values()):
        problems.append(f"{key}: 'per_class' missing or not a mapping of class -> metrics")
    return problems


def load_candidate(store: st.Store, run_id: str, experiment: str) -> Candidate | str:
    """The experiment's val/test metrics, or a string saying why it has none (a failed experiment)."""
    train_prefix = st.stage_prefix(run_id, "train", experiment)
    eval_prefix = st.stage_prefix(run_id, "eval", experiment)
    train_marker = store.marker(train_prefix)
    if train_marker is None:
        return f"train stage has not published outputs ({store.uri(train_prefix)}/)"
    eval_marker = store.marker(eval_prefix)
    if eval_marker is None:
        return f"evaluate stage has not published outputs ({store.uri(eval_prefix)}/)"
    val_key, test_key = f"{train_prefix}/val_metrics.json", f"{eval_prefix}/test_metrics.json"
    missing = [
        key
        for key, marker, prefix in (
            (val_key, train_marker, train_prefix),
            (test_key, eval_marker, eval_prefix),
        )
        if key[len(prefix) + 1 :] not in marker["files"]
    ]
    if missing:
        return f"published outputs lack {', '.join(store.uri(k) for k in missing)}"
    val, test = store.get_json(val_key), store.get_json(test_key)
    problems = _check_metrics(val, store.uri(val_key)) + _check_metrics(
        test, store.uri(test_key), ("checkpoint", "checkpoint_sha256", "dataset_version")
    )
    if problems:
        return "; ".join(problems)
    checkpoint_key = test["checkpoint"]
    checkpoint = checkpoint_key.removeprefix(f"{train_prefix}/")
    if checkpoint == checkpoint_key or checkpoint not in train_marker["files"]:
        return (
            f"{store.uri(test_key)}: checkpoint {checkpoint_key!r} is not one of {store.uri(train_prefix)}/"
        )
    if test.get("checkpoint_sha256") != train_marker["files"][checkpoint]:
        return (
            f"{store.uri(test_key)} evaluated another version of {store.uri(checkpoint_key)} "
            "(stale evaluation: re-run evaluate)"
        )
    # what the experiment's file says it tests (tasks.experiments); the config in the store is never read
    description = ex.get(experiment).description()
    return Candidate(experiment, val, test, checkpoint_key, description, train_marker.get("inputs") or {})


# ---------------------------------------------------------------- the decision


def rank(candidates: list[Candidate]) -> list[Candidate]:
    ordered = sorted(candidates, key=Candidate.sort_key)
    for position, candidate in enumerate(ordered, start=1):
        candidate.rank = position
    return ordered


def comparison_basis(winner: Candidate, champion: dict) -> tuple[str, Any, Any, str]:
    """(what is compared, the champion's value, the winner's value, a note) for champion/challenger.

    The test-set version when both records have one; else (a model card or an evaluation written
    before test-set versions existed) the whole dataset version, with a note saying so."""
    theirs, ours = champion.get(TEST_SET_VERSION), winner.test.get(TEST_SET_VERSION)
    if theirs is not None and ours is not None:
        return "test set", theirs, ours, ""
    older = [
        name
        for name, value in (("the champion's model card", theirs), ("the winner's test_metrics.json", ours))
        if value is None
    ]
    note = f" ({' and '.join(older)} predates test-set versions, so whole dataset versions were compared)"
    return "dataset version", champion.get("dataset_version"), winner.test["dataset_version"], note


def champion_decision(winner: Candidate, champion: dict | None, run_id: str) -> tuple[bool, str]:
    """(replace the champion?, why) for a winner that passed the gate."""
    if champion is None:
        return True, "no champion in production yet"
    ours = winner.test["mDice"]
    theirs = champion.get("test_metrics", {}).get("mDice")
    same_model = (
        champion.get("run_id") == run_id
        and champion.get("experiment") == winner.experiment
        and champion.get("checkpoint_sha256") == winner.test.get("checkpoint_sha256")
    )
    if same_model:
        return False, "the winner already is the production champion"
    basis, champion_on, winner_on, note = comparison_basis(winner, champion)
    promote_anyway = "re-evaluating the champion is not part of this step, so the gated winner is promoted"
    if theirs is None:
        return True, f"not comparable: the champion's model card records no test mDice -> {promote_anyway}"
    if champion_on != winner_on:
        return True, (
            f"not comparable: champion measured on {basis} {champion_on}, challenger on {winner_on}"
            f"{note} -> {promote_anyway}"
        )
    if ours > theirs:
        return True, f"winner test mDice {ours} > champion {theirs} on {basis} {winner_on}{note}"
    return False, f"champion kept: winner test mDice {ours} <= champion {theirs} on {basis} {winner_on}{note}"


def model_card(run_id: str, winner: Candidate, gate: float) -> dict:
    """What models/<version>/model_card.json says about the model (the same bytes for the same winner,
    so a retried or concurrent promotion of one model writes identical files)."""
    return {
        "run_id": run_id,
        "experiment": winner.experiment,
        "description": winner.description,
        # what rebuilds the model's config from the repository (predict; tasks.train.training_config)
        "training": {
            key: winner.training.get(key) for key in ("experiment", "profile", "max_epochs", "cfg_options")
        },
        "checkpoint": winner.checkpoint_key,
        "checkpoint_sha256": winner.test["checkpoint_sha256"],
        "dataset_version": winner.test["dataset_version"],
        "dataset_uri": winner.test.get("dataset_uri"),
        "evaluated_at": winner.test.get("evaluated_at"),
        "test_split": winner.test.get("split", "test"),
        TEST_SET_VERSION: winner.test.get(TEST_SET_VERSION),  # the test set test_metrics were measured on
        "val_metrics": winner.val,
        "test_metrics": winner.test,
        "gate": gate,
        "selection_rule": TIE_BREAK,
    }


def promote(
    store: st.Store, run_id: str, winner: Candidate, gate: float, production: models.Production
) -> tuple[bool, str, models.Production]:
    """Promote a winner `champion_decision` chose against `production`: (promoted?, why, the champion
    finally compared against).

    models/<version>/ first (written once), then the pointer, conditionally on production being
    still what was decided against. If another promotion moved it meanwhile, the decision is taken
    again against the new champion (which may now keep it), at most POINTER_ATTEMPTS times.
    """
    train_prefix = st.stage_prefix(run_id, "train", winner.experiment)
    with tempfile.TemporaryDirectory(dir=st.work_dir()) as tmp:
        weights = store.download_file(winner.checkpoint_key, Path(tmp) / "model.pth")  # sha256-verified
        config_text = store.get_text(f"{train_prefix}/config.py")
        version = models.publish_version(store, model_card(run_id, winner, gate), weights, config_text)
    for _ in range(models.POINTER_ATTEMPTS):
        replace, reason = champion_decision(winner, production.card, run_id)
        if not replace:
            return False, reason, production
        if models.move_production(store, version, production, reason):
            log.info("promoted %s of run %s: %s", winner.experiment, run_id, store.uri(st.PRODUCTION_KEY))
            return True, reason, production
        log.warning("production changed while promoting %s: deciding again", winner.experiment)
        production = models.read_production(store)
    attempts = models.POINTER_ATTEMPTS
    raise RuntimeError(f"{store.uri(st.PRODUCTION_KEY)} kept changing during {attempts} attempts")


# ---------------------------------------------------------------- report


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def render_report(run_id: str, ranked: list[Candidate], failed: dict[str, str], result: dict) -> str:
    lines = [f"# Run {run_id}: model selection", ""]
    lines += [
        f"Winner rule: {TIE_BREAK}. Test metrics are reported only, never used to choose.",
        "Values in percent, as mmseg's IoUMetric reports them (means over background, cat, dog).",
        "",
        "## Comparison (validation split)",
        "",
        "Each experiment as its file under configs/ describes it (the full profile's settings; "
        "another profile, e.g. cpu, shrinks model and schedule: configs/profiles/).",
        "",
        "| experiment | tests | model | augmentation | weighting | profile | val mDice | val mIoU "
        "| cat Dice | dog Dice | best epoch | rank |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in ranked:
        d = c.description
        lines.append(
            f"| {c.experiment} | {d['hypothesis']} | {d['model']} | {d['augmentation']} | {d['weighting']} "
            f"| {_fmt(c.val.get('profile'))} "
            f"| {_fmt(c.val['mDice'])} | {_fmt(c.val['mIoU'])} | {_fmt(c.val_class('cat', 'Dice'))} "
            f"| {_fmt(c.val_class('dog', 'Dice'))} | {_fmt(c.val.get('best_epoch'))} | {c.rank} |"
        )
    if ranked:
        w = ranked[0]
        lines += [
            "",
            f"## Winner: {w.experiment}, test split (test set version {w.test.get(TEST_SET_VERSION)}, "
            f"dataset version {w.test.get('dataset_version')}, checkpoint {w.checkpoint_key})",
            "",
            "| aAcc | mIoU | mAcc | mDice |",
            "|---|---|---|---|",
            "| " + " | ".join(_fmt(w.test[k]) for k in SUMMARY_KEYS) + " |",
            "",
            "| class | IoU | Dice | Acc |",
            "|---|---|---|---|",
        ]
        for cls, values in w.test["per_class"].items():
            lines.append(f"| {cls} | " + " | ".join(_fmt(values.get(k)) for k in PER_CLASS_KEYS) + " |")
        gate = result["gate"]
        verdict = "passed" if gate["passed"] else "FAILED: nothing promoted"
        lines += [
            "",
            "## Quality gate",
            "",
            f"test mDice {gate['value']:.4f} (fraction) must exceed {gate['threshold']}: {verdict}.",
            "",
            "## Champion / challenger",
            "",
            f"Decision: **{result['promotion']['decision']}** ({result['promotion']['reason']}).",
            f"Challenger ({w.experiment}) test mDice: {_fmt(result['promotion']['challenger_test_mDice'])}; "
            f"champion test mDice: {_fmt(result['promotion']['champion_test_mDice'])}.",
        ]
    if approval := result.get("approval"):
        lines += ["", "## Approval", ""]
        who = f" by {approval['by']}" if approval.get("by") else ""
        lines.append(f"Required: **{approval['status']}**{who} at {approval['at']}.")
    lines += ["", "## Failed experiments", ""]
    lines += [f"- {name}: {why}" for name, why in failed.items()] or ["none"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the step


def select(
    store: st.Store,
    run_id: str,
    experiments: list[str],
    gate: float = DEFAULT_GATE,
    promote_winner: bool = True,
    approval: dict | None = None,
) -> dict:
    """Decide, report (winner.json, report.md, manifest end time), promote; the winner.json content.

    A winner that fails the gate is reported and not promoted (`enforce_gate` turns that into the
    step's failure); NoCandidateError when no requested experiment has train and eval outputs.
    `approval` ({"status": one of APPROVAL_STATES, "by": name or None, "at": time}): only an
    approved winner is promoted; the others are reported as held (APPROVAL_HELD).
    """
    st.check_run_id(run_id)
    candidates, failed = [], {}
    for experiment in experiments:
        loaded = load_candidate(store, run_id, experiment)
        if isinstance(loaded, str):
            log.warning("experiment %s failed: %s", experiment, loaded)
            failed[experiment] = loaded
        else:
            candidates.append(loaded)
    ranked = rank(candidates)
    result: dict[str, Any] = {
        "run_id": run_id,
        "decided_at": st.utc_now(),
        "rule": TIE_BREAK,
        "experiments_requested": experiments,
        "ranking": [
            {
                "experiment": c.experiment,
                "rank": c.rank,
                "val_mDice": c.val["mDice"],
                "val_mIoU": c.val["mIoU"],
                "test_mDice": c.test["mDice"],
            }
            for c in ranked
        ],
        "failed": failed,
        "winner": None,
    }
    if approval is not None:
        result["approval"] = approval
    if not ranked:
        result["promotion"] = {"decision": "nothing to select", "promoted": False}
        _write_reports(store, run_id, ranked, failed, result)
        raise NoCandidateError(
            f"run {run_id}: none of {', '.join(experiments)} has published train and eval outputs: "
            + "; ".join(f"{k}: {v}" for k, v in failed.items())
        )

    winner = ranked[0]
    fraction = winner.test["mDice"] / 100
    production = models.read_production(store)
    result["winner"] = {
        "experiment": winner.experiment,
        "val_mDice": winner.val["mDice"],
        "val_mIoU": winner.val["mIoU"],
        "test_mDice": winner.test["mDice"],
        "test_metrics": {k: winner.test[k] for k in SUMMARY_KEYS},
        "checkpoint": winner.checkpoint_key,
        "checkpoint_sha256": winner.test["checkpoint_sha256"],
        "dataset_version": winner.test["dataset_version"],
        TEST_SET_VERSION: winner.test.get(TEST_SET_VERSION),
    }
    result["gate"] = {"threshold": gate, "value": round(fraction, 6), "passed": fraction > gate}
    if not result["gate"]["passed"]:
        result["gate"]["message"] = (
            f"run {run_id}: winner {winner.experiment} has test mDice {winner.test['mDice']} "
            f"({fraction:.4f}), which does not exceed the gate {gate}; nothing was promoted"
        )
        result["promotion"] = {
            "decision": "not promoted: quality gate failed",
            "reason": f"test mDice {fraction:.4f} does not exceed the gate {gate}",
            "promoted": False,
            **_champion_numbers(winner, production),
        }
    else:
        replace, reason = champion_decision(winner, production.card, run_id)
        held = approval is not None and approval["status"] != "approved"
        promoted = False
        if replace and promote_winner and not held:
            promoted, reason, production = promote(store, run_id, winner, gate, production)
        if not promote_winner:
            decision = "not promoted: --no-promote" + (" (would replace the champion)" if replace else "")
        elif held:
            decision = APPROVAL_HELD[approval["status"]].format(by=approval.get("by"))
            decision += " (would replace the champion)" if replace else " (the champion stays either way)"
        else:
            decision = "promoted" if promoted else "champion kept"
            if approval is not None:
                decision += f" (approved by {approval['by']})"
        result["promotion"] = {
            "decision": decision,
            "reason": reason,
            "promoted": promoted,
            **_champion_numbers(winner, production),
        }

    _write_reports(store, run_id, ranked, failed, result)
    return result


def _champion_numbers(winner: Candidate, production: models.Production) -> dict:
    """Both numbers of the decision, and which champion it was taken against."""
    champion, pointer = production.card, production.pointer or {}
    return {
        "challenger_test_mDice": winner.test["mDice"],
        "champion_test_mDice": None if champion is None else champion.get("test_metrics", {}).get("mDice"),
        "champion": None
        if champion is None
        else {
            "version": production.version,
            "promoted_at": pointer.get("promoted_at"),
            **{k: champion.get(k) for k in ("run_id", "experiment", "dataset_version", TEST_SET_VERSION)},
        },
    }


def _write_reports(
    store: st.Store, run_id: str, ranked: list[Candidate], failed: dict[str, str], result: dict
) -> None:
    # report.md first, winner.json last: winner.json present means the decision is complete.
    store.put_text(st.report_key(run_id), render_report(run_id, ranked, failed, result))
    store.put_json(st.winner_key(run_id), result)
    winner = result["winner"]["experiment"] if result["winner"] else None
    update_manifest(
        store,
        run_id,
        ended_at=st.utc_now(),
        selection={"winner": winner, "decision": result["promotion"]["decision"], "failed": sorted(failed)},
    )


def enforce_gate(result: dict) -> None:
    """Raise QualityGateError when the decision in `result` failed the quality gate."""
    gate = result.get("gate")
    if gate is not None and not gate["passed"]:
        raise QualityGateError(gate["message"])


def summary(result: dict) -> dict:
    """The short JSON select prints on stdout."""
    winner = result["winner"] or {}
    promotion = result["promotion"]
    return {
        "run_id": result["run_id"],
        "winner": winner.get("experiment"),
        "val_mDice": winner.get("val_mDice"),
        "test_mDice": winner.get("test_mDice"),
        "gate_passed": result.get("gate", {}).get("passed"),
        "decision": promotion["decision"],
        "promoted": promotion["promoted"],
        "failed": sorted(result["failed"]),
    }


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", required=True, help="the run whose experiments to compare")
    parser.add_argument(
        "--gate",
        type=float,
        default=DEFAULT_GATE,
        help=f"minimum test mDice as a fraction (default {DEFAULT_GATE}); the winner must exceed it",
    )
    parser.add_argument(
        "--experiments",
        default=",".join(ex.default_names()),
        help=f"comma list of experiments to compare (default {','.join(ex.default_names())})",
    )
    parser.add_argument("--no-promote", action="store_true", help="decide and report; never touch production")
    parser.add_argument(
        "--approval",
        choices=APPROVAL_STATES,
        help="a person's approval of the promotion: pending (decide, report, wait), approved (promote), "
        "rejected or timed-out (promote nothing)",
    )
    parser.add_argument("--responder", help="who answered the approval request (approved, rejected)")


def parse_approval(status: str | None, responder: str | None) -> dict | None:
    """--approval/--responder -> winner.json's `approval` (InputError on a missing or stray name)."""
    if status is None:
        if responder is not None:
            raise InputError("--responder without --approval")
        return None
    answered = status in ("approved", "rejected")
    if answered and (responder is None or not RESPONDER.fullmatch(responder)):
        raise InputError(f"--approval {status} needs --responder NAME (one line, 1-128 characters)")
    if not answered and responder is not None:
        raise InputError(f"--approval {status} takes no --responder (nobody answered)")
    return {"status": status, "by": responder, "at": st.utc_now()}


def main(args: argparse.Namespace) -> int:
    overrides.check_gate(args.gate)  # the DAG's quality_gate param has the same bounds
    experiments = parse_experiments(args.experiments)
    approval = parse_approval(args.approval, args.responder)
    store = st.Store.from_env()
    try:
        result = select(
            store, args.run_id, experiments, args.gate, promote_winner=not args.no_promote, approval=approval
        )
    except (NoCandidateError, models.ProductionError) as err:  # upstream stages failed, or production
        print(f"error: {err}", file=sys.stderr)  # names a broken model: exit 1, one clear line
        return 1
    print(json.dumps(summary(result), sort_keys=True))
    enforce_gate(result)
    return 0
