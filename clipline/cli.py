"""The ``clipline`` command line.

Main job::

    clipline highlight VIDEO --image PRODUCT.jpg [--image ...] [--title T]
                       [--description D] [--duration 5] [--out DIR] [--json]

Local stack: ``clipline up`` / ``status`` / ``down``; jobs through the HTTP API (the
running stack's, or ``CLIPLINE_API_URL`` with ``CLIPLINE_API_KEY``):
``clipline submit`` / ``job ID`` / ``wait ID``. Service entrypoints (what the container
image runs): ``clipline gpu-daemon``, ``clipline worker``, ``clipline api``.
Benchmarks: ``clipline bench NAME``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from clipline_core import constants
from clipline_core.errors import ClipError, ErrorCode
from clipline_core.settings import Settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _benchmarks() -> dict[str, str]:
    """Benchmark name -> module, from the ``clipline.benchmarks`` entry points.

    The benchmarks live outside the runtime packages (``bench/clipline_bench``) and sit
    above the CLI, so the CLI finds them by entry point instead of importing them.
    """
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group="clipline.benchmarks")}
    if found:
        return found
    # A source checkout on the path but not installed (the GPU check): the same names.
    import importlib.util
    import pkgutil

    spec = importlib.util.find_spec("clipline_bench")
    if spec is None or not spec.submodule_search_locations:
        return {}
    return {
        m.name: f"clipline_bench.{m.name}"
        for m in pkgutil.iter_modules(spec.submodule_search_locations)
        if not m.name.startswith("_") and _is_benchmark(f"clipline_bench.{m.name}")
    }


def _is_benchmark(module: str) -> bool:
    """A benchmark module defines ``add_arguments`` and ``run`` (read, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return False
    text = Path(spec.origin).read_text()
    return "\ndef add_arguments(" in text and "\ndef run(" in text


BENCHMARKS = _benchmarks()


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------
class _Terminated(Exception):
    pass


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


def _source(value: str) -> str:
    """A video/image argument as a job source: URLs as given, paths made absolute."""
    if value.startswith(("http://", "https://", "file://")):
        return value
    return str(Path(value).expanduser().absolute())


def _precheck_local(source: str, what: str, video: bool) -> ClipError | None:
    """Fail fast on local inputs that cannot work, with the pipeline's error codes."""
    from workers import fetch

    path = fetch.local_path(source)
    if path is None:
        return None
    if not path.exists():
        return ClipError(ErrorCode.NOT_FOUND, f"{what} file {str(path)!r} does not exist")
    if not path.is_file():
        return ClipError(ErrorCode.NOT_FOUND, f"{what} path {str(path)!r} is not a regular file")
    if path.stat().st_size == 0:
        return ClipError(ErrorCode.EMPTY_FILE, f"the {what} file is empty")
    with open(path, "rb") as fh:
        head = fh.read(512)
    if video and fetch.sniff_video(head) is None:
        return ClipError(ErrorCode.NOT_A_VIDEO, f"the {what} is not a video (unrecognised content)")
    if not video and fetch.sniff_image(head) is None:
        return ClipError(
            ErrorCode.NOT_AN_IMAGE, f"the {what} is not an image (unrecognised content)"
        )
    return None


def _running_settings(settings: Settings) -> Settings | None:
    """Settings of a stack that is up for this deployment, or None."""
    from clipline.stack import read_state

    state = read_state(settings)
    if state is None:
        return None
    return Settings.from_env({**os.environ, **state["settings"]})


def _connect(settings: Settings) -> tuple[Any, Any, Any]:
    """(redis client, JobStore, Celery app) for ``settings``."""
    import redis

    from clipline_core.store import JobStore
    from workers.app import make_app

    client = redis.Redis.from_url(settings.redis_url)
    return (
        client,
        JobStore(client, settings.deployment, settings.terminal_ttl_s),
        make_app(settings),
    )


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _failure_summary(err: ClipError, job_id: str | None = None) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "status": "failed",
        "highlight": None,
        "error": err.to_dict(),
        "timings": {
            "queued_s": None,
            "fetch_s": None,
            "decode_s": None,
            "inference_s": None,
            "total_s": None,
        },
    }


