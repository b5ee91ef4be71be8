"""The main job end to end: ``clipline highlight`` through the real stack.

Everything here is real: the CLI runs as a subprocess, with Redis (the machine's or
an embedded Valkey), the GPU daemon process (device ``cpu`` here), Celery prefork
workers, the shared-memory arena under /dev/shm and ffmpeg. Each test isolates its
stack with a unique deployment name, state directory and shared-memory directory, so
it can check that nothing (process or segment) is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from clipline import samples
from workers import ffmpeg as ffmpeg_tool

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "clipline.cli"]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def stack_env(
    tmp: Path, redis_url: str, roots: list[Path], deployment: str | None = None
) -> dict[str, str]:
    """Environment for an isolated stack: own state dir and shm dir (under /dev/shm)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPLINE_")}
    env.update(
        CLIPLINE_STATE_DIR=str(tmp / "state"),
        CLIPLINE_SHM_DIR=f"/dev/shm/clipline-test-{uuid.uuid4().hex[:8]}",
        CLIPLINE_LOCAL_ROOTS=os.pathsep.join(str(r) for r in roots),
        CLIPLINE_WORKER_CONCURRENCY="2",
        REDIS_URL=redis_url,
    )
    if deployment:
        env["CLIPLINE_DEPLOYMENT"] = deployment
    return env


