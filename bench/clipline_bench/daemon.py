"""Benchmark: the GPU daemon fed at full speed, per inference backend.

``clipline bench daemon`` starts the real daemon (``python -m gpu_service``) once per
backend, with the configured models (``--models``, default ``features``; e.g.
``features,saliency,embed``), and feeds it from ``--producers`` processes that write
synthetic uint8 chunks (``frames x size x size x 3``) into the shared-memory arena as
fast as slots free up. After a warm-up it measures, over ``--seconds``:

``items_per_s``        chunks processed per second (the daemon's own counter);
``device_busy_ratio``  busy seconds over wall seconds, from the daemon's
                       :class:`~gpu_service.executor.BusyMeter` (CUDA events on a GPU,
                       forward-pass time on the CPU), read from its heartbeat;
``mean_batch``         items per executed batch;
``p50_ms``/``p99_ms``  per-item latency from publication in shared memory to the result
                       being handed to Redis (the ``latency_s`` of each result message;
                       with producers at full speed this is mostly queueing).

Backends tried by default: those that can work here (``eager``, ``channels_last``,
``compile`` when a C compiler exists, on the CPU only for ``features`` alone unless asked
for, since Inductor takes many minutes over the neural networks there; on CUDA also
``cudagraphs`` and ``tensorrt`` when installed); others are listed under ``skipped``
with the reason. A backend whose model
fell back to another one is reported with the backend actually used. Output::

    {"device": "cpu", "backends": {"eager": {"items_per_s", "device_busy_ratio",
     "mean_batch", "p50_ms", "p99_ms", "speedup_vs_eager", "models": {...}}, ...},
     "skipped": {...}, "targets": {...}, "config": {...}}

as a table (stdout, or stderr with ``--json``), as JSON on stdout with ``--json``, and
always in ``--out`` (default ``bench/results/daemon.json``). ``--quick`` (CI) runs eager
only, briefly; its figures are not meaningful.

The producer functions here (:func:`produce_forever`, :func:`publish_chunks`) are also
what the daemon's tests use to feed it from real processes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from clipline_core import constants
from clipline_core.settings import Settings

DEFAULT_OUT = Path("bench") / "results" / "daemon.json"
CUDA_BACKENDS = constants.BACKENDS
#: the backends that run without CUDA (cudagraphs and tensorrt need a GPU)
CPU_BACKENDS = tuple(b for b in constants.BACKENDS if b not in ("cudagraphs", "tensorrt"))
TARGET_BUSY = 0.95


# ---------------------------------------------------------------------------
# Producers (run in their own processes; only numpy and the shm transport).
# ---------------------------------------------------------------------------
def chunk_data(seed: int, frames: int, size: int) -> np.ndarray:
    """Deterministic synthetic frames ``[frames, size, size, 3]`` uint8 for ``seed``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(frames, size, size, 3), dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class ChunkSpec:
    """One chunk a test producer publishes (contents: :func:`chunk_data` of ``seed``)."""

    job_id: str
    chunk: int
    frames: int
    size: int
    seed: int = 0
    priority: int = 1
    arrival: float = 0.0
    kind: int = 0  # gpu_service.shm.ChunkKind value
    dtype: str = "uint8"
    mark: int = -1  # if >= 0: every value of the first frame


def publish_chunks(arena_path: str, socket_path: str, specs: list[ChunkSpec]) -> None:
    """Publish every chunk in ``specs`` in order (a producer process for tests)."""
    from gpu_service.shm import ChunkKind, Producer

    producer = Producer(Path(arena_path), Path(socket_path), reserve_timeout_s=30.0)
    try:
        for spec in specs:
            data = chunk_data(spec.seed, spec.frames, spec.size)
            if spec.mark >= 0:
                data[0] = spec.mark
            with producer.reserve() as lease:
                arr = lease.array(data.shape, np.dtype(spec.dtype))
                arr[...] = data
                lease.publish(
                    job_id=spec.job_id,
                    shape=data.shape,
                    dtype=np.dtype(spec.dtype),
                    chunk=spec.chunk,
                    priority=spec.priority,
                    arrival=spec.arrival or time.time(),
                    kind=ChunkKind(spec.kind),
                )
    finally:
        producer.close()