def _wait(store: Any, job_id: str, timeout_s: float, progress: bool) -> Any:
    """Poll a job until it is terminal; print its state changes when ``progress``.

    A fast stage can begin and end between two polls. When a later state (or
    success) shows that the job passed through states no poll saw, those are
    printed too, timed from the job's own record, so the timeline is whole.
    """
    from clipline_core.job import PROGRESSION, TERMINAL, JobState

    wall0, start = time.time(), time.monotonic()
    seen = -1  # index in PROGRESSION of the latest state printed
    last: Any = None
    while True:
        job = store.get(job_id)
        if job is None:
            raise ClipError(ErrorCode.NOT_FOUND, f"no job {job_id!r} (expired or never existed)")
        if progress and job.state != last:
            now = time.monotonic() - start
            if job.state in PROGRESSION or job.state == JobState.SUCCEEDED:
                done = job.state == JobState.SUCCEEDED
                upto = len(PROGRESSION) if done else PROGRESSION.index(job.state)
                for missed in PROGRESSION[seen + 1 : upto]:
                    at = _entered(job, missed)
                    t = now if at is None else min(max(at - wall0, 0.0), now)
                    print(f"  [{t:6.2f} s] {missed.value}", flush=True)
                seen = upto
            print(f"  [{now:6.2f} s] {job.state.value}", flush=True)
            last = job.state
        if job.state in TERMINAL:
            return job
        if time.monotonic() - start > timeout_s:
            raise ClipError(
                ErrorCode.TIMEOUT, f"job {job_id} did not finish within {timeout_s:.0f} s"
            )
        time.sleep(0.05)


def _entered(job: Any, state: Any) -> float | None:
    """Wall time at which ``job`` entered ``state``, reckoned from its record.

    Stages run fetch -> decode -> render, with inference overlapping decode;
    ``None`` when the record lacks what the reckoning needs.
    """
    from clipline_core.job import JobState

    t, began = job.timings, job.started_at
    if state == JobState.QUEUED:
        return float(job.created_at)
    if began is None:
        return None
    fetch = t.get("fetch")
    if state == JobState.FETCHING:
        return float(began)
    if fetch is None:
        return None
    if state == JobState.DECODING:
        return float(began) + fetch
    if state == JobState.INFERRING and "decode" in t:
        return float(began) + fetch + t["decode"]
    if state == JobState.RENDERING and "decode" in t:
        return float(began) + fetch + max(t["decode"], t.get("inference", 0.0))
    return None


