"""A rendered clip plays in a real browser: headless Chromium, over a real HTTP server.

The clip is rendered by :func:`workers.render.render` (the default ``auto`` ffmpeg, and
the OpenCV VP9 fallback; also a 9:16 crop along a moving path) and served with a page
whose ``<video>`` plays it to the end; on ``ended`` (or ``error``, or a 30 s stall) a
script writes the element's state into the page as JSON and calls the server back. The
page also loads an image that the server holds until that call, so the page's load
event, after which ``--dump-dom`` prints the document, comes after the playback. No
WebDriver is involved.

A clip the browser cannot show (MPEG-4 part 2 video, which Chromium does not decode)
is the control: it reports no picture, so the checks are able to fail.

Skipped, saying so, when no Chromium is installed (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipline import samples
from workers import ffmpeg as ffmpeg_tool
from workers import reframe, render

pytestmark = pytest.mark.slow

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
HOLD_S = 45.0  # the longest the server holds the page's load event (bounds a stalled run)

PAGE = """<!doctype html>
<html><body>
<video id="v" muted autoplay playsinline preload="auto" src="clip.mp4"></video>
<pre id="result">pending</pre>
<img src="/hold" alt="" style="display:none">
<script>
const v = document.getElementById("v");
let sent = false;
function report(event) {
  if (sent) return;
  sent = true;
  const q = v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality() : {};
  document.getElementById("result").textContent = JSON.stringify({
    event: event, readyState: v.readyState, duration: v.duration,
    videoWidth: v.videoWidth, videoHeight: v.videoHeight, ended: v.ended,
    currentTime: v.currentTime, error: v.error ? v.error.code : null,
    frames: q.totalVideoFrames, audioBytes: v.webkitAudioDecodedByteCount,
    videoBytes: v.webkitVideoDecodedByteCount,
    canPlayH264: v.canPlayType('video/mp4; codecs="avc1.64001f, mp4a.40.2"'),
  });
  fetch("/done");
}
v.addEventListener("ended", () => report("ended"));
v.addEventListener("error", () => report("error"));
setTimeout(() => report("timeout"), 30000);
</script>
</body></html>
"""


def chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium installed (Debian: apt-get install chromium): playback not checked")


class _Handler(SimpleHTTPRequestHandler):
    done: threading.Event

    def do_GET(self) -> None:
        if self.path.startswith("/hold"):
            self.done.wait(HOLD_S)
        if self.path.startswith(("/hold", "/done")):
            if self.path.startswith("/done"):
                self.done.set()
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served on 127.0.0.1 (a real HTTP server thread) and its URL."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "index.html").write_text(PAGE)
    done = threading.Event()
    handler = type("Handler", (_Handler,), {"done": done})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/index.html"
    finally:
        done.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def play(browser: str, url: str, profile: Path) -> dict[str, Any]:
    """Load ``url`` in headless Chromium and return what the page reported."""
    cmd = [
        browser,
        "--headless",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={profile}",
        "--dump-dom",
        url,
    ]
    if os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # Chromium refuses to run its sandbox as root
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    m = re.search(r'<pre id="result">(.*?)</pre>', proc.stdout, re.DOTALL)
    assert proc.returncode == 0 and m, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    text = html.unescape(m.group(1))
    assert text != "pending", "the page never reported (no ended, error or timeout event)"
    result: dict[str, Any] = json.loads(text)
    return result


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("playback")
    return samples.make_footage(
        d / "src.avi", seconds=5.0, fps=25.0, size=(320, 240), seed=7, audio=True
    )


def test_h264_aac_clip_plays_in_chromium(
    source: Path, site: tuple[Path, str], tmp_path: Path
) -> None:
    browser = chromium()
    root, url = site
    clip = render.render(source, root / "clip.mp4", 1.0, 75, 25.0, "auto")
    assert clip.codec == "h264" and clip.audio
    got = play(browser, url, tmp_path / "profile")
    assert got["canPlayH264"] == "probably", got
    assert got["event"] == "ended" and got["error"] is None and got["ended"], got
    assert got["readyState"] >= 2, got  # HAVE_CURRENT_DATA or better: a picture is there
    assert got["duration"] == pytest.approx(3.0, abs=0.1), got
    assert (got["videoWidth"], got["videoHeight"]) == (320, 240), got
    assert got["frames"] > 0 and got["videoBytes"] > 0, got
    assert got["audioBytes"] > 0, got  # the AAC track was decoded


def test_vertical_9x16_clip_plays_in_chromium(
    source: Path, site: tuple[Path, str], tmp_path: Path
) -> None:
    browser = chromium()
    root, url = site
    times = 1.0 + np.arange(75) / 25.0
    samples_t = np.arange(1.0, 4.0, 0.25)
    boxes = [(0.1 + 0.2 * (t - 1.0), 0.3, 0.15, 0.3) for t in samples_t]  # moving right
    path = reframe.plan(samples_t, boxes, times, (320, 240), "9:16")
    assert np.ptp(path.x) > 50 and path.size == (126, 224)
    clip = render.render(source, root / "clip.mp4", 1.0, 75, 25.0, "auto", crop=path)
    assert clip.codec == "h264" and clip.audio
    got = play(browser, url, tmp_path / "profile")
    assert got["event"] == "ended" and got["error"] is None and got["ended"], got
    assert got["duration"] == pytest.approx(3.0, abs=0.1), got
    assert (got["videoWidth"], got["videoHeight"]) == (126, 224), got
    assert got["frames"] > 0 and got["videoBytes"] > 0 and got["audioBytes"] > 0, got


def test_vp9_fallback_clip_plays_without_audio(
    source: Path, site: tuple[Path, str], tmp_path: Path
) -> None:
    browser = chromium()
    root, url = site
    clip = render.render(source, root / "clip.mp4", 1.0, 50, 25.0, "")
    assert clip.codec == "vp9" and not clip.audio
    got = play(browser, url, tmp_path / "profile")
    assert got["event"] == "ended" and got["error"] is None, got
    assert got["duration"] == pytest.approx(2.0, abs=0.1), got
    assert (got["videoWidth"], got["videoHeight"]) == (320, 240) and got["frames"] > 0, got
    assert not got["audioBytes"], got


def test_control_mpeg4_part2_shows_no_picture(
    source: Path, site: tuple[Path, str], tmp_path: Path
) -> None:
    """The checks above can fail: a codec Chromium does not decode gives no picture."""
    browser = chromium()
    root, url = site
    tool = ffmpeg_tool.find("auto")
    assert tool is not None
    subprocess.run(
        [tool.path, "-nostdin", "-v", "error", "-y", "-ss", "1", "-t", "2", "-i", str(source),
         "-c:v", "mpeg4", "-c:a", "aac", "-f", "mp4", str(root / "clip.mp4")],
        check=True, timeout=120,
    )  # fmt: skip
    got = play(browser, url, tmp_path / "profile")
    assert got["error"] is not None or (got["videoWidth"], got["frames"]) == (0, 0), got
