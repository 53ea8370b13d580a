"""What a person may set when starting a run: config overrides and the quality gate. One rule for
both sides: the train CLI (`--cfg-options KEY=VALUE`, tasks.train) and evaluate read it here, and the
DAG's params form is generated from it (`cfg_options_schema`, `GATE_SCHEMA`), so a value the form
accepts is one the stages accept. Standard library only: the Airflow side imports this module.

**Overrides are values, never code.** mmengine builds objects from a config: a `type` is resolved
through its registries, which import any dotted path (`subprocess.Popen`), `custom_imports` imports
modules, `_delete_` replaces whole sections, and a string such as `class_weight` may name a pickle
file. So an override is accepted only for a key of `ALLOWED` (list items as `<i>`), with a value of
that key's kind (a whole number, a number, a boolean, a list of numbers, or one of a few names that
mmseg's or mmengine's own registries hold, checked there by tasks.train without importing anything).
Every other key is refused, with the reason for the dangerous ones. tasks.train also checks each key
against the experiment's resolved config: it must exist there, with a value of the same kind.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tasks.errors import InputError

INDEX = "<i>"  # a list item in an ALLOWED key: custom_hooks.<i>.patience
_INDEX_PATTERN = "[0-9]{1,2}"
_WHOLE = "(?:0|[1-9][0-9]{0,5})"
_NUMBER = rf"{_WHOLE}(?:\.[0-9]{{1,12}})?(?:[eE]-?[0-9]{{1,2}})?"  # finite, not negative


def _number(text: str) -> int | float:
    try:  # as mmengine's DictAction: int first, then float
        return int(text)
    except ValueError:
        return float(text)


def _sequence(item: Callable[[str], Any]) -> Callable[[str], list | tuple]:
    def parse(text: str) -> list | tuple:
        items = [item(part.strip()) for part in text.strip()[1:-1].split(",")]
        return tuple(items) if text.strip().startswith("(") else items

    return parse


@dataclass(frozen=True)
class Kind:
    """What an overridable value may be: `pattern` (a regular expression over its text, the same in
    JSON Schema and Python) and how that text becomes the value the config gets."""

    description: str
    pattern: str
    parse: Callable[[str], Any]
    registry: str | None = None  # names only: the mmseg registry (with its mmengine parent) holding them

    def accepts_text(self, text: str) -> bool:
        return re.fullmatch(self.pattern, text) is not None and "\n" not in text

    def text(self, value: Any) -> str:
        """The text of a value (a recorded one is checked as its text would be)."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, list | tuple):
            inner = ",".join(self.text(v) for v in value)
            return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
        return repr(value) if isinstance(value, float) else str(value)


def _sequence_pattern(item: str, most: int) -> str:
    body = rf" *{item}(?: *, *{item}){{0,{most - 1}}} *"
    return rf"\({body}\)|\[{body}\]"


POSITIVE_WHOLE = Kind("a whole number of at least 1", "[1-9][0-9]{0,5}", int)
WHOLE = Kind("a whole number of at least 0", _WHOLE, int)
NUMBER = Kind("a number of at least 0 (e.g. 0.01, 1e-4)", _NUMBER, _number)
FRACTION = Kind("a number in [0, 1)", r"0(?:\.[0-9]{1,12})?", _number)
BOOLEAN = Kind("true or false", "true|false|True|False", lambda text: text.lower() == "true")
DILATIONS = Kind(
    "a list of 1 to 8 whole numbers of at least 1, e.g. (1,6,12,18)",
    _sequence_pattern("[1-9][0-9]{0,2}", 8),
    _sequence(int),
)
CLASS_WEIGHTS = Kind(
    "a list of 1 to 16 numbers, e.g. [0.0585,1.0,1.0]", _sequence_pattern(_NUMBER, 16), _sequence(_number)
)
OPTIM_WRAPPER = Kind(
    "OptimWrapper or AmpOptimWrapper (mixed precision, GPU)",
    "OptimWrapper|AmpOptimWrapper",
    str,
    registry="OPTIM_WRAPPERS",
)

ALLOWED: dict[str, Kind] = {
    "train_cfg.val_interval": POSITIVE_WHOLE,
    **{f"{loader}_dataloader.batch_size": POSITIVE_WHOLE for loader in ("train", "val", "test")},
    **{f"{loader}_dataloader.num_workers": WHOLE for loader in ("train", "val", "test")},
    **{f"{loader}_dataloader.persistent_workers": BOOLEAN for loader in ("train", "val", "test")},
    "optim_wrapper.type": OPTIM_WRAPPER,
    "optim_wrapper.optimizer.lr": NUMBER,
    "optim_wrapper.optimizer.weight_decay": NUMBER,
    "optim_wrapper.optimizer.momentum": FRACTION,
    f"param_scheduler.{INDEX}.eta_min": NUMBER,
    f"param_scheduler.{INDEX}.power": NUMBER,
    "model.decode_head.channels": POSITIVE_WHOLE,
    "model.decode_head.dropout_ratio": FRACTION,
    "model.decode_head.dilations": DILATIONS,
    f"model.decode_head.loss_decode.{INDEX}.loss_weight": NUMBER,
    f"model.decode_head.loss_decode.{INDEX}.class_weight": CLASS_WEIGHTS,
    "model.auxiliary_head.loss_decode.loss_weight": NUMBER,
    "model.auxiliary_head.loss_decode.class_weight": CLASS_WEIGHTS,
    f"custom_hooks.{INDEX}.patience": POSITIVE_WHOLE,
    f"custom_hooks.{INDEX}.min_delta": NUMBER,
    "default_hooks.logger.interval": POSITIVE_WHOLE,
    "randomness.seed": WHOLE,
    "randomness.deterministic": BOOLEAN,
    "env_cfg.cudnn_benchmark": BOOLEAN,
}

