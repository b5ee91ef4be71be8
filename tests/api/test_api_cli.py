"""``clipline`` against a real job API: list, cancel, wait (progress, exit codes), download.

The API is the real application under uvicorn (``live_api``) on the real Redis; the CLI
is a subprocess talking to it over HTTP (``CLIPLINE_API_URL``/``CLIPLINE_API_KEY``).
No worker consumes these jobs: the test plays the worker through the job store (claim,
advance, ``set_progress``, finish: the same atomic scripts a worker runs), so every
state and progress value the CLI must show is known.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import redis
from api_helpers import Api

from clipline_core import artifacts
from clipline_core.job import ACTIVE, JobState
from clipline_core.store import JobStore

CLI = [sys.executable, "-m", "clipline.cli"]


@pytest.fixture
def env(live_api: Api, tmp_path: Path) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("CLIPLINE_")}
    out.update(
        CLIPLINE_API_URL=live_api.url,
        CLIPLINE_API_KEY=live_api.keys.full,
        CLIPLINE_STATE_DIR=str(tmp_path / "state"),
    )
    return out


@pytest.fixture
def store(live_api: Api, redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client, live_api.settings.deployment)


def run(
    args: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


class Lines:
    """A CLI subprocess whose stdout lines are read as they come, with a deadline."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [*CLI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def until(self, text: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line with {text!r} within {timeout} s; saw {self.seen}")
            self.seen.append(line)
            if text in line:
                return line

    def finish(self, timeout: float = 60.0) -> tuple[int, str]:
        rc = self.proc.wait(timeout)
        time.sleep(0.1)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        assert self.proc.stderr is not None
        return rc, self.proc.stderr.read()


@pytest.fixture
def cleanup() -> Iterator[list[Lines]]:
    procs: list[Lines] = []
    yield procs
    for p in procs:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)


def submit(api: Api, title: str = "") -> str:
    with api.client() as c:
        return c.submit(
            "https://cdn.example.com/v.mp4", ["https://cdn.example.com/p.jpg"], title=title
        ).id


