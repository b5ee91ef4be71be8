"""The local stack (`clipline up`) is private to its user and recovers from a killed supervisor.

One real stack for the module, with the embedded Valkey server (no Redis configured),
started by the CLI in a directory of its own: its Redis needs the password recorded in
the owner-only ``stack.json``; its files are owner-only; the API and the workers refuse
loopback URLs; local files come only from the directory `clipline up` ran in, and a path
outside it is refused the same way whether or not the file exists. The last test kills
the supervisor with SIGKILL: every process of the stack must end by itself, the next
`clipline status` removes the stale record and the server's directory, and the next
`clipline up` works.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from clipline.client import Client
from clipline_core.errors import ApiError
from clipline_core.procs import group_members, same_process

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "clipline.cli"]
#: Seconds the stack's processes get to end after their supervisor is killed (their
#: death signal shuts them down gracefully; an idle stack takes about 2 s).
DIE_WITH_SUPERVISOR_S = 20.0


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180
    )


def processes_with(marker: str) -> list[int]:
    """Pids whose environment contains ``marker`` (the stack's own state directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def record(stack: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(stack["stack_json"].read_text())
    return data


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(root: Path) -> tuple[dict[Path, int], dict[Path, int]]:
    """Every directory's and file's mode under ``root`` (``root`` included), skipping
    what the running stack removes while the walk is under way (a job's scratch
    directory, a rotated log): those are gone, not readable by others."""
    dirs: dict[Path, int] = {}
    files: dict[Path, int] = {}
    for top, subdirs, names in os.walk(root):  # errors on vanished directories: skipped
        for bucket, entries in (
            (dirs, [top, *(os.path.join(top, d) for d in subdirs)]),
            (files, [os.path.join(top, n) for n in names]),
        ):
            for entry in entries:
                try:
                    st = os.stat(entry)
                except FileNotFoundError:
                    continue
                bucket[Path(entry)] = stat.S_IMODE(st.st_mode)
    return dirs, files


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, media: dict[str, Path]
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("hardening")
    cwd = tmp / "work"
    cwd.mkdir()
    for name in ("short", "product"):
        shutil.copy(media[name], cwd / media[name].name)
    outside = tmp / "outside"
    outside.mkdir()
    shutil.copy(media["short"], outside / "video.avi")
    deployment = f"h-{uuid.uuid4().hex[:8]}"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CLIPLINE_") and k not in ("REDIS_URL",)
    }
    env.update(
        CLIPLINE_STATE_DIR=str(tmp / "state"),
        CLIPLINE_SHM_DIR=f"/dev/shm/clipline-test-{uuid.uuid4().hex[:8]}",
        CLIPLINE_DEPLOYMENT=deployment,
        CLIPLINE_DEVICE="cpu",
    )
    up = run_cli(["up", "--workers", "1"], env, cwd)
    assert up.returncode == 0, up.stdout + up.stderr
    stack = {
        "env": env,
        "cwd": cwd,
        "outside": outside,
        "media": {k: cwd / v.name for k, v in media.items() if k in ("short", "product")},
        "state": tmp / "state",
        "stack_json": tmp / "state" / deployment / "stack.json",
    }
    try:
        yield stack
    finally:
        run_cli(["down"], env, cwd)
        for pid in processes_with(env["CLIPLINE_STATE_DIR"]):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(env["CLIPLINE_SHM_DIR"], ignore_errors=True)


def api(stack: dict[str, Any]) -> Client:
    data = record(stack)
    return Client(data["api_url"], data["api_key"])


