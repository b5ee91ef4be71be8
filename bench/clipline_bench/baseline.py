"""The "before" design the end-to-end benchmark compares clipline with: a monolithic service.

This is how a straightforward highlight service is usually built, and what clipline
replaces. It is a working, fair service — same models, same selection, same rendering,
same outputs — that simply does everything in one process per request:

* **One service process per worker** (``python -m clipline_bench.baseline``), an HTTP
  server on 127.0.0.1 that handles requests in threads (at most ``--threads`` at a time;
  more wait in line). ``POST /v1/highlight`` takes ``{"id", "video_url", "image_urls",
  "duration_s"}`` and answers when the clip is rendered.
* **Per request, on the CPU, in the request's thread**: download the video and images
  (the same downloader as the workers, :mod:`workers.fetch`); read **every** frame with
  ``VideoCapture.read()`` (full decode and colour conversion of each frame) and keep the
  frames at ``sample_fps`` (the same frame indices, resize and RGB conversion as
  :func:`workers.decode.sample_video`, so the sampled frames are bit-identical); stack
  them and convert them to a **float32** tensor on the CPU, as naive services do before
  handing frames to a model.
* **Inference in the same process, one request at a time** (a per-process lock around
  the models), with **default torch threading** (no ``set_num_threads``; thread-limiting
  environment variables are removed): the float32 tensor is copied to the device (4x the
  bytes of uint8, from pageable memory), and the models — built from the same registry
  with the same settings as the GPU daemon's, eager backend — run on the request's own
  chunks only: the product images as one reference chunk, the sampled frames in chunks of
  ``frames_per_chunk`` stacked up to ``max_batch_size`` per forward (the last, shorter
  chunk on its own). The models' contract is uint8 frames (they normalise on the
  device), so the float32 tensor is cast back there; the values are integers in
  [0, 255], so that round trip is exact: it costs what a naive float pipeline costs and
  cannot change any output.
* Then :func:`workers.select.select` picks the window from results in the daemon's own
  message format, and :func:`workers.render.render` cuts the clip exactly as a clipline
  worker does.

Each response carries the request's forward-pass intervals (``time.monotonic``, which is
system-wide on Linux), so the benchmark computes the device busy ratio as the daemon
does: the union of execution intervals over wall time.

:class:`BaselineCluster` starts ``W`` such processes and dispatches jobs to them like a
load balancer with ``threads`` connection slots per backend: jobs wait in one FIFO and
go to the first free slot, so no backend idles while another has a backlog.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from clipline_core.errors import ClipError, ErrorCode
from clipline_core.settings import Settings
from gpu_service import inprocess, protocol
from gpu_service import models as registry
from gpu_service.models.base import BuildContext, Model
from gpu_service.shm import ChunkKind
from workers import decode, fetch, render, select
from workers.preprocess import into

log = logging.getLogger("clipline_bench.baseline")

#: environment variables that bound library thread pools; removed for the baseline
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "TORCH_NUM_THREADS",
)


def model_names(settings: Settings) -> list[str]:
    """The models a deployment runs, exactly as the daemon builds them."""
    from gpu_service.daemon import model_names as daemon_model_names

    return daemon_model_names(settings)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------
# The naive pipeline.
# ---------------------------------------------------------------------------
def _frame_time(cap: cv2.VideoCapture, index: int) -> float:
    """The decoder's time of the frame just read, NaN when it has none.

    Same rule as :mod:`workers.decode`'s reader: a non-finite value, or 0.0 past frame
    0 (e.g. the last frame of a stream with B-frames), means "no timestamp"; the gaps
    are then filled by ``decode._times``. ``tests/bench/test_e2e_parts.py`` checks that
    both readers agree.
    """
    msec = float(cap.get(cv2.CAP_PROP_POS_MSEC))
    if not math.isfinite(msec) or (msec == 0.0 and index > 0):
        return math.nan
    return msec / 1000.0


def read_all_frames(
    path: Path, settings: Settings, size: tuple[int, int]
) -> tuple[np.ndarray, decode.VideoInfo]:
    """Decode every frame in full; keep those :mod:`workers.decode` keeps, resized RGB.

    The kept frame indices (:func:`workers.decode.keep_index`), the resize and colour
    conversion (:func:`workers.preprocess.into`) and the timestamps (presentation times,
    by the decoder module's own rule) are those of
    :func:`workers.decode.sample_video`, so both systems score the same pixels at the
    same times; only the way of reading differs (``read()`` of every frame here).
    """
    cap = decode.open_capture(path)
    h, w = size
    frames: list[np.ndarray] = []
    kept: list[int] = []
    raw: list[float] = []
    try:
        p = decode.probe_video(cap, settings)
        step = decode.sample_step(p.fps, settings.sample_fps)
        next_keep = decode.keep_index(0, step)
        index = 0
        while True:
            ok, frame = cap.read()  # grab + retrieve: every frame decoded and converted
            if not ok or frame is None or not frame.size:
                break
            raw.append(_frame_time(cap, index))
            if index == next_keep:
                dst = np.empty((h, w, 3), dtype=np.uint8)
                into(frame, dst)
                frames.append(dst)
                kept.append(index)
                next_keep = decode.keep_index(len(kept), step)
            index += 1
    finally:
        cap.release()
    if index < settings.min_decoded_frames or not frames:
        raise ClipError(
            ErrorCode.UNDECODABLE_VIDEO,
            f"only {index} frame(s) of the video could be decoded; the stream is broken or empty",
        )
    times = decode._times(raw, p.fps)  # the decoder's rule, so both agree exactly
    info = decode.VideoInfo(
        fps=p.fps,
        width=p.width,
        height=p.height,
        declared_frames=p.declared,
        decoded_frames=index,
        kept_indices=kept,
        kept_timestamps=[float(times[i]) for i in kept],
        frame_times=times,
        rotation=p.rotation,
    )
    return np.stack(frames), info


def select_and_render(
    results: list[dict[str, Any]],
    info: decode.VideoInfo,
    video: Path,
    dest: Path,
    length_s: float,
    settings: Settings,
) -> dict[str, Any]:
    """Choose the window and cut the clip exactly as a clipline worker's render stage does.

    Same calls, same arguments, same highlight fields as :mod:`workers.pipeline`
    (selection over all results, the frames of the window from the decoded frame times,
    the rendered end from the frame after the clip's last).
    """
    choice = select.select(
        protocol.JobResults.from_messages(results), info.kept_timestamps, info.duration_s, length_s
    )
    first, n_frames = info.frames_between(choice.start_s, choice.end_s)
    clip = render.render(
        video, dest, choice.start_s, n_frames, info.fps, settings.ffmpeg, first_frame=first
    )
    last = first + clip.frames
    end_s = float(info.times[last]) if last < info.decoded_frames else info.duration_s
    return {
        "start_s": round(choice.start_s, 6),
        "end_s": round(max(end_s, choice.start_s), 6),
        "score": round(choice.score, 6),
        "path": str(clip.path),
        "codec": clip.codec,
        "audio": clip.audio,
        "frames": clip.frames,
    }


class Service:
    """One baseline service process: its models and the per-request pipeline."""

    def __init__(self, settings: Settings, threads: int) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        if settings.torch_threads:  # only when the benchmark asks; naive default otherwise
            torch.set_num_threads(settings.torch_threads)
        ctx = BuildContext(settings=settings.replace(backend="eager"), device=self.device)
        self.models: list[Model] = [registry.build(n, ctx) for n in model_names(settings)]
        self.lock = threading.Lock()  # the models serve one request at a time
        self.slots = threading.Semaphore(max(1, threads))
        self.size = (settings.frame_size, settings.frame_size)

    # -- inference ---------------------------------------------------------------
    def _forward(
        self,
        x32: torch.Tensor,
        temporal: bool,
        spans: list[tuple[float, float]],
        job_id: str,
        first_chunk: int,
    ) -> list[dict[str, np.ndarray]]:
        """Run the models on a float32 CPU batch ``[B, T, H, W, 3]``; outputs per item."""
        cuda = self.device.type == "cuda"
        x = x32.to(self.device).to(torch.uint8)  # exact: the values are integers 0..255
        if cuda:
            torch.cuda.synchronize(self.device)
        start = time.monotonic()
        kind = ChunkKind.FRAMES if temporal else ChunkKind.REFS
        per_item = inprocess.run(self.models, x, kind=kind, job_id=job_id, first_chunk=first_chunk)
        if cuda:
            torch.cuda.synchronize(self.device)
        spans.append((start, time.monotonic()))
        return per_item

    def _message(
        self, kind: str, chunk: int, outputs: dict[str, np.ndarray], job_id: str
    ) -> dict[str, Any]:
        """A result in the daemon's message format, so selection reads it unchanged."""
        return inprocess.message(self.models, kind, chunk, outputs, job_id, self.device.type)

    def infer(
        self,
        frames: torch.Tensor,
        refs: torch.Tensor,
        spans: list[tuple[float, float]],
        job_id: str = "baseline",
    ) -> list[dict[str, Any]]:
        """Results for one request: the refs chunk, then the frame chunks in order."""
        per = self.settings.frames_per_chunk
        batch = max(1, self.settings.max_batch_size)
        results = []
        with self.lock:
            (ref_out,) = self._forward(refs[None], False, spans, job_id, -1)
            results.append(self._message(protocol.REFS_KIND, -1, ref_out, job_id))
            n_full = frames.shape[0] // per
            chunk = 0
            for first in range(0, n_full, batch):
                k = min(batch, n_full - first)
                x = frames[first * per : (first + k) * per].reshape(k, per, *frames.shape[1:])
                for out in self._forward(x, True, spans, job_id, chunk):
                    results.append(self._message(protocol.FRAMES_KIND, chunk, out, job_id))
                    chunk += 1
            rest = frames[n_full * per :]
            if rest.shape[0]:
                (out,) = self._forward(rest[None], True, spans, job_id, chunk)
                results.append(self._message(protocol.FRAMES_KIND, chunk, out, job_id))
        return results

    # -- one request ----------------------------------------------------------------
    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        job_id = str(req.get("id") or uuid.uuid4().hex)
        timings: dict[str, float] = {}
        spans: list[tuple[float, float]] = []
        scratch = self.settings.scratch_path / f"baseline-{job_id}-{uuid.uuid4().hex[:6]}"
        scratch.mkdir(parents=True, exist_ok=True)
        t_start = time.monotonic()
        try:
            with self.slots:
                t = time.monotonic()
                video, _ = fetch.fetch_video(req["video_url"], scratch, self.settings)
                images = [
                    fetch.fetch_image(u, scratch, i, self.settings)
                    for i, u in enumerate(req["image_urls"])
                ]
                timings["fetch"] = time.monotonic() - t

                t = time.monotonic()
                sampled, info = read_all_frames(video, self.settings, self.size)
                n_refs = min(len(images), self.settings.frames_per_chunk)
                ref_arr = np.empty((n_refs, *self.size, 3), dtype=np.uint8)
                for i in range(n_refs):
                    decode.load_image(images[i], self.size, ref_arr[i], f"product image {i + 1}")
                frames32 = torch.from_numpy(sampled).float()  # float32 on the CPU
                refs32 = torch.from_numpy(ref_arr).float()
                timings["decode"] = time.monotonic() - t

                t = time.monotonic()
                results = self.infer(frames32, refs32, spans, job_id)
                timings["inference"] = time.monotonic() - t

                t = time.monotonic()
                dest = self.settings.artifacts_path / f"baseline-{job_id}.mp4"
                length = float(req.get("duration_s", 5.0))
                highlight = select_and_render(results, info, video, dest, length, self.settings)
                timings["render"] = time.monotonic() - t
            timings["total"] = time.monotonic() - t_start
            return {
                "id": job_id,
                "status": "succeeded",
                "highlight": highlight,
                "error": None,
                "video": info.to_dict(),
                "timings": timings,
                "spans": spans,
                "torch_threads": torch.get_num_threads(),
            }
        except ClipError as err:
            return {"id": job_id, "status": "failed", "error": err.to_dict(), "spans": spans}
        except Exception as exc:  # report, never hang the client
            log.exception("request %s failed", job_id)
            internal = ClipError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return {"id": job_id, "status": "failed", "error": internal.to_dict(), "spans": spans}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------
# HTTP front.
# ---------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._reply(200, {"ok": True, "pid": os.getpid()})
        else:
            self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path != "/v1/highlight":
            self._reply(404, {"error": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        try:
            req = json.loads(self.rfile.read(length))
        except ValueError:
            self._reply(400, {"error": "invalid JSON"})
            return
        self._reply(200, self.server.service.handle(req))

    def _reply(self, code: int, obj: dict[str, Any]) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    service: Service


def serve(settings: Settings, port: int, threads: int) -> int:
    """Load the models, bind, print ``READY <port>``, serve until SIGTERM."""
    service = Service(settings, threads)
    server = _Server(("127.0.0.1", port), _Handler)
    server.service = service
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    sys.stdout.write(f"READY {server.server_port}\n")
    sys.stdout.flush()
    stop.wait()
    server.shutdown()
    return 0


# ---------------------------------------------------------------------------
# The benchmark's side: start W services and dispatch jobs to them.
# ---------------------------------------------------------------------------
def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def baseline_env(settings: Settings) -> dict[str, str]:
    """The environment of a service process: settings, and default library threading."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    env.update(settings.to_env())
    env["PYTHONUNBUFFERED"] = "1"
    return env


class BaselineCluster:
    """``workers`` baseline service processes on loopback ports."""

    def __init__(self, settings: Settings, workers: int, threads: int) -> None:
        self.settings = settings
        self.workers = max(1, workers)
        self.threads = max(1, threads)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.log_dir = Path(settings.state_dir) / "baseline-logs"

    def start(self, timeout_s: float = 180.0) -> BaselineCluster:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = baseline_env(self.settings)
        try:
            for i in range(self.workers):
                with open(self.log_dir / f"service-{i}.log", "ab") as logf:
                    self.procs.append(
                        subprocess.Popen(
                            [
                                sys.executable,
                                "-m",
                                "clipline_bench.baseline",
                                "--threads",
                                str(self.threads),
                            ],
                            env=env,
                            stdout=subprocess.PIPE,
                            stderr=logf,
                            stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent,
                        )
                    )
            deadline = time.monotonic() + timeout_s
            for i, proc in enumerate(self.procs):
                self.ports.append(self._wait_ready(i, proc, deadline))
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, i: int, proc: subprocess.Popen[bytes], deadline: float) -> int:
        assert proc.stdout is not None
        box: list[bytes] = []
        reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        line = box[0].decode().strip() if box else ""
        if not line.startswith("READY "):
            tail = (self.log_dir / f"service-{i}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"baseline service {i} did not start:\n{tail}")
        return int(line.split()[1])

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def request(self, port: int, job: dict[str, Any], timeout_s: float = 900.0) -> dict[str, Any]:
        body = json.dumps(job).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/highlight",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            out: dict[str, Any] = json.loads(resp.read())
        return out

    def run(
        self,
        jobs: Sequence[dict[str, Any]],
        on_done: Callable[[int, dict[str, Any], float], None] | None = None,
    ) -> list[tuple[dict[str, Any], float]]:
        """Send every job; return ``(response, monotonic completion time)`` in job order.

        ``workers x threads`` client connections each take the next job from one FIFO,
        so a backend gets a new request as soon as one of its slots frees.
        """
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(jobs)):
            todo.put(i)
        out: list[tuple[dict[str, Any], float] | None] = [None] * len(jobs)

        def client(port: int) -> None:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    resp = self.request(port, jobs[i])
                except Exception as exc:  # a dead backend: report the job as failed
                    resp = {
                        "id": jobs[i].get("id"),
                        "status": "failed",
                        "error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"},
                        "spans": [],
                    }
                done = time.monotonic()
                out[i] = (resp, done)
                if on_done is not None:
                    on_done(i, resp, done)

        threads = [
            threading.Thread(target=client, args=(port,), daemon=True)
            for port in self.ports
            for _ in range(self.threads)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [o for o in out if o is not None]

    def stop(self, timeout_s: float = 20.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs = []
        self.ports = []

    def __enter__(self) -> BaselineCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run one baseline highlight service process")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="requests handled at a time")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    return serve(Settings.from_env(), ns.port, ns.threads)


if __name__ == "__main__":
    sys.exit(main())