def test_list_and_cancel(live_api: Api, env: dict[str, str]) -> None:
    ids = [submit(live_api, title=f"job {i}") for i in range(3)]
    listed = run(["list", "--json"], env)
    assert listed.returncode == 0, listed.stderr
    page = json.loads(listed.stdout)
    assert [j["id"] for j in page["jobs"]] == ids[::-1]  # newest first
    assert page["next_cursor"] is None

    first = json.loads(run(["list", "--limit", "2", "--json"], env).stdout)
    assert [j["id"] for j in first["jobs"]] == ids[:0:-1] and first["next_cursor"]
    rest = json.loads(run(["list", "--cursor", first["next_cursor"], "--json"], env).stdout)
    assert [j["id"] for j in rest["jobs"]] == ids[:1]

    human = run(["list"], env)
    assert human.returncode == 0
    rows = human.stdout.splitlines()
    assert rows[0].split()[:3] == ["JOB", "STATE", "PRIORITY"]
    assert [r.split()[0] for r in rows[1:]] == ids[::-1]
    assert all(" queued " in r for r in rows[1:])

    cancelled = run(["cancel", ids[1]], env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"job {ids[1]} cancelled" in cancelled.stdout
    only = json.loads(run(["list", "--state", "cancelled", "--json"], env).stdout)
    assert [j["id"] for j in only["jobs"]] == [ids[1]]
    both = json.loads(
        run(["list", "--state", "cancelled", "--state", "queued", "--json"], env).stdout
    )
    assert len(both["jobs"]) == 3

    again = run(["cancel", ids[1]], env)
    assert again.returncode == 1
    assert "already cancelled" in again.stderr and "nothing was cancelled" in again.stderr
    unknown = run(["cancel", "f" * 32], env)
    assert unknown.returncode == 2 and "not_found" in unknown.stderr


def test_wait_shows_progress_and_exits_1_when_the_job_fails(
    live_api: Api, env: dict[str, str], store: JobStore, cleanup: list[Lines]
) -> None:
    job_id = submit(live_api)
    wait = Lines(["wait", job_id], env)  # stdout is a pipe: plain lines
    cleanup.append(wait)
    wait.until("] queued")
    assert store.claim(job_id, "L1", 30, 5)[0] == 1
    assert store.advance(job_id, JobState.DECODING, "L1")
    progress = {"stage": "decoding", "frames": 12, "chunks_done": 1, "chunks": 2}
    assert store.set_progress(job_id, "L1", {**progress, "at": time.time()})
    assert store.get(job_id).progress.frames == 12  # type: ignore[union-attr]
    wait.until("] decoding: 12 frames decoded, 1/2 chunks scored")
    assert not store.set_progress(job_id, "other-lease", {**progress, "at": time.time()})
    err = {"code": "undecodable_video", "message": "no frame decodes"}
    assert store.finish(job_id, JobState.FAILED, allowed_from=ACTIVE, lease="L1", error=err)
    rc, _stderr = wait.finish()
    assert rc == 1
    assert "failed: undecodable_video: no frame decodes" in wait.seen
    states = [line.split("] ")[1] for line in wait.seen if line.startswith("  [")]
    assert states[0] == "queued" and "decoding" in states and states[-1] == "failed"
    shown = json.loads(run(["job", job_id], env).stdout)
    assert shown["state"] == "failed" and shown["progress"] is None


def test_wait_downloads_into_a_directory(
    live_api: Api, env: dict[str, str], store: JobStore, tmp_path: Path
) -> None:
    job_id = submit(live_api)
    clip = tmp_path / "rendered.mp4"
    data = b"\x00\x00\x00\x18ftypmp42" + os.urandom(200_000)
    clip.write_bytes(data)
    key = artifacts.open_store(live_api.settings).put(artifacts.clip_key(job_id), clip)
    assert store.claim(job_id, "L1", 30, 5)[0] == 1
    highlight = {"start_s": 1.0, "end_s": 6.0, "score": 0.5, "artifact": key}
    assert store.finish(
        job_id, JobState.SUCCEEDED, allowed_from=ACTIVE, lease="L1", highlight=highlight
    )

    # A directory that does not exist yet, named with a trailing slash.
    done = run(["wait", job_id, "--out", "clips/"], env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    got = tmp_path / "clips" / f"{job_id}.mp4"
    assert got.read_bytes() == data
    assert f"clip:      {Path('clips') / f'{job_id}.mp4'}" in done.stdout
    # An existing directory without one; --json names the file.
    (tmp_path / "existing").mkdir()
    out = json.loads(run(["wait", job_id, "--out", "existing", "--json"], env, cwd=tmp_path).stdout)
    assert Path(tmp_path / out["clip"]).read_bytes() == data
    assert Path(out["clip"]).name == f"{job_id}.mp4" and out["state"] == "succeeded"
    # --quiet prints only the clip's path.
    quiet = run(["--quiet", "wait", job_id, "--out", "q/"], env, cwd=tmp_path)
    assert quiet.stdout.strip() == str(Path("q") / f"{job_id}.mp4")

    # The client itself, as docs/api.md shows: download(id, "clips/") puts <id>.mp4 in it.
    with live_api.client() as c:
        assert c.download(job_id, str(tmp_path / "a" / "b") + "/") == (
            tmp_path / "a" / "b" / f"{job_id}.mp4"
        )
        assert c.download(job_id, tmp_path / "existing") == tmp_path / "existing" / f"{job_id}.mp4"
        named = c.download(job_id, tmp_path / "named.mp4")
        assert named == tmp_path / "named.mp4" and named.read_bytes() == data
    assert not list(tmp_path.rglob("*.part"))


def test_ctrl_c_while_waiting_says_the_job_still_runs(
    live_api: Api, env: dict[str, str], cleanup: list[Lines]
) -> None:
    job_id = submit(live_api)
    wait = Lines(["wait", job_id], env)
    cleanup.append(wait)
    wait.until("] queued")
    wait.proc.send_signal(signal.SIGINT)
    rc, stderr = wait.finish()
    assert rc == 130
    assert f"job {job_id} is still queued (not cancelled)" in stderr
    assert f"clipline cancel {job_id}" in stderr
    with live_api.client() as c:
        assert c.get(job_id).state == JobState.QUEUED


def test_submit_wait_timeout_exits_1_and_leaves_the_job(live_api: Api, env: dict[str, str]) -> None:
    args = ["submit", "https://cdn.example.com/v.mp4", "--image", "https://cdn.example.com/p.jpg"]
    proc = run([*args, "--wait", "--timeout", "1"], env)
    assert proc.returncode == 1, proc.stderr
    assert "did not finish within 1 s; it is still queued (not cancelled)" in proc.stderr
    job_id = proc.stdout.split()[1]  # "job <id> queued"
    with live_api.client() as c:
        assert c.get(job_id).state == JobState.QUEUED


def test_refused_requests_exit_2(live_api: Api, env: dict[str, str]) -> None:
    bad = run(["submit", "http://169.254.169.254/v.mp4", "--image", "https://e.com/p.jpg"], env)
    assert bad.returncode == 2 and "forbidden_source" in bad.stderr
    env["CLIPLINE_API_KEY"] = "clk_wrong"
    denied = run(["list"], env)
    assert denied.returncode == 2 and "unauthenticated" in denied.stderr