def run_cli(
    args: list[str], env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def highlight(
    video: Path, images: list[Path], env: dict[str, str], out: Path, *extra: str
) -> tuple[int, dict[str, Any]]:
    args = ["highlight", str(video)]
    for img in images:
        args += ["--image", str(img)]
    proc = run_cli([*args, "--json", "--out", str(out), *extra], env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, (
        f"expected one JSON line, got {proc.stdout!r}\nstderr: {proc.stderr[-2000:]}"
    )
    return proc.returncode, json.loads(lines[0])


def processes_with(marker: str) -> list[int]:
    """PIDs whose environment contains ``marker`` (our isolated state dir)."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def assert_nothing_left(env: dict[str, str], wait_s: float = 15.0) -> None:
    shm_dir = Path(env["CLIPLINE_SHM_DIR"])
    deadline = time.monotonic() + wait_s
    while True:
        procs = processes_with(env["CLIPLINE_STATE_DIR"])
        segments = list(shm_dir.iterdir()) if shm_dir.exists() else []
        if not procs and not segments:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"left behind: processes {procs}, shared-memory files {segments}")
        time.sleep(0.2)
    if shm_dir.exists():
        shm_dir.rmdir()


def clip_facts(path: Path) -> dict[str, Any]:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), f"{path} does not open"
    fps = cap.get(cv2.CAP_PROP_FPS)
    n = 0
    while cap.grab():
        n += 1
    cap.release()
    facts: dict[str, Any] = {"fps": fps, "frames": n, "codec": None, "audio": False}
    tool = ffmpeg_tool.find("auto")  # streams read with ffmpeg itself: no ffprobe needed
    if tool is not None:
        streams = ffmpeg_tool.streams(tool.path, path)
        facts["codec"] = next(s.codec for s in streams if s.kind == "video")
        facts["audio"] = any(s.kind == "audio" for s in streams)
    return facts


def source_fps(path: Path) -> float:
    cap = cv2.VideoCapture(str(path))
    fps = float(cap.get(cv2.CAP_PROP_FPS))
    cap.release()
    return fps


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


# ---------------------------------------------------------------------------
# one stack shared by most tests (`clipline up` ... `clipline down`)
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("stack")
    roots = [tmp_path_factory.getbasetemp()]
    media = samples.real_media_dir()
    if media is not None:
        roots.append(media)
    env = stack_env(tmp, redis_url, roots, deployment=f"t-{uuid.uuid4().hex[:8]}")
    proc = run_cli(["up", "--workers", "2"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = run_cli(["status", "--json"], env)
    assert status.returncode == 0 and json.loads(status.stdout)["up"] is True
    try:
        yield env
    finally:
        down = run_cli(["down"], env)
        assert down.returncode == 0, down.stdout + down.stderr
        assert_nothing_left(env)
        gone = run_cli(["status", "--json"], env)
        assert json.loads(gone.stdout)["up"] is False


def planted(
    tmp: Path, product: Path, footage: list[Path], before_s: float, fps: float = 24.0
) -> tuple[Path, tuple[float, float]]:
    video = tmp / f"planted-{uuid.uuid4().hex[:6]}.avi"
    window = samples.make_planted_video(
        video, product, before_s=before_s, after_s=6.0, fps=fps, footage=footage
    )
    return video, window


def check_clip(summary: dict[str, Any], src: Path, duration: float) -> dict[str, Any]:
    facts = clip_facts(Path(summary["highlight"]["path"]))
    fps = source_fps(src)
    assert abs(facts["fps"] - fps) < 0.01, f"clip fps {facts['fps']} != source {fps}"
    assert abs(facts["frames"] - duration * fps) <= 1.0, (
        f"{facts['frames']} frames for {duration} s at {fps}"
    )
    return facts


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------
def test_planted_product_found_in_generated_footage(
    up: dict[str, str], tmp_path: Path, media: dict[str, Path]
) -> None:
    video, window = planted(tmp_path, media["product"], [], before_s=7.0)
    code, out = highlight(video, [media["product"]], up, tmp_path / "out")
    assert code == 0 and out["status"] == "succeeded", out
    got = (out["highlight"]["start_s"], out["highlight"]["end_s"])
    assert overlap(got, window) >= 4.0, f"chose {got}, product at {window}"
    facts = check_clip(out, video, 5.0)
    assert facts["codec"] in ("h264", "vp9")
    assert (
        json.loads((tmp_path / "out" / f"{out['job_id']}.json").read_text())["job_id"]
        == out["job_id"]
    )


def test_planted_product_found_in_real_footage(
    up: dict[str, str], tmp_path: Path, real_media: Path
) -> None:
    footage = [real_media / "Megamind.avi", real_media / "tree.avi"]
    for product, before in ((real_media / "fruits.jpg", 3.0), (real_media / "baboon.jpg", 9.5)):
        video, window = planted(tmp_path, product, footage, before_s=before)
        code, out = highlight(video, [product], up, tmp_path / "out")
        assert code == 0, out
        got = (out["highlight"]["start_s"], out["highlight"]["end_s"])
        assert overlap(got, window) >= 4.0, f"{product.name}: chose {got}, product at {window}"


def test_video_shorter_than_duration_is_whole_highlight(
    up: dict[str, str], tmp_path: Path, media: dict[str, Path]
) -> None:
    code, out = highlight(media["short"], [media["product"]], up, tmp_path / "out")
    assert code == 0, out
    assert out["highlight"]["start_s"] == 0.0
    assert out["highlight"]["end_s"] == pytest.approx(2.0, abs=0.06)
    check_clip(out, media["short"], 2.0)


def test_header_frame_count_lies(up: dict[str, str], tmp_path: Path, real_media: Path) -> None:
    """tree.avi declares 444 frames; 68 decode, spread over 29.6 s by their timestamps.

    The job trusts the decoded frames (count and timestamps), not the header's count.
    """
    code, out = highlight(real_media / "tree.avi", [real_media / "apple.jpg"], up, tmp_path / "out")
    assert code == 0, out
    assert out["video"]["declared_frames"] == 444
    assert out["video"]["decoded_frames"] == 68
    assert out["video"]["duration_s"] == pytest.approx(29.6, abs=0.1)
    h = out["highlight"]
    assert h["end_s"] - h["start_s"] == pytest.approx(5.0, abs=0.1)
    assert h["start_s"] >= 0.0 and h["end_s"] <= out["video"]["duration_s"] + 1e-6
    assert clip_facts(Path(h["path"]))["frames"] == h["frames"] > 0


@pytest.mark.skipif(
    ffmpeg_tool.find("auto") is None,
    reason="no usable ffmpeg (imageio-ffmpeg or the system's): audio is kept only through ffmpeg",
)
def test_audio_is_kept(up: dict[str, str], tmp_path: Path, media: dict[str, Path]) -> None:
    video = samples.make_footage(
        tmp_path / "with-audio.avi", seconds=7.0, fps=25.0, seed=11, audio=True
    )
    code, out = highlight(video, [media["product"]], up, tmp_path / "out", "--duration", "3")
    assert code == 0, out
    facts = check_clip(out, video, 3.0)
    assert facts["codec"] == "h264" and facts["audio"] is True


@pytest.mark.skipif(
    ffmpeg_tool.find("auto") is None,
    reason="no usable ffmpeg (imageio-ffmpeg or the system's): audio is kept only through ffmpeg",
)
def test_real_video_audio_is_kept(up: dict[str, str], tmp_path: Path, real_media: Path) -> None:
    code, out = highlight(
        real_media / "Megamind.avi", [real_media / "fruits.jpg"], up, tmp_path / "out"
    )
    assert code == 0, out
    facts = check_clip(out, real_media / "Megamind.avi", 5.0)
    assert facts["audio"] is True


def test_broken_stream_degrades_to_decoded_frames(
    up: dict[str, str], tmp_path: Path, media: dict[str, Path]
) -> None:
    """A stream cut mid-file keeps the frames before the cut."""
    src = samples.make_footage(tmp_path / "long.avi", seconds=8.0, fps=24.0, seed=4)
    broken = samples.truncate(src, tmp_path / "cut.avi", 0.5)
    code, out = highlight(broken, [media["product"]], up, tmp_path / "out", "--duration", "2")
    assert code == 0, out
    assert 0 < out["video"]["decoded_frames"] < out["video"]["declared_frames"]


@pytest.mark.parametrize("case", ["broken_stream", "garbage_after_header"])
def test_undecodable_video_fails_with_code(
    up: dict[str, str], tmp_path: Path, media: dict[str, Path], case: str
) -> None:
    src = samples.make_footage(tmp_path / "src.avi", seconds=4.0, fps=24.0, seed=2)
    bad = tmp_path / f"{case}.avi"
    if case == "broken_stream":
        samples.truncate(src, bad, 0.02)
    else:
        data = src.read_bytes()
        noise = (
            np.random.default_rng(0).integers(0, 256, len(data) - 4096, dtype=np.uint8).tobytes()
        )
        bad.write_bytes(data[:4096] + noise)
    start = time.monotonic()
    code, out = highlight(bad, [media["product"]], up, tmp_path / "out")
    assert code == 1  # the job ran and failed
    assert out["status"] == "failed" and out["error"]["code"] == "undecodable_video", out
    assert out["error"]["message"]
    assert time.monotonic() - start < 60


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("missing", "not_found"),
        ("text", "not_a_video"),
        ("empty", "empty_file"),
        ("bad_image", "not_an_image"),
    ],
)
def test_bad_input_fails_fast_with_stable_code(
    tmp_path: Path, redis_url: str, media: dict[str, Path], case: str, code: str
) -> None:
    video, image = tmp_path / "video.mp4", media["product"]
    if case == "text":
        video.write_text("this is not a video\n" * 50)
    elif case == "empty":
        video.write_bytes(b"")
    elif case == "bad_image":
        video = media["short"]
        image = tmp_path / "image.jpg"
        image.write_text("not an image")
    env = stack_env(tmp_path, redis_url, [tmp_path])
    start = time.monotonic()
    rc, out = highlight(video, [image], env, tmp_path / "out")
    assert rc == 2  # bad input: refused before any job ran
    assert out["status"] == "failed" and out["error"]["code"] == code, out
    assert time.monotonic() - start < 20
    assert_nothing_left(env)


def test_demo_command_on_real_sample_leaves_nothing(
    tmp_path: Path, redis_url: str, real_media: Path
) -> None:
    """The README's demo: an ephemeral stack, a real film clip, then nothing left behind."""
    env = stack_env(tmp_path, redis_url, [])
    rc, out = highlight(
        real_media / "Megamind.avi", [real_media / "fruits.jpg"], env, tmp_path / "out"
    )
    assert rc == 0, out
    assert out["status"] == "succeeded" and out["error"] is None
    for key in ("queued_s", "fetch_s", "decode_s", "inference_s", "total_s"):
        assert isinstance(out["timings"][key], float)
    check_clip(out, real_media / "Megamind.avi", 5.0)
    assert_nothing_left(env)


def test_failure_in_ephemeral_stack_leaves_nothing(
    tmp_path: Path, redis_url: str, media: dict[str, Path]
) -> None:
    bad = samples.truncate(media["footage"], tmp_path / "cut.avi", 0.01)
    env = stack_env(tmp_path, redis_url, [])
    rc, out = highlight(bad, [media["product"]], env, tmp_path / "out")
    assert rc == 1 and out["error"]["code"] == "undecodable_video", out
    assert_nothing_left(env)


def test_human_output_shows_stages(
    up: dict[str, str], tmp_path: Path, media: dict[str, Path]
) -> None:
    proc = run_cli(
        [
            "highlight",
            str(media["short"]),
            "--image",
            str(media["product"]),
            "--out",
            str(tmp_path),
        ],
        up,
    )
    assert proc.returncode == 0, proc.stderr
    for word in ("queued", "inferring", "succeeded", "highlight:", "clip:"):
        assert word in proc.stdout


def _interrupt_after_queued(args: list[str], env: dict[str, str]) -> tuple[str, int, str]:
    """Run the CLI, send SIGINT once it says its job is queued: (job id, rc, stderr)."""
    proc = subprocess.Popen(
        [*CLI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        job_id = ""
        deadline = time.monotonic() + 120
        while not job_id:
            assert time.monotonic() < deadline, "the job was not queued"
            line = proc.stdout.readline()
            assert line, f"the CLI ended early: {proc.wait()} {proc.stderr.read()}"  # type: ignore[union-attr]
            if line.startswith("job ") and line.rstrip().endswith(" queued"):
                job_id = line.split()[1]
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(120)
        return job_id, rc, proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_ctrl_c_on_a_running_stack_leaves_the_job_running(
    up: dict[str, str], tmp_path: Path, media: dict[str, Path]
) -> None:
    """Interrupted, `clipline highlight` says the job goes on; `clipline wait` gets its clip."""
    args = ["highlight", str(media["footage"]), "--image", str(media["product"])]
    job_id, rc, stderr = _interrupt_after_queued([*args, "--out", str(tmp_path)], up)
    assert rc == 130
    assert f"job {job_id} is still" in stderr and "(not cancelled)" in stderr, stderr
    assert f"clipline wait {job_id} --out DIR" in stderr
    waited = run_cli(["wait", job_id, "--out", str(tmp_path / "later") + "/", "--json"], up)
    assert waited.returncode == 0, waited.stderr
    out = json.loads(waited.stdout)
    assert out["state"] == "succeeded" and Path(out["clip"]).name == f"{job_id}.mp4"


def test_ctrl_c_cancels_the_job_of_a_temporary_stack(
    tmp_path: Path, redis_url: str, media: dict[str, Path]
) -> None:
    """Interrupted, the temporary stack's job is cancelled (and said so); nothing is left."""
    import redis

    env = stack_env(tmp_path, redis_url, [])
    args = ["highlight", str(media["footage"]), "--image", str(media["product"])]
    job_id, rc, stderr = _interrupt_after_queued([*args, "--out", str(tmp_path / "out")], env)
    assert rc == 130
    assert f"job {job_id} was cancelled; the temporary stack is stopping" in stderr, stderr
    client = redis.Redis.from_url(redis_url)
    try:
        (key,) = list(client.scan_iter(match=f"*:job:{job_id}"))
        assert client.hget(key, "state") == b"cancelled"
    finally:
        client.close()
    assert_nothing_left(env)


def test_opencv_fallback_renders_vp9_without_ffmpeg(tmp_path: Path, media: dict[str, Path]) -> None:
    """With ffmpeg disabled the clip is VP9 in MP4 (browser-playable), exact frame count."""
    from workers import render

    out = render.render(media["footage"], tmp_path / "clip.mp4", 2.0, 72, 24.0, ffmpeg="")
    assert out.codec == "vp9" and out.audio is False
    cap = cv2.VideoCapture(str(out.path))
    fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode(errors="replace")
    n = 0
    while cap.grab():
        n += 1
    assert n == 72
    assert fourcc.lower() in ("vp09", "vp90")


@pytest.mark.skipif(
    ffmpeg_tool.find("auto") is None,
    reason="no usable ffmpeg (imageio-ffmpeg or the system's): audio is kept only through ffmpeg",
)
def test_vertical_clip_follows_the_product(
    up: dict[str, str], tmp_path: Path, real_media: Path
) -> None:
    """``--aspect 9:16`` on a 16:9 video whose product (a real photo) moves across it:
    the clip is 9:16 with audio, and its crop path keeps the product's known box inside."""
    fps, seconds, width = 24.0, 8.0, 130
    photo = cv2.imread(str(real_media / "baboon.jpg"))
    assert photo is not None
    ph = round(photo.shape[0] * width / photo.shape[1])
    product = cv2.resize(photo, (width, ph), interpolation=cv2.INTER_AREA)
    silent = tmp_path / "moving.noaudio.avi"
    writer = cv2.VideoWriter(str(silent), cv2.VideoWriter.fourcc(*"MJPG"), fps, (640, 360))

    def left(t: float) -> float:  # from x=40 to x=470 over 8 s
        return 40.0 + 430.0 * t / seconds

    for i, frame in enumerate(samples.footage_frames(round(seconds * fps), (640, 360), seed=9)):
        x = round(left(i / fps))
        frame[100 : 100 + ph, x : x + width] = product
        writer.write(frame)
    writer.release()
    video = samples.add_tone(silent, tmp_path / "moving.avi", seconds)
    code, out = highlight(
        video, [real_media / "baboon.jpg"], up, tmp_path / "out", "--aspect", "9:16"
    )
    assert code == 0 and out["status"] == "succeeded", out
    h = out["highlight"]
    assert h["aspect"] == "9:16" and (h["width"], h["height"]) == (198, 352)
    r = h["reframe"]
    assert r["source"] == [640, 360] and r["crop"] == [202, 360] and not r["standard"]
    assert r["follow"] == "product" and len(r["path"]) >= 2
    facts = check_clip(out, video, 5.0)
    assert facts["codec"] == "h264" and facts["audio"] is True
    cap = cv2.VideoCapture(h["path"])
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.shape[:2] == (352, 198)
    keys_t = [k["t"] for k in r["path"]]
    keys_x = [k["x"] for k in r["path"]]
    t = h["start_s"] + np.arange(h["frames"]) / fps
    x = np.interp(t, keys_t, keys_x)
    product_x = np.array([left(v) for v in t])
    held = (product_x >= x - 1) & (product_x + width <= x + 202 + 1)
    assert held.mean() >= 0.9, f"product inside the window in {held.mean():.0%} of frames"