# Why some keys outside ALLOWED are refused: the stage sets them itself, or they reach code.
STAGE_OWNED = {
    "train_cfg.max_epochs": "use --max-epochs (it also moves the end of the LR schedule)",
    "model.pretrained": "use --pretrained (the weights are checked and part of the training's inputs)",
    "data_root": "use --dataset",
    "work_dir": "the stage sets its own work dir",
    "load_from": "the stage resumes from its own mirror",
    "resume": "the stage resumes from its own mirror",
}
CODE = "overrides are values, never code"
CODE_KEYS = {
    "custom_imports": f"imports Python modules ({CODE})",
    "_delete_": f"replaces a whole section with what the override builds ({CODE})",
    "default_scope": f"changes the registry that turns every `type` into code ({CODE})",
    "type": (
        f"a `type` names the code mmengine builds ({CODE}); the only one that may change is "
        + ", ".join(key for key, kind in ALLOWED.items() if kind.registry)
    ),
}


def key_pattern(key: str) -> str:
    """The regular expression of an ALLOWED key (a list index for each <i>)."""
    return _INDEX_PATTERN.join(re.escape(part) for part in key.split(INDEX))


def kind_of(key: str) -> Kind | None:
    return next((kind for allowed, kind in ALLOWED.items() if re.fullmatch(key_pattern(allowed), key)), None)


def _refusal(key: str) -> str:
    """Why a key outside ALLOWED is refused."""
    parts = key.split(".")
    if key in STAGE_OWNED or parts[-1] == "data_root":
        return STAGE_OWNED.get(key, STAGE_OWNED["data_root"])
    for part in parts:
        if part in CODE_KEYS:
            return CODE_KEYS[part]
        if part.startswith("_"):
            return f"{part} is one of mmengine's special keys ({CODE})"
    return "not an override this pipeline allows; allowed: " + ", ".join(ALLOWED)


def _problem(key: str, kind: Kind | None, text: str) -> str | None:
    if kind is None:
        return _refusal(key)
    if kind.accepts_text(text):
        return None
    if kind.registry and "." in text:
        return f"a dotted name imports a module ({CODE}); expected {kind.description}"
    return f"expected {kind.description}"


def parse_items(items: Sequence[str]) -> dict[str, Any]:
    """`--cfg-options KEY=VALUE ...` -> {key: value}: each item checked against ALLOWED (InputError
    naming the first bad item's option)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise InputError(f"--cfg-options {item}: expected KEY=VALUE (e.g. train_cfg.val_interval=1)")
        kind = kind_of(key)
        problem = _problem(key, kind, text)
        if problem:
            raise InputError(f"--cfg-options {key}={text}: {problem}")
        options[key] = kind.parse(text)
    return options


def check_values(options: Mapping[str, Any]) -> dict[str, Any]:
    """Parsed or recorded overrides (e.g. a training's, read back from the store), checked by the
    same rule as their text; InputError naming the first bad one."""
    if not isinstance(options, Mapping):
        raise InputError(f"cfg_options {options!r}: expected a mapping of KEY to value")
    for key, value in options.items():
        kind = kind_of(key) if isinstance(key, str) else None
        text = "?" if kind is None else kind.text(value)
        problem = _problem(str(key), kind, text)
        if problem is None and kind.parse(text) != value:
            problem = f"expected {kind.description}"
        if problem:
            raise InputError(f"--cfg-options {key}={value}: {problem}")
    return dict(options)


def _anchored(pattern: str) -> str:
    # Anchored, one line only: JSON Schema (Python and the browser's form) searches a pattern anywhere.
    return rf"^(?!.*\n)(?:{pattern})$"


def cfg_options_schema() -> dict[str, Any]:
    """The JSON Schema of the DAG's `cfg_options` param: {KEY: "VALUE"}, the same rule as parse_items."""
    return {
        "type": ["null", "object"],
        "patternProperties": {
            _anchored(key_pattern(key)): {"type": "string", "pattern": _anchored(kind.pattern)}
            for key, kind in ALLOWED.items()
        },
        "additionalProperties": False,
    }


# ---------------------------------------------------------------- the quality gate

DEFAULT_GATE = 0.75
# The winner's test mDice / 100 must be strictly greater than the gate: a fraction in [0, 1).
GATE_SCHEMA: dict[str, Any] = {"type": "number", "minimum": 0, "exclusiveMaximum": 1}


def check_gate(value: Any) -> float:
    """The gate as select takes it, by GATE_SCHEMA's bounds (InputError otherwise)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not GATE_SCHEMA["minimum"] <= value < GATE_SCHEMA["exclusiveMaximum"]:
        raise InputError(f"--gate {value}: expected a fraction in [0, 1), e.g. {DEFAULT_GATE}")
    return float(value)