# ---------------------------------------------------------------------------
# highlight
# ---------------------------------------------------------------------------
def cmd_highlight(args: argparse.Namespace) -> int:
    from clipline_core.job import JobSpec, JobState
    from workers.submit import submit

    base = Settings.from_env()
    video = _source(args.video)
    images = [_source(i) for i in args.image]
    out_dir = Path(args.out).expanduser().absolute()

    def fail(err: ClipError, job_id: str | None = None) -> int:
        if args.json:
            _emit(_failure_summary(err, job_id))
        else:
            print(f"failed: {err.code.value}: {err.message}", file=sys.stderr)
        return EXIT_FAILED

    try:
        spec = JobSpec(
            video_url=video,
            image_urls=images,
            title=args.title,
            description=args.description,
            duration_s=args.duration,
            priority=args.priority,
        )
    except ValueError as exc:
        return fail(ClipError(ErrorCode.INVALID_REQUEST, f"invalid request: {exc}"))
    for i, src in enumerate([video, *images]):
        err = _precheck_local(src, "video" if i == 0 else f"product image {i}", video=i == 0)
        if err is not None:
            return fail(err)

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    stack = None
    try:
        settings = _running_settings(base)
        if settings is None:
            from clipline.stack import LocalStack

            roots = {
                str(Path(p).parent)
                for p in [video, *images]
                if not p.startswith(("http:", "https:"))
            }
            roots |= {str(p) for p in base.local_root_paths}
            settings = base.replace(
                deployment=f"local-{uuid.uuid4().hex[:8]}",
                local_roots=os.pathsep.join(sorted(r.removeprefix("file://") for r in roots)),
                allow_loopback=True,
                state_dir=base.state_dir,
            )
            if not args.json:
                print("starting a local stack (Redis, GPU daemon, workers)...", flush=True)
            stack = LocalStack(settings, workers=args.workers)
            settings = stack.start()
        client, store, app = _connect(settings)
        job_id, _ = submit(store, app, spec)
        if not args.json:
            print(f"job {job_id} queued", flush=True)
        job = _wait(
            store, job_id, settings.job_time_limit_s * settings.max_attempts + 60, not args.json
        )
        summary = job.summary()
        if job.state == JobState.SUCCEEDED and job.highlight and job.highlight.path:
            out_dir.mkdir(parents=True, exist_ok=True)
            dest = out_dir / f"{job_id}.mp4"
            shutil.copyfile(job.highlight.path, dest)
            summary["highlight"]["path"] = str(dest)
            if stack is not None:  # ephemeral artifacts go with the stack
                Path(job.highlight.path).unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{job_id}.json").write_text(json.dumps(summary, indent=2) + "\n")
        client.close()
    except ClipError as err:
        return fail(err)
    except (_Terminated, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if stack is not None:
            stack.stop()
        signal.signal(signal.SIGTERM, previous)

    if args.json:
        _emit(summary)
    else:
        _print_summary(summary)
    return EXIT_OK if summary["status"] == "succeeded" else EXIT_FAILED


def _product_line(product: dict[str, Any] | None) -> str:
    """What the localizer said about the product, for a person."""
    if not product:
        return "not localized (whole-frame scorer)"
    if not product.get("found"):
        return "not found in the video (best-effort window)"
    box = product.get("box")
    where = f", box x {box[0]:.2f} y {box[1]:.2f} w {box[2]:.2f} h {box[3]:.2f}" if box else ""
    return (
        f"found, verified in {product.get('verified_frames', 0)} of "
        f"{product.get('frames', 0)} frames{where}"
    )


def _print_summary(summary: dict[str, Any]) -> None:
    if summary["status"] == "succeeded":
        h = summary["highlight"]
        print(f"highlight: {h['start_s']:.2f}-{h['end_s']:.2f} s (score {h['score']:.3f})")
        print(f"product:   {_product_line(h.get('product'))}")
        print(f"clip:      {h['path']}")
    else:
        err = summary.get("error") or {}
        print(f"{summary['status']}: {err.get('code')}: {err.get('message')}")
    t = summary["timings"]
    parts = [f"{k[:-2]} {v:.2f}s" for k, v in t.items() if v is not None]
    print("timings:   " + ", ".join(parts))


# ---------------------------------------------------------------------------
# up / status / down
# ---------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    from clipline.stack import read_state, state_file

    settings = Settings.from_env()
    if read_state(settings) is not None:
        print(f"a stack for deployment {settings.deployment!r} is already up")
        return EXIT_OK
    roots = settings.local_roots or os.pathsep.join(
        [os.getcwd(), str(Path.home()), tempfile.gettempdir()]
    )
    env = {**os.environ, **settings.replace(local_roots=roots, allow_loopback=True).to_env()}
    log_dir = Path(settings.state_dir) / settings.deployment / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "supervisor.log", "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clipline.stack", "--workers", str(args.workers)],
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if read_state(settings) is not None:
            print(f"clipline is up (deployment {settings.deployment!r}); `clipline down` stops it")
            return EXIT_OK
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    print(f"the stack failed to start; see {log_dir}", file=sys.stderr)
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    state_file(settings).unlink(missing_ok=True)
    return EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    from clipline.stack import read_state
    from clipline_core.procs import pid_alive

    settings = Settings.from_env()
    state = read_state(settings)
    if state is None:
        out: dict[str, Any] = {"deployment": settings.deployment, "up": False}
    else:
        running = _running_settings(settings)
        assert running is not None
        client, _store, app = _connect(running)
        daemon = client.hgetall(
            constants.daemon_heartbeat_key(running.deployment, running.node_name)
        )
        from workers.submit import queue_depths

        out = {
            "deployment": settings.deployment,
            "up": True,
            "redis_url": state["redis_url"],
            "processes": {k: {"pid": p, "alive": pid_alive(p)} for k, p in state["pids"].items()},
            "daemon": {k.decode(): v.decode() for k, v in daemon.items()},
            "queue_depth": queue_depths(app, running.deployment),
            "logs": state["logs"],
        }
    if args.json:
        _emit(out)
    else:
        for k, v in out.items():
            print(f"{k:12} {v}")
    return EXIT_OK if out["up"] else EXIT_FAILED