def test_embedded_redis_needs_the_password(stack: dict[str, Any]) -> None:
    data = record(stack)
    url = urllib.parse.urlsplit(data["redis_url"])
    password = url.password
    assert password and len(password) >= 20 and url.hostname == "127.0.0.1"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=url.port).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=url.port, password="wrong").ping()
    client = redis.Redis.from_url(data["redis_url"])
    assert client.ping()
    assert client.config_get("bind") == {"bind": "127.0.0.1"}
    client.close()

    # Recorded only in owner-only files; not in any log, command line or status output.
    assert mode(stack["stack_json"]) == 0o600
    secret = password.encode()
    holders = {p for p in stack["state"].rglob("*") if p.is_file() and secret in p.read_bytes()}
    assert holders == {stack["stack_json"], Path(data["redis_dir"]) / "valkey.conf"}
    assert all(mode(p) == 0o600 for p in holders)
    for pid in [data["redis_pid"], *data["pids"].values()]:
        assert password not in Path(f"/proc/{pid}/cmdline").read_text()
    for args in (["status"], ["status", "--json"]):
        out = run_cli(args, stack["env"], stack["cwd"])
        assert out.returncode == 0 and "***" in out.stdout and password not in out.stdout


def test_stack_files_are_owner_only(stack: dict[str, Any]) -> None:
    job = api(stack).submit(str(stack["media"]["short"]), [str(stack["media"]["product"])])
    view = api(stack).wait(job.id, 240)
    assert view.state.value == "succeeded", view
    state = stack["state"]
    dirs, files = modes(state)
    assert state in dirs
    assert [p for p, m in dirs.items() if m != 0o700] == []
    assert [p for p, m in files.items() if m != 0o600] == []
    clips = [p for p in files if p.name.startswith(job.id) and p.suffix == ".mp4"]
    assert clips, f"no clip of {job.id} under {state}"
    assert {p.suffix for p in files} >= {".log", ".mp4", ".json"}