def product_scene(
    seed: int, frames: int, size: int, refs: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A job for the localizer: product images ``[2, size, size, 3]`` and frames showing them.

    The pictures have structure at several scales (noise blown up 4x and 16x, so SIFT
    finds its full quota of keypoints, as on real footage); each frame shows one of the
    product images at a different place and a smaller size on its own background, so
    every frame's keypoints are matched and verified as in a real job.
    """
    rng = np.random.default_rng(seed)

    def picture(h: int, w: int) -> np.ndarray:
        coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        fine = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        big = np.kron(coarse, np.ones((16, 16, 1), np.uint8))[:h, :w].astype(np.uint16)
        mid = np.kron(fine, np.ones((4, 4, 1), np.uint8))[:h, :w].astype(np.uint16)
        return ((big + mid) // 2 + 1).astype(np.uint8)  # >= 1: never a letterbox bar

    if refs is None:
        refs = np.stack([picture(size, size) for _ in range(2)])
    side = size // 2
    step = max(1, size // side)
    out = np.empty((frames, size, size, 3), np.uint8)
    for i in range(frames):
        out[i] = picture(size, size)
        small = refs[i % 2][::step, ::step][:side, :side]
        y = int(rng.integers(0, size - side))
        x = int(rng.integers(0, size - side))
        out[i, y : y + side, x : x + side] = small
    return refs, out


def produce_forever(
    arena_path: str,
    socket_path: str,
    job_id: str,
    frames: int,
    size: int,
    seed: int,
    stop: Any,
    published: Any,
    refs: bool = False,
) -> None:
    """Publish chunks as fast as slots free up until ``stop`` is set (benchmark producer).

    With ``refs`` (the localizer runs) the job's product images go first, as a REFS chunk,
    and the frames show them (:func:`product_scene`); otherwise frames are noise.
    """
    from clipline_core.errors import ClipError, ErrorCode
    from gpu_service.shm import ChunkKind, Producer

    producer = Producer(Path(arena_path), Path(socket_path), reserve_timeout_s=1.0)
    if refs:
        images, first = product_scene(seed * 16, frames, size)
        pool = [first] + [product_scene(seed * 16 + k, frames, size, images)[1] for k in (1, 2, 3)]
        with producer.reserve(timeout_s=30.0) as lease:
            np.copyto(lease.array(images.shape), images)
            lease.publish(
                job_id=job_id,
                shape=images.shape,
                chunk=0,
                priority=1,
                arrival=time.time(),
                kind=ChunkKind.REFS,
            )
    else:
        pool = [chunk_data(seed * 16 + k, frames, size) for k in range(4)]
    shape = pool[0].shape
    n = 0
    try:
        while not stop.is_set():
            try:
                lease = producer.reserve(timeout_s=0.5)
            except ClipError as exc:
                if exc.code == ErrorCode.BACKPRESSURE:
                    continue
                break  # the daemon went away
            with lease:
                np.copyto(lease.array(shape), pool[n % len(pool)])
                lease.publish(job_id=job_id, shape=shape, chunk=n, priority=1, arrival=time.time())
            n += 1
            published.value = n
    finally:
        producer.close()


# ---------------------------------------------------------------------------
# Options.
# ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        default=Settings().models,
        help=f"comma-separated models (default: the default set, {Settings().models})",
    )
    parser.add_argument(
        "--backends", default="", help="comma-separated backends (default: all usable here)"
    )
    parser.add_argument(
        "--producers", type=int, default=0, help="producer processes (default: from cores)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per backend")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first")
    parser.add_argument("--batch", type=int, default=8, help="max_batch_size")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="max_queue_delay_ms")
    parser.add_argument("--frames", type=int, default=16, help="frames per chunk")
    parser.add_argument(
        "--size", type=int, default=0, help="frame height and width (default: frame_size)"
    )
    parser.add_argument("--slots", type=int, default=0, help="arena slots (default 4 x batch)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument(
        "--saliency-size",
        default="",
        help="saliency input HEIGHTxWIDTH (CLIPLINE_SALIENCY_SIZE; model default if empty)",
    )
    parser.add_argument(
        "--start-timeout", type=float, default=600.0, help="seconds a daemon may take to start"
    )
    parser.add_argument("--quick", action="store_true", help="eager only, briefly (CI smoke run)")
    parser.add_argument("--json", action="store_true", help="print the JSON on stdout")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON")
    parser.add_argument("--shm-dir", default=constants.DEFAULT_SHM_DIR)
    parser.add_argument("--redis-url", default="", help="default: REDIS_URL, local, embedded")


@dataclasses.dataclass(frozen=True)
class Config:
    models: str
    producers: int
    seconds: float
    warmup: float
    batch: int
    delay_ms: float
    frames: int
    size: int
    slots: int
    device: str
    saliency_size: str
    start_timeout: float
    shm_dir: str
    redis_url: str


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------
# One backend.
# ---------------------------------------------------------------------------
class _Collector(threading.Thread):
    """Pops result messages off the producers' job lists; keeps (time, latency, batch)."""

    def __init__(self, redis_url: str, keys: list[str]) -> None:
        super().__init__(name="collector", daemon=True)
        import redis

        self.client = redis.Redis.from_url(redis_url)
        self.keys = keys
        self.samples: list[tuple[float, float]] = []
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while True:
            got = self.sweep()
            if not got:
                if self.stop.is_set():
                    return
                time.sleep(0.01)

    def sweep(self) -> int:
        pipe = self.client.pipeline(transaction=False)
        for key in self.keys:
            pipe.lpop(key, 512)
        now = time.monotonic()
        got = 0
        for batch in pipe.execute():
            for raw in batch or []:
                got += 1
                latency = _field(raw, b'"latency_s":')
                if raw.find(b'"error":null') < 0:
                    self.errors += 1
                if latency is not None:
                    self.samples.append((now, latency))
        return got


def _field(raw: bytes, name: bytes) -> float | None:
    i = raw.rfind(name)
    if i < 0:
        return None
    j = i + len(name)
    k = j
    while k < len(raw) and raw[k : k + 1] not in (b",", b"}"):
        k += 1
    try:
        return float(raw[j:k])
    except ValueError:
        return None


def _heartbeat(client: Any, key: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(key).items()}


def _fresh_heartbeat(
    client: Any, key: str, after: float, timeout_s: float = 10.0
) -> dict[str, str]:
    """The first heartbeat written after daemon time ``after``."""
    deadline = time.monotonic() + timeout_s
    while True:
        hb = _heartbeat(client, key)
        if hb and float(hb.get("ts", 0)) > after:
            return hb
        if time.monotonic() > deadline:
            raise RuntimeError("the daemon stopped refreshing its heartbeat")
        time.sleep(0.05)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def _withdraw(arena: Path, sock: Path, jobs: list[str]) -> int:
    """Take the producers' unconsumed chunks back (as a worker does when it gives up)."""
    from gpu_service.shm import Producer

    producer = Producer(arena, sock)
    try:
        return sum(producer.withdraw(job) for job in jobs)
    except Exception:
        return 0
    finally:
        producer.close()


def _stop_daemon(proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def run_backend(cfg: Config, backend: str, log: Any) -> dict[str, Any]:
    """Start a daemon with ``backend``, feed it, measure; the backend's result entry."""
    import redis

    deployment = f"bench-{uuid.uuid4().hex[:10]}"
    work = Path(tempfile.mkdtemp(prefix=f"clipline-{deployment}-"))
    slot_bytes = max(1 << 16, cfg.frames * cfg.size * cfg.size * 3)
    env = {
        **os.environ,
        "CLIPLINE_DEPLOYMENT": deployment,
        "CLIPLINE_REDIS_URL": cfg.redis_url,
        "CLIPLINE_MODELS": cfg.models,
        "CLIPLINE_BACKEND": backend,
        "CLIPLINE_DEVICE": cfg.device,
        "CLIPLINE_MAX_BATCH_SIZE": str(cfg.batch),
        "CLIPLINE_MAX_QUEUE_DELAY_MS": str(cfg.delay_ms),
        "CLIPLINE_FRAMES_PER_CHUNK": str(cfg.frames),
        "CLIPLINE_FRAME_SIZE": str(cfg.size),
        "CLIPLINE_SHM_SLOTS": str(cfg.slots),
        "CLIPLINE_SHM_SLOT_BYTES": str(slot_bytes),
        "CLIPLINE_SHM_DIR": cfg.shm_dir,
        "CLIPLINE_STATE_DIR": str(work / "state"),
        "CLIPLINE_RESULT_TTL_S": "300",
        "PYTHONUNBUFFERED": "1",
    }
    if cfg.saliency_size:
        env["CLIPLINE_SALIENCY_SIZE"] = cfg.saliency_size
    arena = Path(cfg.shm_dir) / constants.shm_arena_name(deployment)
    sock = Path(cfg.shm_dir) / constants.shm_socket_name(deployment)
    hb_key = constants.daemon_heartbeat_key(deployment, "local")
    logfile = work / "daemon.log"
    client = redis.Redis.from_url(cfg.redis_url)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    producers: list[Any] = []
    counters: list[Any] = []
    jobs = [f"bench-{i}" for i in range(cfg.producers)]
    collector = _Collector(cfg.redis_url, [constants.results_key(deployment, j) for j in jobs])
    started = time.monotonic()
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_service"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # stopped by us, not by a signal to our group
        )
    try:
        while not client.exists(hb_key):
            if proc.poll() is not None:
                return {"error": f"daemon exited with {proc.returncode}:\n{_tail(logfile)}"}
            if time.monotonic() - started > cfg.start_timeout:
                return {"error": f"daemon not ready after {cfg.start_timeout:.0f} s"}
            time.sleep(0.1)
        startup_s = time.monotonic() - started
        hb = _heartbeat(client, hb_key)
        models = {name: be for name, be, _ in (part.split(":") for part in hb["models"].split(","))}
        print(
            f"  {backend}: daemon ready in {startup_s:.1f} s on {hb.get('device')} "
            f"({', '.join(f'{k}={v}' for k, v in models.items())}); feeding from "
            f"{cfg.producers} producers",
            file=log,
            flush=True,
        )
        collector.start()
        for i, job in enumerate(jobs):
            counter = ctx.Value("q", 0)
            p = ctx.Process(
                target=produce_forever,
                args=(str(arena), str(sock), job, cfg.frames, cfg.size, i + 1, stop, counter),
                kwargs={"refs": "localizer" in cfg.models.split(",")},
                daemon=True,
            )
            p.start()
            producers.append(p)
            counters.append(counter)
        time.sleep(cfg.warmup)
        h0 = _fresh_heartbeat(client, hb_key, float(_heartbeat(client, hb_key).get("ts", 0)))
        t0 = time.monotonic()
        time.sleep(cfg.seconds)
        h1 = _fresh_heartbeat(client, hb_key, float(h0["ts"]) + cfg.seconds - 1.0)
        t1 = time.monotonic()
    finally:
        stop.set()
        for p in producers:
            p.join(10)
            if p.is_alive():
                p.kill()
        withdrawn = _withdraw(arena, sock, jobs)  # the drain then only finishes what runs
        code = _stop_daemon(proc, max(60.0, cfg.start_timeout / 4))
        clean = code == 0 and not arena.exists()
        for path in (arena, sock):  # a private deployment: nothing to keep for later
            path.unlink(missing_ok=True)
        collector.stop.set()
        if collector.is_alive():
            collector.join(10)
        collector.sweep()
        with contextlib.suppress(Exception):
            client.delete(*collector.keys, hb_key)
        client.close()
        shutil.rmtree(work, ignore_errors=True)
    wall = float(h1["ts"]) - float(h0["ts"])
    items = int(h1["items"]) - int(h0["items"])
    batches = int(h1["batches"]) - int(h0["batches"])
    busy = float(h1["busy_s"]) - float(h0["busy_s"])
    lat = np.array([v for t, v in collector.samples if t0 <= t <= t1 + 1.0]) * 1000.0
    return {
        "items_per_s": round(items / wall, 2) if wall > 0 else 0.0,
        "device_busy_ratio": round(min(1.0, busy / wall), 4) if wall > 0 else 0.0,
        "mean_batch": round(items / batches, 2) if batches else 0.0,
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
        "items": items,
        "batches": batches,
        "seconds": round(wall, 2),
        "results": int(lat.size),
        "result_errors": collector.errors,
        "published": int(sum(c.value for c in counters)),
        "models": models,
        "device": hb.get("device", ""),
        "device_name": hb.get("device_name", ""),
        "startup_s": round(startup_s, 1),
        "clean_exit": clean,
        "withdrawn_at_end": withdrawn,
        "measured_between_s": [round(t0 - started, 1), round(t1 - started, 1)],
    }


# ---------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------
def _device_kind(requested: str) -> str:
    """``cuda`` or ``cpu``: what the daemon will run on for ``--device``."""
    if requested.startswith("cuda"):
        return "cuda"
    if requested == "cpu":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _skip_reason(backend: str, device: str) -> str | None:
    import importlib.util

    if backend in ("cudagraphs", "tensorrt") and not device.startswith("cuda"):
        return "needs a CUDA device"
    if backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed"
    if backend == "compile" and not (shutil.which("cc") or shutil.which("gcc")):
        return "torch.compile needs a C compiler on this machine"
    return None


def table(report: dict[str, Any]) -> str:
    lines = [
        f"daemon on {report['device']} {report.get('device_name', '')}".rstrip()
        + f": models {report['config']['models']}, batch<={report['config']['batch']}, "
        f"{report['config']['producers']} producers, {report['config']['seconds']} s per backend",
        f"{'backend':<14} {'items/s':>9} {'busy':>6} {'batch':>6} {'p50 ms':>9} {'p99 ms':>9} "
        f"{'vs eager':>9}  models",
    ]
    for name, r in report["backends"].items():
        if "error" in r:
            lines.append(f"{name:<14} failed: {r['error'].splitlines()[0]}")
            continue
        p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.1f}"
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f}"
        ratio = r.get("speedup_vs_eager")
        used = ",".join(f"{k}={v}" for k, v in r["models"].items())
        lines.append(
            f"{name:<14} {r['items_per_s']:>9.2f} {r['device_busy_ratio']:>6.3f} "
            f"{r['mean_batch']:>6.2f} {p50:>9} {p99:>9} "
            f"{'' if ratio is None else f'{ratio:.2f}x':>9}  {used}"
        )
    for name, why in report.get("skipped", {}).items():
        lines.append(f"{name:<14} skipped: {why}")
    if report.get("targets"):
        lines.append(
            "targets: "
            + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in report["targets"].items())
        )
    return "\n".join(lines)


