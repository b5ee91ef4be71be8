"""The ``clipline`` command line's contract: help, version, exit codes, output modes.

The CLI runs as a subprocess (``python -m clipline.cli``), as a user runs it, with its
own state directory and no CLIPLINE_* variables from the environment. Unreachable
services are real closed ports (bound, then closed); the job tests with an API are in
``tests/api/test_api_cli.py``, those with a running stack in ``test_stack_hardening.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import redis

from clipline import cli
from clipline.display import JobDisplay
from clipline.stack import StackError
from clipline_core.errors import ApiError, ClipError, ErrorCode
from clipline_core.job import JobProgress, JobState

CLI = [sys.executable, "-m", "clipline.cli"]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("CLIPLINE_")}
    out.pop("REDIS_URL", None)
    out["CLIPLINE_STATE_DIR"] = str(tmp_path / "state")
    out["CLIPLINE_DEPLOYMENT"] = "t-cli"
    return out


def run(
    args: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_version(env: dict[str, str]) -> None:
    proc = run(["--version"], env)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"clipline {version('clipline')}"


def test_help_is_plain_text_with_the_exit_codes(env: dict[str, str]) -> None:
    proc = run(["--help"], env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "``" not in out and ":class:" not in out and "::" not in out
    for word in ("highlight", "list", "cancel", "logs", "--quiet", "--verbose", "--no-color"):
        assert word in out
    codes = out[out.index("exit codes:") :]
    for code in ("0 ", "1 ", "2 ", "3 ", "130 "):
        assert f"\n  {code}" in codes, codes


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += _parsers(sub)
    return found


def test_every_option_has_help() -> None:
    missing = [
        f"{p.prog} {'/'.join(a.option_strings) or a.dest}"
        for p in _parsers(cli.build_parser())
        for a in p._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
        and (not a.help or a.help == argparse.SUPPRESS)
    ]
    assert missing == []


def test_exit_code_is_one_mapping() -> None:
    assert cli.exit_code(None) == 0
    assert cli.exit_code("succeeded") == 0
    assert cli.exit_code("failed") == cli.exit_code("cancelled") == 1
    assert cli.exit_code(cli.BadInput("x")) == 2
    assert cli.exit_code(ClipError(ErrorCode.NOT_FOUND, "x")) == 2
    assert cli.exit_code(cli.WaitTimeout("x")) == 1
    assert cli.exit_code(ApiError(422, "invalid_request", "x")) == 2
    assert cli.exit_code(ApiError(401, "unauthenticated", "x")) == 2
    assert cli.exit_code(ApiError(0, "unreachable", "x")) == 3
    assert cli.exit_code(ApiError(503, "unavailable", "x")) == 3
    assert cli.exit_code(ApiError(0, "timeout", "x")) == 1
    assert cli.exit_code(redis.ConnectionError("x")) == 3
    assert cli.exit_code(StackError("x")) == 3
    assert cli.exit_code(cli.Unavailable("x")) == 3
    assert cli.exit_code(KeyboardInterrupt()) == 130
    assert cli.exit_code(RuntimeError("a bug")) == 1


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["highlight", "missing.mp4", "--image", "p.jpg", "--json"], "not_found"),
        (["highlight", "text.mp4", "--image", "p.jpg", "--json"], "not_a_video"),
        (["highlight", "v.avi", "--image", "text.mp4", "--json"], "not_an_image"),
        (["highlight", "v.avi", "--image", "p.jpg", "--duration", "600", "--json"], None),
    ],
)
def test_bad_input_exits_2_before_any_job(
    env: dict[str, str], tmp_path: Path, media: dict[str, Path], args: list[str], code: str | None
) -> None:
    (tmp_path / "v.avi").write_bytes(media["short"].read_bytes())
    (tmp_path / "p.jpg").write_bytes(media["product"].read_bytes())
    (tmp_path / "text.mp4").write_text("not a video\n" * 40)
    env["REDIS_URL"] = f"redis://127.0.0.1:{closed_port()}"  # never reached
    proc = run(args, env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "failed" and out["job_id"] is None
    assert out["error"]["code"] == (code or "invalid_request"), out


def test_usage_errors_exit_2(env: dict[str, str]) -> None:
    for args in (
        ["highlight", "v.mp4"],  # no --image
        ["highlight", "v.mp4", "--image", "p.jpg", "--duration", "nan"],
        ["list", "--state", "sleeping"],
        ["logs", "everything"],
        ["no-such-command"],
    ):
        proc = run(args, env)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "usage:" in proc.stderr


def test_redis_unreachable_exits_3(
    env: dict[str, str], tmp_path: Path, media: dict[str, Path]
) -> None:
    env["REDIS_URL"] = f"redis://127.0.0.1:{closed_port()}"
    args = ["highlight", str(media["short"]), "--image", str(media["product"])]
    proc = run([*args, "--out", str(tmp_path / "out")], env)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Redis is unreachable" in proc.stderr
    proc = run([*args, "--out", str(tmp_path / "out"), "--json"], env)
    assert proc.returncode == 3
    assert json.loads(proc.stdout)["error"]["code"] == "unavailable"


def test_no_stack_exits_3(env: dict[str, str]) -> None:
    for args in (
        ["status"],
        ["submit", "https://example.com/v.mp4", "--image", "https://example.com/p.jpg"],
        ["wait", "0" * 32],
        ["list"],
        ["cancel", "0" * 32],
        ["logs"],
        ["logs", "worker"],
    ):
        proc = run(args, env)
        assert proc.returncode == 3, (args, proc.stdout, proc.stderr)
        assert "clipline up" in proc.stderr, proc.stderr
    status = run(["status", "--json"], env)
    assert status.returncode == 3 and json.loads(status.stdout)["up"] is False


def test_api_unreachable_exits_3(env: dict[str, str]) -> None:
    env.update(CLIPLINE_API_URL=f"http://127.0.0.1:{closed_port()}", CLIPLINE_API_KEY="clk_x")
    for args in (["job", "0" * 32], ["list"], ["cancel", "0" * 32], ["wait", "0" * 32]):
        proc = run(args, env)
        assert proc.returncode == 3, (args, proc.stderr)
        assert "the API is unreachable" in proc.stderr


def test_no_api_key_for_a_remote_api_exits_2(env: dict[str, str]) -> None:
    env["CLIPLINE_API_URL"] = f"http://127.0.0.1:{closed_port()}"
    proc = run(["list"], env)
    assert proc.returncode == 2 and "CLIPLINE_API_KEY" in proc.stderr


def test_plain_display_lines() -> None:
    """Off a terminal: one line per state (passed-over ones too) and per progress change."""
    out = io.StringIO()
    d = JobDisplay("plain", stream=out)
    d.update(JobState.QUEUED)
    d.update(JobState.DECODING, JobProgress(stage="decoding", frames=12, chunks=2, chunks_done=1))
    d.update(JobState.DECODING, JobProgress(stage="decoding", frames=12, chunks=2, chunks_done=1))
    d.update(JobState.QUEUED)  # the attempt failed: retried
    d.update(JobState.SUCCEEDED)
    lines = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == [
        "queued",
        "fetching",
        "decoding",
        "decoding: 12 frames decoded, 1/2 chunks scored",
        "queued (retrying)",
        "fetching",
        "decoding",
        "inferring",
        "rendering",
        "succeeded",
    ]
    quiet = io.StringIO()
    JobDisplay("off", stream=quiet).update(JobState.FAILED)
    assert quiet.getvalue() == ""


def test_live_display_on_a_terminal() -> None:
    """On a terminal: rows per stage with frames and chunks; the stage a job failed in."""

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    with JobDisplay("live", stream=out, color=False) as d:
        d.update(JobState.QUEUED)
        d.update(
            JobState.INFERRING, JobProgress(stage="inferring", frames=40, chunks=4, chunks_done=2)
        )
        d.update(JobState.FAILED)
    text = out.getvalue()
    for word in ("queued", "fetching", "decoding", "inferring", "40 frames decoded", "2/4"):
        assert word in text
    assert "✗" in text and "failed" in text