def cmd_down(args: argparse.Namespace) -> int:
    from clipline.stack import read_state
    from clipline_core.procs import pid_alive

    settings = Settings.from_env()
    state = read_state(settings)
    if state is None:
        print(f"no stack is up for deployment {settings.deployment!r}")
        return EXIT_OK
    pid = int(state["supervisor_pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        print("the stack did not stop in time", file=sys.stderr)
        return EXIT_FAILED
    print("clipline is down")
    return EXIT_OK


# ---------------------------------------------------------------------------
# submit / job / wait (through the HTTP API, with clipline.client)
# ---------------------------------------------------------------------------
def _api_client() -> Any:
    """A client of the API named by CLIPLINE_API_URL/CLIPLINE_API_KEY or the running stack."""
    from clipline.client import Client
    from clipline.stack import read_state

    url = os.environ.get("CLIPLINE_API_URL", "")
    key = os.environ.get("CLIPLINE_API_KEY", "")
    if not (url and key):
        state = read_state(Settings.from_env()) or {}
        local = state.get("api_url") or ""
        # The local stack's key goes only to the local stack's API.
        if not url or url.rstrip("/") == local:
            url = url or local
            key = key or state.get("api_key") or ""
    if not url:
        raise ClipError(
            ErrorCode.INVALID_REQUEST,
            "no API to talk to: run `clipline up`, or set CLIPLINE_API_URL and CLIPLINE_API_KEY",
        )
    if not key:
        raise ClipError(ErrorCode.INVALID_REQUEST, "no API key: set CLIPLINE_API_KEY")
    return Client(url, key)


def _print_view(view: Any) -> None:
    if view.result is not None:
        r = view.result
        print(f"highlight: {r.start_s:.2f}-{r.end_s:.2f} s (score {r.score:.3f})")
        product = r.product.model_dump() if r.product is not None else None
        print(f"product:   {_product_line(product)}")
    elif view.error is not None:
        print(f"{view.state.value}: {view.error.code}: {view.error.message}")
    else:
        print(f"state:     {view.state.value}")
    parts = [f"{k[:-2]} {v:.2f}s" for k, v in view.timings.model_dump().items() if v is not None]
    if parts:
        print("timings:   " + ", ".join(parts))


def cmd_submit(args: argparse.Namespace) -> int:
    from clipline.client import ApiError

    try:
        with _api_client() as api:
            accepted = api.submit(
                _source(args.video),
                [_source(i) for i in args.image],
                title=args.title,
                description=args.description,
                duration_s=args.duration,
                priority=args.priority,
                callback_url=args.callback_url,
                idempotency_key=args.idempotency_key,
            )
    except ClipError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return EXIT_USAGE
    except ApiError as err:
        print(f"error: {err.code}: {err.message}", file=sys.stderr)
        return EXIT_USAGE if 400 <= err.status < 500 else EXIT_FAILED
    if args.json:
        _emit(
            {
                "job_id": accepted.id,
                "state": accepted.state.value,
                "created": not accepted.replayed,
            }
        )
    else:
        print(accepted.id)
    return EXIT_OK


def cmd_job(args: argparse.Namespace) -> int:
    from clipline.client import ApiError

    try:
        with _api_client() as api:
            view = api.get(args.job_id)
    except ClipError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return EXIT_USAGE
    except ApiError as err:
        print(f"error: {err.code}: {err.message}", file=sys.stderr)
        return EXIT_FAILED
    _emit(view.model_dump(mode="json"))
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    from clipline.client import ApiError

    start = time.monotonic()

    def progress(view: Any) -> None:
        if not args.json:
            print(f"  [{time.monotonic() - start:6.2f} s] {view.state.value}", flush=True)

    clip: Path | None = None
    try:
        with _api_client() as api:
            view = api.wait(args.job_id, args.timeout, on_change=progress)
            if args.out and view.result is not None and view.result.download:
                out_dir = Path(args.out).expanduser()
                out_dir.mkdir(parents=True, exist_ok=True)
                clip = api.download(view.id, out_dir)
    except ClipError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return EXIT_USAGE
    except ApiError as err:
        print(f"error: {err.code}: {err.message}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        _emit({**view.model_dump(mode="json"), "clip": str(clip) if clip else None})
    else:
        _print_view(view)
        if clip is not None:
            print(f"clip:      {clip}")
    return EXIT_OK if view.state.value == "succeeded" else EXIT_FAILED


# ---------------------------------------------------------------------------
# services
# ---------------------------------------------------------------------------
def cmd_gpu_daemon(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
    from gpu_service.daemon import main as daemon_main

    return daemon_main()


def cmd_worker(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    from workers.app import worker_argv

    argv = worker_argv(
        settings,
        args.concurrency or settings.worker_concurrency,
        f"{settings.deployment}-{settings.node_name}@%h",
        "--loglevel",
        args.loglevel,
    )
    os.execvp(sys.executable, [sys.executable, "-m", "celery", *argv])


def cmd_api(args: argparse.Namespace) -> int:
    module = importlib.import_module("clipline.api")
    return int(module.serve(host=args.host, port=args.port))


def cmd_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHMARKS[args.bench_name])
    return int(module.run(args))


# ---------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------
def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", help="video file path or http(s) URL")
    p.add_argument("--image", action="append", required=True, help="product image (repeatable)")
    p.add_argument("--title", default="")
    p.add_argument("--description", default="")
    p.add_argument("--duration", type=float, default=5.0, help="highlight length in seconds")
    p.add_argument(
        "--priority",
        default=constants.DEFAULT_PRIORITY.value,
        choices=[c.value for c in constants.PriorityClass],
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser(bench: str | None = None) -> argparse.ArgumentParser:
    """The parser; a benchmark's own options are loaded only when it is the one named."""
    parser = argparse.ArgumentParser(prog="clipline", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("highlight", help="make a highlight clip of a product video")
    _add_job_args(p)
    p.add_argument("--out", default="highlights", help="output directory (default ./highlights)")
    p.add_argument("--workers", type=int, default=None, help="worker processes for a local stack")
    p.set_defaults(func=cmd_highlight)

    p = sub.add_parser("up", help="start the local stack in the background")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("status", help="show the local stack")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("down", help="stop the local stack")
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("submit", help="enqueue a job through the API (running stack or remote)")
    _add_job_args(p)
    p.add_argument("--idempotency-key", default=None)
    p.add_argument("--callback-url", default=None, help="URL to POST the signed outcome to")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("job", help="show a job (JSON)")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_job)
    p = sub.add_parser("wait", help="wait for a job to finish")
    p.add_argument("job_id")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", default=None, help="download the clip into this directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("gpu-daemon", help="run the GPU inference daemon (service entrypoint)")
    p.set_defaults(func=cmd_gpu_daemon)
    p = sub.add_parser("worker", help="run the Celery CPU workers (service entrypoint)")
    p.add_argument("--concurrency", type=int, default=0)
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("api", help="run the HTTP job API (service entrypoint)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=constants.DEFAULT_API_PORT)
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("bench", help="run a benchmark (prints a table, writes JSON)")
    bench_sub = p.add_subparsers(dest="bench_name", required=True, metavar="NAME")
    for name, module_name in BENCHMARKS.items():
        bp = bench_sub.add_parser(name, help=f"{name} benchmark")
        bp.set_defaults(func=cmd_bench)
        if name == bench:
            importlib.import_module(module_name).add_arguments(bp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    named = argv[1] if len(argv) > 1 and argv[0] == "bench" else None
    parser = build_parser(named if named in BENCHMARKS else None)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