def _finish(report: dict[str, Any]) -> None:
    """Speed-ups against eager and the targets, from what has been measured so far."""
    eager = report["backends"].get("eager", {}).get("items_per_s")
    targets: dict[str, bool] = {}
    for name, r in report["backends"].items():
        if "error" in r:
            continue
        if eager:
            r["speedup_vs_eager"] = round(r["items_per_s"] / eager, 3)
        targets[f"{name}_busy_ge_{TARGET_BUSY}"] = r["device_busy_ratio"] >= TARGET_BUSY
        if report["device"] == "cuda" and name in ("channels_last", "compile", "cudagraphs"):
            targets[f"{name}_faster_than_eager"] = bool(eager and r["items_per_s"] > eager)
    report["targets"] = targets


def _write(report: dict[str, Any], out: Path) -> str:
    text = json.dumps(report, indent=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(out)
    return text


def _terminated(signum: int, frame: Any) -> None:
    # Unwind through the finally blocks: producers and the daemon are stopped cleanly.
    raise SystemExit(128 + signum)


def _plan(wanted: list[str], device: str, models: str) -> tuple[list[str], dict[str, str]]:
    """Backends to run (eager first, compile last: it may take long) and skipped ones."""
    full = CUDA_BACKENDS if device == "cuda" else CPU_BACKENDS
    neural = {m.strip() for m in models.split(",") if m.strip()} - {"features"}
    order = wanted or list(CUDA_BACKENDS)
    order = sorted(order, key=lambda b: (b != "eager", b == "compile"))
    run: list[str] = []
    skipped: dict[str, str] = {}
    for backend in order:
        why = _skip_reason(backend, device)
        if why is None and not wanted and backend not in full:
            why = "not usable on this device"
        if why is None and not wanted and backend == "compile" and device == "cpu" and neural:
            why = (
                "compiling the neural models takes many minutes on a CPU; "
                "ask for it with --backends compile"
            )
        if why:
            skipped[backend] = why
        else:
            run.append(backend)
    return run, skipped


def run(args: argparse.Namespace) -> int:
    from clipline_bench.handoff import redis_server

    log = sys.stderr if args.json else sys.stdout
    producers = args.producers or max(2, min(8, _cores() // 2))
    seconds = 3.0 if args.quick else args.seconds
    warmup = 1.0 if args.quick else args.warmup
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.quick and not wanted:
        wanted = ["eager"]
    unknown = sorted(set(wanted) - set(CUDA_BACKENDS))
    if unknown:
        print(f"unknown backends: {', '.join(unknown)}", file=sys.stderr)
        return 2
    out: Path = args.out
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        with redis_server(args.redis_url) as redis_url:
            if redis_url is None:
                print("no Redis server reachable or embeddable", file=sys.stderr)
                return 2
            cfg = Config(
                models=args.models,
                producers=producers,
                seconds=seconds,
                warmup=warmup,
                batch=args.batch,
                delay_ms=args.delay_ms,
                frames=args.frames,
                size=args.size or Settings().frame_size,
                slots=args.slots or 4 * args.batch,
                device=args.device,
                saliency_size=args.saliency_size,
                start_timeout=args.start_timeout,
                shm_dir=args.shm_dir,
                redis_url=redis_url,
            )
            device = _device_kind(cfg.device)
            order, skipped = _plan(wanted, device, cfg.models)
            report: dict[str, Any] = {
                "device": device,
                "backends": {},
                "skipped": skipped,
                "config": {
                    **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "redis_url"},
                    "quick": bool(args.quick),
                    "cores": _cores(),
                },
            }
            for backend in order:
                print(f"backend {backend} ...", file=log, flush=True)
                result = run_backend(cfg, backend, log)
                report["backends"][backend] = result
                if "error" not in result and result.get("device_name"):
                    report["device_name"] = result["device_name"]
                _finish(report)
                _write(report, out)  # a time limit that cuts the run keeps what was measured
    finally:
        signal.signal(signal.SIGTERM, previous)
    text = _write(report, out)
    print(table(report), file=log)
    if args.json:
        print(text)
    failed = [n for n, r in report["backends"].items() if "error" in r]
    return 1 if failed or not report["backends"] else 0
