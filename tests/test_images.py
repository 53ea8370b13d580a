"""Static checks of images/*/Dockerfile: pins from the lock files, what the tasks need, hadolint.

Each test reads the Dockerfiles and the lock files and fails when one side changes without the other;
tests/test_docker_runner.py builds the images and runs the stages in them.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import json
import re
import shlex
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
IMAGES = ("trainer", "relabel", "airflow")
HADOLINT = Path(sys.executable).with_name("hadolint")
FETCH_WEIGHTS = ROOT / "images" / "relabel" / "fetch-weights.sh"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [args for inst, args in self.instructions if inst == instruction]

    def run_text(self) -> str:
        return "\n".join(self.args("RUN"))


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions per stage, continuation lines joined, comments dropped, global ARG defaults kept."""
    logical, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        inst, _, args = line.partition(" ")
        inst = inst.upper()
        if inst == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            if inst == "ARG" and "=" in args:
                key, _, value = args.partition("=")
                global_args[key.strip()] = value.strip().strip('"')
        else:
            stages[-1].instructions.append((inst, args.strip()))
    return Dockerfile(path, global_args, stages)


def dockerfile(image: str) -> Dockerfile:
    return parse_dockerfile(ROOT / "images" / image / "Dockerfile")


def pins(path: Path) -> dict[str, str]:
    """name -> version of the `name==version` lines of a requirements/constraints file."""
    result = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\[\]-]+)==([^\s;#]+)", line.strip())
        if match:
            result[re.sub(r"\[.*\]", "", match.group(1)).lower().replace("_", "-")] = match.group(2)
    return result


LOCK = pins(REQ / "constraints.txt")


INSTALL_ENV = ROOT / "infra" / "install_env.sh"
# The script's parts in install order: its default (everything, the local environment).
INSTALL_PARTS = re.search(r'ALL_PARTS=" ([a-z0-9 ]+) "', INSTALL_ENV.read_text()).group(1).split()


def test_parser_reads_stages_and_continuations() -> None:
    """The parser the other tests stand on: stages, names, joined continuation lines."""
    trainer = dockerfile("trainer")
    assert [s.name for s in trainer.stages] == [
        "python", "torch-pins", "build", "wheels-lite", "wheels-ops", "wheels", "venv", "trainer",
    ]  # fmt: skip
    assert trainer.global_args == {"BASE_IMAGE": "debian:bookworm-slim", "MMCV_FLAVOUR": "lite"}
    assert any(
        "MMCV_OPS=1" in run and "SAM2_BUILD_CUDA=1" in run for run in trainer.stage("wheels-ops").args("RUN")
    )


def install_env_calls(image: str) -> list[tuple[str, list[str]]]:
    """(stage, parts) of every `infra/install_env.sh /opt/venv PART...` the Dockerfile runs, in order."""
    calls = []
    for stage in dockerfile(image).stages:
        for run in stage.args("RUN"):
            for match in re.finditer(r"infra/install_env\.sh /opt/venv ((?:[a-z0-9]+ ?)+)", run):
                calls.append((stage.name, match.group(1).split()))
    return calls


# ---------------------------------------------------------------- trainer


def test_trainer_installs_with_install_env_in_its_order() -> None:
    """One install procedure: the image runs infra/install_env.sh, the script `make setup` runs, with
    the same requirements/*.txt and constraints; its parts in the script's order, each once per
    flavour, every task-side part, no Airflow and no dev tools."""
    assert INSTALL_PARTS[:3] == ["tools", "torch", "tasks"] and INSTALL_PARTS[-1] == "check"
    calls = install_env_calls("trainer")
    for flavour in ("lite", "ops"):
        skipped = {"wheels-lite", "wheels-ops"} - {f"wheels-{flavour}"}
        parts = [part for stage, parts in calls if stage not in skipped for part in parts]
        assert parts == [p for p in INSTALL_PARTS if p not in ("airflow", "dev")], (flavour, parts)
    build = dockerfile("trainer").stage("build")
    assert "requirements/ requirements/" in build.args("COPY")
    assert "infra/install_env.sh infra/install_env.sh" in build.args("COPY")
    # No pip install of a requirements file outside the script (no second copy of its steps).
    assert "pip install -r" not in "\n".join(s.run_text() for s in dockerfile("trainer").stages)
    # The lock files agree with each other on what the script installs from them.
    for req in ("torch.txt", "tasks.txt", "mmcv.txt", "sam2.txt"):
        for name, version in pins(REQ / req).items():
            if name != "mmcv":  # the lock records mmcv-lite locally; mmcv.txt is mmcv's one source
                assert LOCK.get(name) == version, (
                    f"requirements/{req} pins {name}=={version}, lock {LOCK.get(name)}"
                )
    assert pins(REQ / "torch.txt") == {"torch": LOCK["torch"], "torchvision": LOCK["torchvision"]}


def test_torch_layer_depends_on_torch_pins_only() -> None:
    """The torch layer is built from torch.txt, install_env.sh and the lock's pins of torch's closure
    (images/trainer/torch-closure.sh); the whole lock comes after it, for the task side."""
    build = dockerfile("trainer").stage("build")
    order = [(inst, args) for inst, args in build.instructions if inst in ("COPY", "RUN")]
    torch_at = order.index(("RUN", "infra/install_env.sh /opt/venv tools torch"))
    assert order[:torch_at] == [
        ("COPY", "infra/install_env.sh infra/install_env.sh"),
        ("COPY", "requirements/torch.txt requirements/torch.txt"),
        ("COPY", "--from=torch-pins /pins/torch-constraints.txt requirements/constraints.txt"),
    ]
    assert order[torch_at + 1] == ("COPY", "requirements/ requirements/")
    closure = (ROOT / "images/trainer/torch-closure.sh").read_text()
    assert '-r "$req/torch.txt" -c "$req/constraints.txt"' in closure and "--dry-run" in closure
    pins_stage = dockerfile("trainer").stage("torch-pins")
    assert "torch-closure.sh /pins/requirements /pins/torch-constraints.txt" in pins_stage.run_text()


def test_trainer_is_debian_bookworm_with_the_locks_python() -> None:
    """Debian bookworm's python3.11 (the lock's Python); torch's CUDA wheels bring the CUDA runtime."""
    trainer = dockerfile("trainer")
    assert trainer.global_args["BASE_IMAGE"] == "debian:bookworm-slim"
    assert trainer.stage("python").base == "${BASE_IMAGE}"
    assert "python3.11 python3.11-venv" in (ROOT / "images/trainer/install-python.sh").read_text()
    cuda_suffixes = {m.group(1) for name in LOCK if (m := re.fullmatch(r"nvidia-.+-cu(\d+)", name))}
    assert cuda_suffixes == {LOCK["cuda-toolkit"].split(".")[0]}, (cuda_suffixes, LOCK["cuda-toolkit"])


def test_no_toolchain_outside_the_ops_stage() -> None:
    """Compilers only where the ops flavour compiles; the runtime image derives from `python`."""
    trainer = dockerfile("trainer")
    assert trainer.final.base == "python"
    for stage in trainer.stages:
        text = stage.run_text()
        has_toolchain = any(tool in text for tool in ("g++", "ninja-build", "-dev ", "cuda-toolkit"))
        assert has_toolchain == (stage.name == "wheels-ops"), stage.name
    assert not re.search(
        r"\b(g\+\+|gcc|build-essential)\b", (ROOT / "images/trainer/install-python.sh").read_text()
    )
    # The runtime takes the venv (built without compilers) and nothing from the ops stage itself.
    copies = [c for s in trainer.stages for c in s.args("COPY") if "--from=" in c]
    assert copies == [
        "--from=torch-pins /pins/torch-constraints.txt requirements/constraints.txt",
        "--from=wheels /wheels /wheels",
        "--from=venv /opt/venv /opt/venv",
    ]


def test_trainer_ops_flavour_builds_mmcv_and_sam2_with_cuda() -> None:
    ops = dockerfile("trainer").stage("wheels-ops")
    runs = ops.run_text()
    assert "MMCV_OPS=1" in runs and "SAM2_BUILD_CUDA=1" in runs and "WHEELS_DIR=/wheels" in runs
    assert "FORCE_CUDA=1" in " ".join(ops.args("ENV"))  # no GPU is visible during `docker build`
    # nvcc from PyPI's CUDA wheels at the lock's cuda-toolkit version (torch's own CUDA build).
    assert '"cuda-toolkit[nvcc,cudart,cccl,crt,nvvm]" -c requirements/constraints.txt' in runs
    cuda_major = LOCK["cuda-toolkit"].split(".")[0]
    assert f"site-packages/nvidia/cu{cuda_major}" in " ".join(ops.args("ENV"))
    script = INSTALL_ENV.read_text()
    # torch 2.14's headers need C++20; mmcv 2.1.0's setup.py says c++17 (ENVIRONMENT-NOTES.md).
    assert "s/-std=c++17/-std=c++20/g" in script and "grep -q -- '-std=c++20'" in script
    assert "MMCV_WITH_OPS=1" in script and "SAM2_BUILD_ALLOW_ERRORS=0" in script
    assert 'python -c "import mmcv._ext, sam2._C"' in dockerfile("trainer").stage("venv").run_text()
    version = pins(REQ / "mmcv.txt")["mmcv"]
    assert tuple(int(p) for p in version.split(".")) < (2, 2, 0), "mmsegmentation 1.2.2 asserts mmcv < 2.2.0"


def test_trainer_arch_list_is_valid_for_torch() -> None:
    """Every TORCH_CUDA_ARCH_LIST entry is one torch's extension builder accepts and nvcc 13 still
    compiles (CUDA 13 dropped GPUs below sm_75: torch's own build starts there)."""
    arg = next(
        a
        for a in dockerfile("trainer").stage("wheels-ops").args("ARG")
        if a.startswith("TORCH_CUDA_ARCH_LIST=")
    )
    arch_list = arg.partition("=")[2].strip('"')
    code = (
        "import os, sys, torch\n"
        "from torch.utils.cpp_extension import _get_cuda_arch_flags\n"
        "os.environ['TORCH_CUDA_ARCH_LIST'] = sys.argv[1]\n"
        "print(len(_get_cuda_arch_flags()))\n"
        "print(min(int(a[3:]) for a in torch.cuda.get_arch_list() if a.startswith('sm_')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, arch_list], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    n_flags, torch_min_sm = (int(v) for v in out.stdout.split())
    archs = [a.removesuffix("+PTX") for a in arch_list.split(";")]
    assert n_flags == len(archs) + 1  # one -gencode per arch, plus the PTX of the last
    assert min(int(a.replace(".", "")) for a in archs) >= torch_min_sm


def test_trainer_runtime_copies_what_tasks_need() -> None:
    final = dockerfile("trainer").final
    copies = final.args("COPY")
    for needed in ("tasks/ tasks/", "configs/ configs/", "pyproject.toml ./", "requirements/ requirements/"):
        assert needed in copies, needed
    assert "--from=venv /opt/venv /opt/venv" in copies
    assert any(run.startswith("infra/install_env.sh /opt/venv project check") for run in final.args("RUN"))
    assert json.loads(final.args("ENTRYPOINT")[-1]) == ["python", "-m", "tasks"]
    assert "SEGPIPE_GIT_SHA=${SEGPIPE_GIT_SHA}" in final.args("ENV")


def test_build_reads_pypi_unless_told_otherwise() -> None:
    """The index settings are build args without defaults: unset, pip reads PyPI."""
    build = dockerfile("trainer").stage("build")
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        assert name in build.args("ARG"), name
    assert "PIP_CERT=/etc/ssl/certs/ca-certificates.crt" in " ".join(build.args("ENV"))
    assert not any("PIP_INDEX_URL" in env for s in dockerfile("trainer").stages for env in s.args("ENV"))


# ---------------------------------------------------------------- relabel


def _relabel_constants() -> dict[str, str]:
    """tasks.relabel's weight file names, read from its source (no heavy import)."""
    tree = ast.parse((ROOT / "tasks" / "relabel.py").read_text())
    return {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }


def test_relabel_builds_on_trainer_which_carries_sam2_and_ultralytics() -> None:
    relabel = dockerfile("relabel")
    assert relabel.final.base == "${TRAINER_IMAGE}"
    runs = relabel.final.run_text()
    assert "'sam2', 'ultralytics'" in runs  # the build fails if either is missing
    assert "sam2" in [part for _, parts in install_env_calls("trainer") for part in parts]
    assert "ultralytics" in pins(REQ / "tasks.txt")


def test_relabel_bakes_weights_where_tasks_relabel_names_them() -> None:
    relabel = dockerfile("relabel").final
    constants = _relabel_constants()
    args = {a.partition("=")[0]: a.partition("=")[2] for a in relabel.args("ARG")}
    for url_arg in ("YOLO_WEIGHTS_URL", "SAM2_WEIGHTS_URL"):
        assert args[url_arg] == '""', f"{url_arg} must default to empty: weights from the store at run time"
    fetch = next(run for run in relabel.args("RUN") if "fetch-weights.sh" in run)
    for key, url_arg in (
        ("YOLO_WEIGHTS_FILE", "YOLO_WEIGHTS_URL"),
        ("SAM2_CHECKPOINT_FILE", "SAM2_WEIGHTS_URL"),
    ):
        filename = constants[key]
        assert re.search(rf'"\${url_arg}" "\$\w+" "\$SEGPIPE_WEIGHTS_DIR/{re.escape(filename)}"', fetch), (
            filename
        )
    assert "SEGPIPE_WEIGHTS_DIR=/opt/segpipe/weights" in relabel.args("ENV")


def _fetch(url: str, sha256: str, dest: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(FETCH_WEIGHTS), url, sha256, str(dest)], capture_output=True, text=True, timeout=60
    )


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    """A zip archive, the container format of torch checkpoints."""
    path = tmp_path / "source" / "weights.pt"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    return path


def test_fetch_weights_downloads_and_verifies(checkpoint: Path, tmp_path: Path) -> None:
    dest = tmp_path / "baked" / "yolov8x.pt"
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    result = _fetch(checkpoint.as_uri(), sha, dest)
    assert result.returncode == 0, result.stderr
    assert dest.read_bytes() == checkpoint.read_bytes()
    assert not dest.with_name("yolov8x.pt.part").exists()


def test_fetch_weights_refuses_bad_downloads(checkpoint: Path, tmp_path: Path) -> None:
    dest = tmp_path / "baked" / "yolov8x.pt"
    wrong = _fetch(checkpoint.as_uri(), "0" * 64, dest)
    assert wrong.returncode == 1 and "sha256" in wrong.stderr and not dest.exists()
    page = tmp_path / "error.html"
    page.write_text("<html>404 Not Found</html>")
    not_zip = _fetch(page.as_uri(), "", dest)
    assert not_zip.returncode == 1 and "not a torch checkpoint" in not_zip.stderr and not dest.exists()
    assert not list(dest.parent.glob("*.part"))


def test_fetch_weights_without_url_bakes_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "baked" / "sam2.1_hiera_large.pt"
    result = _fetch("", "", dest)
    assert result.returncode == 0 and "read from the store at run time" in result.stdout
    assert not dest.exists()


# ---------------------------------------------------------------- airflow


def test_airflow_image_matches_the_airflow_pins() -> None:
    airflow = dockerfile("airflow").final
    match = re.fullmatch(r"apache/airflow:(\S+)-python(\d+\.\d+)", airflow.base)
    assert match, airflow.base
    assert match.group(1) == pins(REQ / "airflow.txt")["apache-airflow"] == LOCK["apache-airflow"]
    assert (
        match.group(2) == "3.11" and "python3.11" in (ROOT / "images/trainer/install-python.sh").read_text()
    )
    runs = airflow.run_text()
    assert (
        "-r /opt/segpipe/requirements/airflow.txt" in runs
        and "-c /opt/segpipe/requirements/constraints.txt" in runs
    )
    assert "pip check" in runs
    assert "dags/ /opt/airflow/dags/" in airflow.args("COPY")
    assert any("infra/airflow-init.sh" in c and "infra/pools.json" in c for c in airflow.args("COPY"))
    # The scheduler side stays light: no task-side package in its requirements.
    assert not {"torch", "torchvision", "mmcv", "mmsegmentation", "ultralytics"} & set(
        pins(REQ / "airflow.txt")
    )


# ---------------------------------------------------------------- every image


@pytest.mark.parametrize("image", IMAGES)
def test_image_runs_as_non_root(image: str) -> None:
    users = dockerfile(image).final.args("USER")
    assert users, f"images/{image}/Dockerfile sets no USER"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root"), f"images/{image}/Dockerfile ends as root"


def _hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(HADOLINT),
            "--config",
            str(ROOT / ".hadolint.yaml"),
            "--no-color",
            "--format",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("image", IMAGES)
def test_hadolint_passes(image: str) -> None:
    result = _hadolint(ROOT / "images" / image / "Dockerfile")
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and not findings, "\n".join(
        f"{f['line']} {f['code']}: {f['message']}" for f in findings
    )


def test_hadolint_config_is_active(tmp_path: Path) -> None:
    """The same config flags what the images avoid: untrusted registry, root user, unpinned pip."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM quay.io/example/base:1\nUSER root\nRUN pip install requests\n")
    codes = {f["code"] for f in json.loads(_hadolint(bad).stdout)}
    assert {"DL3026", "DL3002", "DL3013", "DL3042"} <= codes


@pytest.mark.parametrize("image", IMAGES)
def test_inline_hadolint_ignores_are_justified(image: str) -> None:
    lines = (ROOT / "images" / image / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            assert i > 0 and lines[i - 1].startswith("#") and not lines[i - 1].startswith("# hadolint"), (
                f"images/{image}/Dockerfile:{i + 1}: say why above the ignore"
            )


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:  # later patterns win, `!` re-includes: Docker's rule
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        if any(
            fnmatch.fnmatch(candidate, glob) or fnmatch.fnmatch(candidate, glob.removeprefix("**/"))
            for candidate in [path, *[str(p) for p in Path(path).parents if str(p) != "."]]
        ):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_secrets_out_and_sources_in() -> None:
    patterns = _dockerignore_patterns()
    for secret in (".env", ".env.local", ".venv/bin/python", ".git/config", "models/best.pth"):
        assert _ignored(secret, patterns), secret
    for image in IMAGES:
        for stage in dockerfile(image).stages:
            for args in stage.args("COPY"):
                if "--from=" in args:  # from another stage, not from the build context
                    continue
                words = [w for w in shlex.split(args) if not w.startswith("--")]
                for source in words[:-1]:
                    assert (ROOT / source.rstrip("/")).exists() or "*" in source, (
                        f"{image}: COPY {source} missing"
                    )
                    assert not _ignored(source.rstrip("/"), patterns), (
                        f"{image}: COPY {source} is .dockerignored"
                    )
