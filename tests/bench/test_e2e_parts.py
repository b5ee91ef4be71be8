"""The end-to-end benchmark's parts: busy-ratio arithmetic, /proc accounting, the baseline.

Real parts only: real child processes burn real CPU for the /proc sampler, real videos
(generated here, and the real sample media when present) are decoded both by the
baseline's read-every-frame reader and by the workers' sparse decoder, and a real
baseline service process answers over HTTP.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipline import samples
from clipline_bench import baseline
from clipline_bench.e2e_measure import (
    TreeSampler,
    busy_series,
    cumulative_series,
    merge,
    percentile,
    union_seconds,
)
from clipline_bench.e2e_media import MediaServer
from clipline_core.settings import Settings
from workers import decode
from workers.preprocess import MemorySink


# ---------------------------------------------------------------------------
# Busy-ratio arithmetic.
# ---------------------------------------------------------------------------
def test_union_counts_overlapping_forward_passes_once() -> None:
    spans = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.7)]
    assert merge(spans) == [(0.0, 3.0), (5.0, 6.0)]
    assert union_seconds(spans) == pytest.approx(4.0)
    assert union_seconds(spans, 2.0, 5.5) == pytest.approx(1.5)


def test_busy_series_bins_are_time_weighted() -> None:
    series = busy_series([(0.0, 1.0), (2.5, 4.0)], t0=0.0, t1=4.0, bin_s=2.0)
    assert series == [(1.0, pytest.approx(0.5)), (3.0, pytest.approx(0.75))]


def test_cumulative_series_is_the_rate_of_the_busy_counter() -> None:
    # A counter at 0 until t=2, then rising 1 s per s (fully busy), then flat.
    samples_ = [(0.0, 0.0), (2.0, 0.0), (4.0, 2.0), (6.0, 2.0)]
    series = cumulative_series(samples_, t0=0.0, t1=6.0, bin_s=2.0)
    assert [round(r, 6) for _, r in series] == [0.0, 1.0, 0.0]


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 95) == 5.0
    assert math.isnan(percentile([], 50))


# ---------------------------------------------------------------------------
# /proc accounting.
# ---------------------------------------------------------------------------
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_tree_sampler_counts_every_process_of_the_tree_once() -> None:
    """A child burns 0.6 s, then runs and reaps a long and a very short grandchild.

    The long grandchild (0.6 s) is seen by the sampler and also lands in the child's
    cutime once reaped; the short one (0.05 s) is likely never seen and counts only
    through the child's cutime. Counted once each, the tree used about 1.25 s of CPU;
    counting the seen grandchild twice would give about 1.85 s.
    """
    script = (
        BURN.format(s=0.6)
        + "import subprocess, sys, time\n"
        + f"subprocess.run([sys.executable, '-c', {BURN.format(s=0.6)!r}])\n"
        + f"subprocess.run([sys.executable, '-c', {BURN.format(s=0.05)!r}])\n"
        + "time.sleep(0.6)\n"  # the sampler sees the child's cutime after the reaps
    )
    sampler = TreeSampler(interval_s=0.1, cores=1).start()
    proc = subprocess.Popen([sys.executable, "-c", script])
    proc.wait(60)
    usage = sampler.stop()
    assert 1.1 <= usage.cpu_s <= 1.75, usage
    assert usage.peak_rss_bytes > 1 << 20
    assert usage.peak_pss_bytes <= usage.peak_rss_bytes
    assert usage.cpu_util > 0.0


# ---------------------------------------------------------------------------
# The baseline reads the same frames as the workers.
# ---------------------------------------------------------------------------
def _compare_with_workers(video: Path, settings: Settings) -> None:
    size = (settings.frame_size, settings.frame_size)
    frames, info = baseline.read_all_frames(video, settings, size)
    sink = MemorySink(settings.frames_per_chunk, *size)
    ref = decode.sample_video(video, settings, sink)
    assert info.decoded_frames == ref.decoded_frames
    assert info.kept_indices == ref.kept_indices
    np.testing.assert_allclose(info.kept_timestamps, ref.kept_timestamps, atol=1e-9)
    assert info.duration_s == pytest.approx(ref.duration_s)
    assert np.array_equal(frames, sink.frames_array())


def test_baseline_reader_matches_workers_decoder_on_generated_media(tmp_path: Path) -> None:
    video = samples.make_footage(tmp_path / "f.avi", seconds=4.0, fps=24.0, seed=11)
    _compare_with_workers(video, Settings(state_dir=str(tmp_path)))


def test_baseline_reader_matches_workers_decoder_on_real_media(
    real_media: Path, tmp_path: Path
) -> None:
    _compare_with_workers(real_media / "Megamind.avi", Settings(state_dir=str(tmp_path)))


# ---------------------------------------------------------------------------
# The baseline service answers a real request over HTTP.
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_baseline_service_finds_the_planted_product(tmp_path: Path) -> None:
    media = tmp_path / "media"
    product = samples.make_product_image(media / "p.jpg", size=(200, 200), seed=5)
    start, _ = samples.make_planted_video(
        media / "v.avi", product, before_s=3.0, product_s=5.0, after_s=2.0,
        fps=12.0, size=(160, 120), seed=6,
    )  # fmt: skip
    settings = Settings(
        deployment="e2e-test-base",
        state_dir=str(tmp_path / "state"),
        allow_loopback=True,
        models="features",
    )
    with MediaServer(media) as server, baseline.BaselineCluster(settings, 1, 1) as cluster:
        resp = cluster.request(
            cluster.ports[0],
            {
                "id": "one",
                "video_url": server.url("v.avi"),
                "image_urls": [server.url("p.jpg")],
                "duration_s": 5.0,
            },
        )
    assert resp["status"] == "succeeded", resp
    assert resp["highlight"]["start_s"] == pytest.approx(start, abs=0.35)
    assert resp["highlight"]["frames"] == 60
    assert len(resp["spans"]) >= 2  # the refs chunk and at least one frame batch
    assert all(e > s for s, e in resp["spans"])