def _serve(directory: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_loopback_sources_are_refused(stack: dict[str, Any]) -> None:
    server = _serve(stack["cwd"])
    try:
        port = server.server_address[1]
        video = f"http://127.0.0.1:{port}/{stack['media']['short'].name}"
        product = str(stack["media"]["product"])
        # The API refuses it ...
        with pytest.raises(ApiError) as info:
            api(stack).submit(video, [product])
        assert info.value.code == "forbidden_source"
        redis_port = urllib.parse.urlsplit(record(stack)["redis_url"]).port
        with pytest.raises(ApiError) as info:
            api(stack).submit(f"http://localhost:{redis_port}/", [product])
        assert info.value.code == "forbidden_source"
        # ... and so do the workers (`clipline highlight` queues it through Redis).
        out = run_cli(
            ["highlight", video, "--image", product, "--json", "--out", "clips"],
            stack["env"],
            stack["cwd"],
        )
        summary = json.loads(out.stdout)
        assert summary["status"] == "failed" and summary["error"]["code"] == "forbidden_source"
    finally:
        server.shutdown()


def test_local_files_only_from_the_allowed_directories(stack: dict[str, Any]) -> None:
    status = json.loads(run_cli(["status", "--json"], stack["env"], stack["cwd"]).stdout)
    assert status["local_roots"] == [str(stack["cwd"].resolve())]
    assert status["allow_loopback"] is False
    link = stack["cwd"] / "link.avi"
    link.symlink_to(stack["outside"] / "video.avi")
    product = str(stack["media"]["product"])
    cases = {
        "exists": stack["outside"] / "video.avi",
        "missing": stack["outside"] / "missing.avi",
        "missing-dir": stack["outside"] / "nodir" / "missing.avi",
        "link": link,
    }
    errors = {}
    for case, path in cases.items():
        job = api(stack).submit(str(path), [product])
        view = api(stack).wait(job.id, 120)
        assert view.state.value == "failed" and view.error is not None, (case, view)
        errors[case] = (view.error.code, view.error.message.replace(str(path), "PATH"))
    assert len(set(errors.values())) == 1, errors
    code, message = errors["exists"]
    assert code == "forbidden_source" and "--allow-dir" in message


def test_highlight_takes_a_file_from_outside_through_the_inbox(stack: dict[str, Any]) -> None:
    """`clipline highlight` takes any file its user can read, stack or no stack.

    One outside the stack's directories goes to the job through the stack's owner-only
    inbox and is removed when the command ends; jobs through the API still get only the
    directories, and `clipline submit` refuses such a file at once, saying how to allow it.
    """
    env, cwd = stack["env"], stack["cwd"]
    video, product = stack["outside"] / "video.avi", str(stack["media"]["product"])
    out = run_cli(
        ["highlight", str(video), "--image", product, "--json", "--out", "clips"], env, cwd
    )
    summary = json.loads(out.stdout)
    assert out.returncode == 0 and summary["status"] == "succeeded", out.stdout + out.stderr
    assert Path(summary["highlight"]["path"]).is_file()
    inbox = stack["stack_json"].parent / "inbox"
    assert mode(inbox) == 0o700 and list(inbox.iterdir()) == []
    status = json.loads(run_cli(["status", "--json"], env, cwd).stdout)
    assert status["inbox"] == str(inbox)

    refused = run_cli(["submit", str(video), "--image", product], env, cwd)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "forbidden_source" in refused.stderr
    assert f"--allow-dir {stack['outside'].resolve()}" in refused.stderr


def test_logs_of_the_stack(stack: dict[str, Any]) -> None:
    env, cwd = stack["env"], stack["cwd"]
    log_dir = Path(record(stack)["logs"])
    one = run_cli(["logs", "worker", "-n", "3"], env, cwd)
    assert one.returncode == 0, one.stderr
    shown = one.stdout.splitlines()
    lines = (log_dir / "worker.log").read_text(errors="replace").splitlines()
    assert 1 <= len(shown) <= 3 and all(line in lines for line in shown)
    every = run_cli(["logs", "-n", "1"], env, cwd)
    assert every.returncode == 0
    for name in ("worker", "daemon", "api", "supervisor"):
        assert f"==> {name} (" in every.stdout, every.stdout

    follow = subprocess.Popen(
        [*CLI, "logs", "daemon", "-n", "0", "-f"],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)  # it has started following
        marker = f"marker-{uuid.uuid4().hex}"
        with open(log_dir / "gpu-daemon.log", "a") as fh:
            fh.write(marker + "\n")
        assert follow.stdout is not None
        deadline = time.monotonic() + 20
        line = ""
        while marker not in line:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([follow.stdout], [], [], max(0.0, left))
            assert ready and left > 0, "the followed log did not show the new line"
            line = follow.stdout.readline()
        follow.send_signal(signal.SIGINT)
        assert follow.wait(20) == 130
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait(10)


def test_supervisor_killed_leaves_nothing(stack: dict[str, Any]) -> None:
    data = record(stack)
    env, cwd = stack["env"], stack["cwd"]
    starts = data["starts"]
    tracked = [(data["supervisor_pid"], data["supervisor_start"])]
    tracked += [(pid, starts[name]) for name, pid in data["pids"].items()]
    tracked.append((data["redis_pid"], data["redis_start"]))
    for pgid, start in list(tracked[1:]):  # the pool children of each group, too
        tracked += [(pid, None) for pid in group_members(pgid, start) if pid != pgid]
    assert all(same_process(pid, start) for pid, start in tracked)

    os.kill(data["supervisor_pid"], signal.SIGKILL)
    deadline = time.monotonic() + DIE_WITH_SUPERVISOR_S
    while True:
        left = [pid for pid, start in tracked if same_process(pid, start)]
        left += processes_with(env["CLIPLINE_STATE_DIR"])
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert left == [], f"still running {DIE_WITH_SUPERVISOR_S} s after the supervisor died"
    assert stack["stack_json"].exists() and Path(data["redis_dir"]).exists()

    status = run_cli(["status", "--json"], env, cwd)
    assert json.loads(status.stdout)["up"] is False
    assert not stack["stack_json"].exists()
    assert list((stack["state"] / "redis").iterdir()) == []

    up = run_cli(["up", "--workers", "1"], env, cwd)
    assert up.returncode == 0, up.stdout + up.stderr
    assert json.loads(run_cli(["status", "--json"], env, cwd).stdout)["up"] is True
    down = run_cli(["down"], env, cwd)
    assert down.returncode == 0, down.stdout + down.stderr
    deadline = time.monotonic() + 15
    while processes_with(env["CLIPLINE_STATE_DIR"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with(env["CLIPLINE_STATE_DIR"]) == []
    assert list((stack["state"] / "redis").iterdir()) == []
    shm = Path(env["CLIPLINE_SHM_DIR"])
    assert not shm.exists() or list(shm.iterdir()) == []
