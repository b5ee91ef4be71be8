"""The ``clipline`` command line.

Main job::

    clipline highlight VIDEO --image PRODUCT.jpg [--image ...] [--title T]
                       [--description D] [--duration 5] [--aspect 9:16] [--out DIR] [--json]

Local stack: ``clipline up`` / ``status`` / ``logs`` / ``down``; jobs through the HTTP
API (the running stack's, or ``CLIPLINE_API_URL`` with ``CLIPLINE_API_KEY``):
``clipline submit [--wait]`` / ``job ID`` / ``wait ID`` / ``list`` / ``cancel ID``.
Service entrypoints (what the container image runs): ``clipline gpu-daemon``,
``clipline worker``, ``clipline callback-worker``, ``clipline api``. Benchmarks:
``clipline bench NAME``. Global options: ``--version``, ``--quiet``, ``--verbose``,
``--no-color``.

Exit codes (:class:`Exit`; :func:`exit_code` is the one mapping from how a command
ended to its status): 0 success; 1 a job failed, was cancelled or did not finish in
time; 2 bad input (arguments, local files, a request the API refused, a wrong API key),
refused before any job ran; 3 infrastructure unavailable (Redis or the API unreachable,
no stack up); 130 interrupted (Ctrl-C or SIGTERM: the command says what became of the
job; it cancels only the job of a temporary stack it started itself).

Local files: ``clipline highlight`` takes any file its user can read. Without a stack
up, its temporary stack accepts the inputs' directories. With one up, an input outside
the stack's directories is hard-linked (or copied) into the stack's owner-only inbox
(``<state dir>/<deployment>/inbox``, one of the directories ``clipline up`` allows) for
that job and removed when the command ends. Jobs through the API get only the stack's
directories (``clipline up --allow-dir DIR``, ``CLIPLINE_LOCAL_ROOTS``).

What a running job shows (live rows on a terminal, plain lines otherwise) is
:mod:`clipline.display`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import functools
import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from clipline.display import JobDisplay, Output, progress_text
from clipline_core import constants
from clipline_core.errors import ApiError, ClipError, ErrorCode
from clipline_core.settings import ENV_PREFIX, Settings

if TYPE_CHECKING:
    from pydantic import ValidationError


class Exit(enum.IntEnum):
    """The exit codes of ``clipline`` (documented in the README and ``--help``)."""

    OK = 0
    FAILED = 1  # a job failed, was cancelled, or did not finish in time
    USAGE = 2  # bad input, refused before any job ran
    UNAVAILABLE = 3  # Redis / the API unreachable, no stack up
    INTERRUPTED = 130  # Ctrl-C or SIGTERM


EXIT_OK, EXIT_FAILED, EXIT_USAGE = Exit.OK, Exit.FAILED, Exit.USAGE
EXIT_UNAVAILABLE, EXIT_INTERRUPTED = Exit.UNAVAILABLE, Exit.INTERRUPTED

EXIT_CODES_HELP = """exit codes:
  0    success
  1    the job failed, was cancelled, or did not finish within --timeout
  2    bad input: arguments, local files, a request the API refused, a wrong API key
  3    infrastructure unavailable: Redis or the API unreachable, no stack up
  130  interrupted (Ctrl-C, SIGTERM): says what became of the job"""


class CliError(Exception):
    """A command's failure with a message for a person; its exit code is ``exit``."""

    exit = Exit.FAILED

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class BadInput(CliError):
    exit = Exit.USAGE


class Unavailable(CliError):
    exit = Exit.UNAVAILABLE


class WaitTimeout(CliError):
    """The job did not finish within ``--timeout`` (it keeps running)."""


#: Error codes of a ClipError raised by the CLI itself that are not about its input.
_NOT_INPUT = {ErrorCode.TIMEOUT, ErrorCode.INTERNAL}
_UNAVAILABLE_STATUS = {0, 429, 502, 503, 504}


def exit_code(outcome: BaseException | str | None) -> Exit:
    """The exit status for how a command ended: the one mapping, used by every command.

    ``outcome`` is None (success), a job's final state (``succeeded`` -> 0; ``failed``,
    ``cancelled`` or a state it was still in -> 1), or the exception that ended it.
    """
    if outcome is None:
        return Exit.OK
    if isinstance(outcome, str):
        return Exit.OK if outcome == "succeeded" else Exit.FAILED
    if isinstance(outcome, (KeyboardInterrupt, _Terminated)):
        return Exit.INTERRUPTED
    if isinstance(outcome, CliError):
        return outcome.exit
    if isinstance(outcome, ApiError):
        if outcome.code == "timeout" and outcome.status == 0:
            return Exit.FAILED  # the client's wait ran out; the job keeps running
        if outcome.status in _UNAVAILABLE_STATUS:
            return Exit.UNAVAILABLE
        return Exit.USAGE if 400 <= outcome.status < 500 else Exit.FAILED
    if isinstance(outcome, ClipError):
        return Exit.FAILED if outcome.code in _NOT_INPUT else Exit.USAGE
    if _is_unreachable(outcome):
        return Exit.UNAVAILABLE
    return Exit.FAILED


def _is_unreachable(exc: BaseException) -> bool:
    """Redis refused or timed out, or the local stack could not start."""
    import redis

    from clipline.stack import StackError

    return isinstance(
        exc, (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError, StackError)
    )


def describe(exc: BaseException) -> str:
    """The message for a person of the exception that ended a command."""
    if isinstance(exc, CliError):
        return f"{exc.code.value}: {exc.message}" if exc.code else exc.message
    if isinstance(exc, ApiError):
        if exc.status == 0 and exc.code == "unreachable":
            return f"the API is unreachable: {exc.message}"
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, ClipError):
        return f"{exc.code.value}: {exc.message}"
    if isinstance(exc, (KeyboardInterrupt, _Terminated)):
        return "interrupted"
    from clipline.stack import StackError

    if isinstance(exc, StackError):
        return f"the local stack could not start: {exc}"
    if _is_unreachable(exc):
        return f"Redis is unreachable ({type(exc).__name__}: {exc})"
    return f"{type(exc).__name__}: {exc}"


#: The global --quiet/--verbose/--no-color choices (set by :func:`main`).
OUT = Output()


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


@contextlib.contextmanager
def _sigterm_raises() -> Any:
    """Within: SIGTERM raises :class:`_Terminated`, handled like Ctrl-C."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _finite_float(text: str) -> float:
    """An argparse type: a finite number (``inf`` and ``nan`` are usage errors)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def _invalid(exc: ValidationError) -> str:
    """A job spec's validation errors on one line, field by field."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in exc.errors()
    )


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


def _wait(store: Any, job_id: str, timeout_s: float, progress: bool | JobDisplay = False) -> Any:
    """Poll a job in Redis until it is terminal, showing it on ``progress``.

    ``progress`` is a :class:`clipline.display.JobDisplay` (``True``: plain lines on
    stdout). A fast stage can begin and end between two polls; the display shows the
    states no poll saw too, timed from the job's own record (:func:`_entered`).
    Raises :class:`WaitTimeout` after ``timeout_s`` (the job keeps running).
    """
    from clipline_core.job import TERMINAL

    if isinstance(progress, JobDisplay):
        display = progress
    else:
        display = JobDisplay("plain" if progress else "off")
    start = time.monotonic()
    while True:
        job = store.get(job_id)
        if job is None:
            raise BadInput(f"no job {job_id!r} (expired or never existed)", ErrorCode.NOT_FOUND)
        display.update(job.state, job.progress, functools.partial(_entered, job))
        if job.state in TERMINAL:
            return job
        if time.monotonic() - start > timeout_s:
            raise WaitTimeout(
                f"job {job_id} did not finish within {timeout_s:.0f} s; it is still "
                f"{job.state.value} (not cancelled)",
                ErrorCode.TIMEOUT,
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
#: A job's inbox directory is kept this long after its command ended without cleaning
#: it up (killed, or interrupted with the job left running), then any command removes it.
INBOX_KEEP_S = 24 * 3600.0


def _inbox(settings: Settings) -> Path:
    """The stack's owner-only inbox (inputs of `clipline highlight` from elsewhere)."""
    return Path(settings.state_dir) / settings.deployment / "inbox"


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _sweep_inbox(inbox: Path) -> None:
    """Remove job directories whose command is gone and that are older than a day."""
    from clipline_core.procs import same_process

    try:
        entries = list(inbox.iterdir())
    except FileNotFoundError:
        return
    for d in entries:
        pid, start, _rest = [*d.name.split("-", 2), "", ""][:3]
        alive = pid.isdigit() and start.isdigit() and same_process(int(pid), int(start))
        with contextlib.suppress(OSError):
            if not alive and time.time() - d.stat().st_mtime > INBOX_KEEP_S:
                shutil.rmtree(d, ignore_errors=True)


def _stage_local(settings: Settings, sources: list[str]) -> tuple[list[str], Path | None]:
    """Sources for a job on a running stack; see the module doc ("Local files").

    A local input inside the stack's directories is passed as it is. One outside them is
    hard-linked (or copied: another filesystem, or a file of another owner) into a
    directory of this job in the stack's inbox; the CLI's user reads it, so nothing
    becomes readable that was not. Returns the sources and that directory (None when
    nothing was staged). A stack whose directories lack the inbox (started with an older
    ``clipline up``) refuses such a file: :class:`BadInput` ``forbidden_source``.
    """
    from clipline_core.procs import open_private, private_dir, start_time
    from workers import fetch

    roots = settings.local_root_paths
    inbox = _inbox(settings)
    out: list[str] = []
    staged: Path | None = None
    for i, src in enumerate(sources):
        path = fetch.local_path(src)
        resolved = path.resolve() if path is not None else None
        if resolved is None or _inside(resolved, roots):
            out.append(src)
            continue
        if not _inside(inbox.resolve(), roots):
            allowed = ", ".join(str(r) for r in roots) or "none"
            raise BadInput(
                f"{str(path)!r} is outside the directories the running stack accepts local "
                f"files from ({allowed}); allow its directory with `clipline down` then "
                f"`clipline up --allow-dir {resolved.parent}` (or CLIPLINE_LOCAL_ROOTS)",
                ErrorCode.FORBIDDEN_SOURCE,
            )
        if staged is None:
            private_dir(inbox)
            _sweep_inbox(inbox)
            me = os.getpid()
            staged = private_dir(inbox / f"{me}-{start_time(me)}-{uuid.uuid4().hex[:8]}")
        dest = staged / f"{i}-{resolved.name}"
        try:
            os.link(resolved, dest)
        except OSError:
            with open(resolved, "rb") as src_fh, os.fdopen(open_private(dest, "wb"), "wb") as fh:
                shutil.copyfileobj(src_fh, fh, 1 << 20)
        OUT.detail(f"{path} is outside the stack's directories: passed as {dest}")
        out.append(str(dest))
    return out, staged


def _ephemeral_roots(base: Settings, sources: Sequence[str]) -> str:
    """Roots of a temporary stack: the inputs' directories (as given and resolved)."""
    from workers import fetch

    roots = {str(p) for p in base.local_root_paths}
    for src in sources:
        path = fetch.local_path(src)
        if path is not None:
            roots |= {str(path.parent), str(path.resolve().parent)}
    return os.pathsep.join(sorted(roots))


def _interrupted_note(store: Any, job_id: str | None, temporary: bool) -> tuple[str, bool]:
    """What became of the job when `clipline highlight` was interrupted, and whether it
    still runs. The job of a temporary stack is cancelled (the stack stops with the
    command); one on a running stack is left to run."""
    if job_id is None or store is None:
        return "nothing was submitted", False
    try:
        state = store.state(job_id)
        if state is not None and state.value in ("succeeded", "failed", "cancelled"):
            return f"job {job_id} had already {state.value}", False
        if temporary:
            store.cancel(job_id)
            return f"job {job_id} was cancelled; the temporary stack is stopping", False
    except Exception as exc:  # Redis gone: say so rather than guess
        return f"job {job_id}: its state is unknown ({type(exc).__name__}: {exc})", False
    where = state.value if state is not None else "unknown"
    return (
        f"job {job_id} is still {where} on the running stack (not cancelled): "
        f"`clipline wait {job_id} --out DIR` fetches its clip, `clipline cancel {job_id}` stops it"
    ), True


def _error_code(exc: BaseException) -> ErrorCode:
    """The stable code a ``--json`` failure summary carries for ``exc``."""
    if isinstance(exc, (CliError, ClipError)) and exc.code is not None:
        return exc.code
    if exit_code(exc) == Exit.UNAVAILABLE:
        return ErrorCode.UNAVAILABLE
    return ErrorCode.INTERNAL


def cmd_highlight(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from clipline_core.job import JobSpec, JobState
    from workers.submit import submit

    base = Settings.from_env()
    video = _source(args.video)
    images = [_source(i) for i in args.image]
    out_dir = Path(args.out).expanduser().absolute()
    display = OUT.display(enabled=not args.json)

    def fail(exc: BaseException, job_id: str | None = None) -> int:
        display.close()
        if args.json:
            message = exc.message if isinstance(exc, (CliError, ClipError)) else describe(exc)
            _emit(_failure_summary(ClipError(_error_code(exc), message), job_id))
        else:
            OUT.error(describe(exc))
        return exit_code(exc)

    try:
        spec = JobSpec(
            video_url=video,
            image_urls=images,
            title=args.title,
            description=args.description,
            duration_s=args.duration,
            aspect=args.aspect,
            priority=args.priority,
        )
    except ValidationError as exc:
        return fail(BadInput(f"invalid request: {_invalid(exc)}", ErrorCode.INVALID_REQUEST))
    for i, src in enumerate([video, *images]):
        err = _precheck_local(src, "video" if i == 0 else f"product image {i}", video=i == 0)
        if err is not None:
            return fail(BadInput(err.message, err.code))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return fail(
            BadInput(f"cannot use --out {str(out_dir)!r}: {exc}", ErrorCode.INVALID_REQUEST)
        )

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    stack = None
    store: Any = None
    staged: Path | None = None
    job_id: str | None = None
    try:
        settings = _running_settings(base)
        if settings is None:
            from clipline.stack import LocalStack

            settings = base.replace(
                deployment=f"local-{uuid.uuid4().hex[:8]}",
                local_roots=_ephemeral_roots(base, [video, *images]),
                allow_loopback=True,
                state_dir=base.state_dir,
            )
            display.note("starting a local stack (Redis, GPU daemon, workers)...")
            stack = LocalStack(settings, workers=args.workers)
            settings = stack.start()
        else:
            sources, staged = _stage_local(settings, [video, *images])
            if staged is not None:
                spec = spec.model_copy(update={"video_url": sources[0], "image_urls": sources[1:]})
        client, store, app = _connect(settings)
        job_id, _ = submit(store, app, spec, hold_ttl_s=settings.job_lease_s)
        display.note(f"job {job_id} queued")
        job = _wait(store, job_id, settings.job_time_limit_s * settings.max_attempts + 60, display)
        display.close()
        summary = job.summary()
        h = job.highlight if job.state == JobState.SUCCEEDED else None
        if h is not None and (h.path or h.artifact):
            dest = out_dir / f"{job_id}.mp4"
            if h.path:
                shutil.copyfile(h.path, dest)
            elif h.artifact:  # in an object store (artifact_store=s3)
                from clipline_core.artifacts import open_store

                clips = open_store(settings)
                clips.download(h.artifact, dest)
                if stack is not None:
                    clips.delete(h.artifact)
            summary["highlight"]["path"] = str(dest)
            if stack is not None and h.path:  # ephemeral artifacts go with the stack
                Path(h.path).unlink(missing_ok=True)
        (out_dir / f"{job_id}.json").write_text(json.dumps(summary, indent=2) + "\n")
        client.close()
    except (_Terminated, KeyboardInterrupt):
        display.close()
        note, running = _interrupted_note(store, job_id, temporary=stack is not None)
        OUT.error(note, label="interrupted")
        if running:
            staged = None  # the job still needs its inputs (swept a day later)
        return Exit.INTERRUPTED
    except Exception as exc:
        return fail(exc, job_id)
    finally:
        display.close()
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        if stack is not None:
            stack.stop()
        signal.signal(signal.SIGTERM, previous)

    if args.json:
        _emit(summary)
    elif OUT.quiet:
        if summary["status"] == "succeeded":
            print(summary["highlight"]["path"])
        else:
            err_info = summary.get("error") or {}
            OUT.error(f"{err_info.get('code')}: {err_info.get('message')}", label="failed")
    else:
        _print_summary(summary)
    return exit_code(summary["status"])


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


def _reframe_line(aspect: str | None, width: Any, height: Any, reframe: Any) -> str | None:
    """A vertical or square clip's shape, size and what it followed (None for source)."""
    if not reframe:
        return None
    note = f"; {reframe['note']}" if reframe.get("note") else ""
    return f"{aspect} {width}x{height}, following the {reframe['follow']}{note}"


def _print_summary(summary: dict[str, Any]) -> None:
    if summary["status"] == "succeeded":
        h = summary["highlight"]
        print(f"highlight: {h['start_s']:.2f}-{h['end_s']:.2f} s (score {h['score']:.3f})")
        print(f"product:   {_product_line(h.get('product'))}")
        frame = _reframe_line(h.get("aspect"), h.get("width"), h.get("height"), h.get("reframe"))
        if frame:
            print(f"frame:     {frame}")
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
def _up_roots(settings: Settings, allow_dirs: Sequence[str]) -> list[str]:
    """The directories a stack from `clipline up` accepts local files from.

    ``CLIPLINE_LOCAL_ROOTS`` when set (exactly those), otherwise the current directory
    (never ``/``); every ``--allow-dir`` is added. Nothing else: not $HOME, not /tmp.
    """
    roots = [str(p) for p in settings.local_root_paths]
    if not roots:
        cwd = Path.cwd().resolve()
        if cwd != Path(cwd.anchor):
            roots.append(str(cwd))
    for d in allow_dirs:
        path = Path(d).expanduser().resolve()
        if not path.is_dir():
            raise ClipError(ErrorCode.INVALID_REQUEST, f"--allow-dir {d!r} is not a directory")
        roots.append(str(path))
    return list(dict.fromkeys(roots))


def _with_inbox(settings: Settings, roots: list[str]) -> list[str]:
    """``roots`` plus the stack's inbox (see the module doc, "Local files")."""
    inbox = str(_inbox(settings).resolve())
    return roots if inbox in roots else [*roots, inbox]


def cmd_up(args: argparse.Namespace) -> int:
    from clipline.stack import read_state, state_file
    from clipline_core.procs import open_private, private_dir

    settings = Settings.from_env()
    if read_state(settings) is not None:
        OUT.say(f"a stack for deployment {settings.deployment!r} is already up")
        return EXIT_OK
    try:
        roots = _up_roots(settings, args.allow_dir)
    except ClipError as err:
        raise BadInput(err.message) from None
    # Loopback and private addresses stay refused unless CLIPLINE_ALLOW_LOOPBACK /
    # CLIPLINE_ALLOW_PRIVATE_NETWORKS say otherwise: jobs come in through the API.
    local_roots = os.pathsep.join(_with_inbox(settings, roots))
    env = {**os.environ, **settings.replace(local_roots=local_roots).to_env()}
    log_dir = Path(settings.state_dir) / settings.deployment / "logs"
    try:
        for d in (Path(settings.state_dir), log_dir.parent, log_dir, _inbox(settings)):
            private_dir(d)
    except OSError as exc:
        raise BadInput(f"cannot use the state directory: {exc}") from None
    logf = open_private(log_dir / "supervisor.log")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clipline.stack", "--workers", str(args.workers)],
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        os.close(logf)
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline:
            if read_state(settings) is not None:
                OUT.say(
                    f"clipline is up (deployment {settings.deployment!r}); `clipline down` stops it"
                )
                OUT.say(
                    "local files are accepted from: "
                    + (", ".join(roots) or "nowhere")
                    + " (add directories with `clipline up --allow-dir DIR`; "
                    "`clipline highlight` takes any file you can read)"
                )
                return EXIT_OK
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    except (KeyboardInterrupt, _Terminated):
        OUT.error(
            "the stack goes on starting in the background: `clipline status` shows it, "
            "`clipline down` stops it",
            label="interrupted",
        )
        return EXIT_INTERRUPTED
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    state_file(settings).unlink(missing_ok=True)
    raise Unavailable(
        f"the stack failed to start; see `clipline logs supervisor` (logs in {log_dir})"
    )


def cmd_status(args: argparse.Namespace) -> int:
    from clipline.stack import read_state
    from clipline_core.localredis import masked
    from clipline_core.procs import same_process

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
            "redis_url": masked(state["redis_url"]),
            "api_url": state.get("api_url"),
            "metrics": state.get("metrics") or {},
            "processes": {
                k: {"pid": p, "alive": same_process(p, (state.get("starts") or {}).get(k))}
                for k, p in state["pids"].items()
            },
            "local_roots": [
                str(p) for p in running.local_root_paths if p != _inbox(running).resolve()
            ],
            "inbox": str(_inbox(running)),
            "allow_loopback": running.allow_loopback,
            "allow_private_networks": running.allow_private_networks,
            "daemon": {k.decode(): v.decode() for k, v in daemon.items()},
            "backlog": queue_depths(app, running.deployment),
            "logs": state["logs"],
        }
    if args.json:
        _emit(out)
    elif not out["up"]:
        OUT.error(
            f"no stack is up for deployment {settings.deployment!r} (start one: `clipline up`)"
        )
    else:
        for k, v in out.items():
            print(f"{k:12} {v}")
    return EXIT_OK if out["up"] else EXIT_UNAVAILABLE


def cmd_down(args: argparse.Namespace) -> int:
    from clipline.stack import read_state
    from clipline_core.procs import pid_alive

    settings = Settings.from_env()
    state = read_state(settings)
    if state is None:
        OUT.say(f"no stack is up for deployment {settings.deployment!r}")
        return EXIT_OK
    pid = int(state["supervisor_pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        OUT.error(f"the stack did not stop within {args.timeout:.0f} s (supervisor pid {pid})")
        return EXIT_FAILED
    OUT.say("clipline is down")
    return EXIT_OK


# ---------------------------------------------------------------------------
# submit / job / wait / list / cancel (through the HTTP API, with clipline.client)
# ---------------------------------------------------------------------------
def _api_target() -> tuple[str, str, dict[str, Any] | None]:
    """(URL, key, the local stack's record when the API is the local stack's)."""
    from clipline.stack import read_state

    url = os.environ.get("CLIPLINE_API_URL", "")
    key = os.environ.get("CLIPLINE_API_KEY", "")
    state = read_state(Settings.from_env())
    local = (state or {}).get("api_url") or ""
    is_local = bool(local) and (not url or url.rstrip("/") == local)
    # The local stack's key goes only to the local stack's API.
    if is_local and state is not None:
        url = url or local
        key = key or state.get("api_key") or ""
    if not url:
        raise Unavailable(
            f"no API to talk to: no stack is up for deployment {Settings.from_env().deployment!r}"
            " (start one: `clipline up`) and CLIPLINE_API_URL is not set"
        )
    if not key:
        raise BadInput("no API key: set CLIPLINE_API_KEY", ErrorCode.UNAUTHENTICATED)
    return url, key, state if is_local else None


def _api_client() -> Any:
    """A client of the API named by CLIPLINE_API_URL/CLIPLINE_API_KEY or the running stack."""
    from clipline.client import Client

    url, key, _state = _api_target()
    return Client(url, key)


def _print_view(view: Any) -> None:
    if view.result is not None:
        r = view.result
        print(f"highlight: {r.start_s:.2f}-{r.end_s:.2f} s (score {r.score:.3f})")
        product = r.product.model_dump() if r.product is not None else None
        print(f"product:   {_product_line(product)}")
        reframe = r.reframe.model_dump() if r.reframe is not None else None
        frame = _reframe_line(r.aspect, r.width, r.height, reframe)
        if frame:
            print(f"frame:     {frame}")
    elif view.error is not None:
        print(f"{view.state.value}: {view.error.code}: {view.error.message}")
    else:
        print(f"state:     {view.state.value}")
        text = progress_text(view.progress)
        if text:
            print(f"progress:  {text}")
    parts = [f"{k[:-2]} {v:.2f}s" for k, v in view.timings.model_dump().items() if v is not None]
    if parts:
        print("timings:   " + ", ".join(parts))


def _check_local_sources(sources: Sequence[str], state: dict[str, Any]) -> None:
    """Local inputs of a job for the local stack's API: usable, and inside its roots."""
    from workers import fetch

    roots = [Path(r) for r in state.get("local_roots") or []]
    for i, src in enumerate(sources):
        what = "video" if i == 0 else f"product image {i}"
        err = _precheck_local(src, what, video=i == 0)
        if err is not None:
            raise BadInput(err.message, err.code)
        path = fetch.local_path(src)
        if path is not None and not _inside(path.resolve(), roots):
            shown = ", ".join(str(r) for r in roots) or "none"
            raise BadInput(
                f"{what} {str(path)!r} is outside the directories the stack accepts local "
                f"files from ({shown}): allow its directory with `clipline down` then "
                f"`clipline up --allow-dir {path.resolve().parent}` (or CLIPLINE_LOCAL_ROOTS); "
                "`clipline highlight` takes any file you can read",
                ErrorCode.FORBIDDEN_SOURCE,
            )


class _ViewRecord:
    """The parts of a job view :func:`_entered` reads, shaped like a stored job's."""

    def __init__(self, view: Any) -> None:
        t = view.timings
        self.created_at, self.started_at = view.created_at, view.started_at
        self.timings = {
            k: v
            for k, v in (("fetch", t.fetch_s), ("decode", t.decode_s), ("inference", t.inference_s))
            if v is not None
        }


def _wait_api(api: Any, job_id: str, timeout_s: float, display: JobDisplay) -> Any:
    """Poll a job through the API until it is terminal, showing it on ``display``."""
    from clipline_core.job import TERMINAL, JobState

    start = time.monotonic()
    while True:
        view = api.get(job_id)
        display.update(view.state, view.progress, functools.partial(_entered, _ViewRecord(view)))
        if view.state in TERMINAL:
            return view
        if time.monotonic() - start > timeout_s:
            raise WaitTimeout(
                f"job {job_id} did not finish within {timeout_s:.0f} s; it is still "
                f"{view.state.value} (not cancelled)",
                ErrorCode.TIMEOUT,
            )
        time.sleep(1.0 if view.state == JobState.QUEUED else 0.5)


def _await(api: Any, job_id: str, args: argparse.Namespace, extra: dict[str, Any]) -> int:
    """Wait for a job, download its clip with ``--out``, print the outcome, map the exit."""
    display = OUT.display(enabled=not args.json)
    try:
        with _sigterm_raises():
            view = _wait_api(api, job_id, args.timeout, display)
    except (KeyboardInterrupt, _Terminated):
        display.close()
        state = "in an unknown state"
        with contextlib.suppress(Exception):
            state = "still " + api.get(job_id).state.value
        OUT.error(
            f"stopped waiting; job {job_id} is {state} (not cancelled): "
            f"`clipline wait {job_id}` waits again, `clipline cancel {job_id}` stops it",
            label="interrupted",
        )
        return EXIT_INTERRUPTED
    finally:
        display.close()
    clip: Path | None = None
    if args.out and view.result is not None and view.result.download:
        clip = api.download(view.id, str(Path(args.out).expanduser()) + os.sep)
    if args.json:
        _emit({**extra, **view.model_dump(mode="json"), "clip": str(clip) if clip else None})
    elif OUT.quiet:
        if clip is not None:
            print(clip)
        elif view.error is not None:
            OUT.error(f"{view.error.code}: {view.error.message}", label=view.state.value)
    else:
        _print_view(view)
        if clip is not None:
            print(f"clip:      {clip}")
    return exit_code(view.state.value)


def cmd_submit(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from clipline_core.job import JobSpec

    # The API's own model first: a request it would refuse is a usage error here.
    try:
        spec = JobSpec(
            video_url=_source(args.video),
            image_urls=[_source(i) for i in args.image],
            title=args.title,
            description=args.description,
            duration_s=args.duration,
            aspect=args.aspect,
            priority=args.priority,
            callback_url=args.callback_url,
        )
    except ValidationError as exc:
        raise BadInput(_invalid(exc), ErrorCode.INVALID_REQUEST) from None
    url, key, state = _api_target()
    if state is not None:
        _check_local_sources([spec.video_url, *spec.image_urls], state)
    from clipline.client import Client

    with Client(url, key) as api:
        accepted = api.submit(
            spec.video_url,
            list(spec.image_urls),
            title=spec.title,
            description=spec.description,
            duration_s=spec.duration_s,
            aspect=spec.aspect.value,
            priority=spec.priority.value,
            callback_url=spec.callback_url,
            idempotency_key=args.idempotency_key,
        )
        if args.wait:
            if not args.json:
                OUT.say(f"job {accepted.id} {'found' if accepted.replayed else 'queued'}")
            return _await(api, accepted.id, args, {"created": not accepted.replayed})
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
    with _api_client() as api:
        view = api.get(args.job_id)
    _emit(view.model_dump(mode="json"))
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    with _api_client() as api:
        return _await(api, args.job_id, args, {})


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def cmd_list(args: argparse.Namespace) -> int:
    from clipline_core.job import JobState

    with _api_client() as api:
        jobs, cursor = api.list_jobs(
            state=[JobState(s) for s in args.state] if args.state else None,
            limit=args.limit,
            cursor=args.cursor,
        )
    if args.json:
        _emit({"jobs": [j.model_dump(mode="json") for j in jobs], "next_cursor": cursor})
        return EXIT_OK
    if not jobs:
        OUT.say("no jobs" + (f" {' or '.join(args.state)}" if args.state else ""))
        return EXIT_OK
    if not OUT.quiet:
        print(f"{'JOB':32}  {'STATE':9}  {'PRIORITY':8}  {'CREATED':19}  TITLE")
    for j in jobs:
        title = j.title if len(j.title) <= 40 else j.title[:39] + "…"
        print(f"{j.id:32}  {j.state.value:9}  {j.priority.value:8}  {_when(j.created_at)}  {title}")
    if cursor:
        OUT.say(f"more: clipline list --cursor {cursor}")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with _api_client() as api:
        try:
            view = api.cancel(args.job_id)
        except ApiError as err:
            if err.status != 409:
                raise
            view = api.get(args.job_id)
            if args.json:
                _emit(view.model_dump(mode="json"))
            OUT.error(f"job {args.job_id} had already {view.state.value}; nothing was cancelled")
            return EXIT_FAILED
    if args.json:
        _emit(view.model_dump(mode="json"))
    else:
        OUT.say(f"job {view.id} cancelled")
    return EXIT_OK


# ---------------------------------------------------------------------------
# logs
# ---------------------------------------------------------------------------
#: ``clipline logs NAME`` -> the local stack's log file ``<NAME>.log``.
LOG_FILES = {
    "worker": "worker",
    "daemon": "gpu-daemon",
    "api": "api",
    "callbacks": "callbacks",
    "supervisor": "supervisor",
}


def _log_dir(settings: Settings) -> Path:
    from clipline.stack import read_state

    state = read_state(settings)
    if state is not None and state.get("logs"):
        return Path(state["logs"])
    return Path(settings.state_dir) / settings.deployment / "logs"


def _last_lines(path: Path, n: int) -> tuple[list[str], int]:
    """The last ``n`` lines of ``path`` and the size read up to."""
    with open(path, "rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        if n <= 0:
            return [], end
        pos, data = end, b""
        while pos > 0 and data.count(b"\n") <= n:
            step = min(1 << 16, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
    lines = data.decode(errors="replace").splitlines()
    return lines[-n:], end


def cmd_logs(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    log_dir = _log_dir(settings)
    names = [args.name] if args.name else list(LOG_FILES)
    files = {n: log_dir / f"{LOG_FILES[n]}.log" for n in names}
    present = {n: f for n, f in files.items() if f.is_file()}
    if not present and not args.follow:
        what = f"no {args.name} log" if args.name else "no logs"
        raise Unavailable(
            f"{what} for deployment {settings.deployment!r} in {log_dir}: "
            "no stack has run here (start one: `clipline up`)"
        )
    many = len(names) > 1
    sizes: dict[str, int] = {}
    for n, f in present.items():
        lines, sizes[n] = _last_lines(f, args.lines)
        if many and lines:
            print(f"==> {n} ({f}) <==")
        for line in lines:
            print(line)
    sys.stdout.flush()
    if not args.follow:
        return EXIT_OK
    partial = dict.fromkeys(names, b"")
    try:
        with _sigterm_raises():
            while True:
                for n, f in files.items():
                    try:
                        size = f.stat().st_size
                    except FileNotFoundError:
                        continue
                    pos = sizes.get(n, 0)
                    if size < pos:  # truncated or replaced: from its start
                        pos = 0
                    if size == pos:
                        continue
                    with open(f, "rb") as fh:
                        fh.seek(pos)
                        data = partial[n] + fh.read(size - pos)
                    sizes[n] = size
                    *complete, partial[n] = data.split(b"\n")
                    for raw in complete:
                        line = raw.decode(errors="replace")
                        print(f"{n}: {line}" if many else line)
                sys.stdout.flush()
                time.sleep(0.25)
    except (KeyboardInterrupt, _Terminated):
        return EXIT_INTERRUPTED


# ---------------------------------------------------------------------------
# services
# ---------------------------------------------------------------------------
def cmd_gpu_daemon(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
    from gpu_service.daemon import main as daemon_main

    return daemon_main()


def cmd_worker(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    from workers import decoders
    from workers.app import worker_argv

    # A decode backend that cannot run on this node stops the worker here
    # (decoder_unavailable); the pool processes get the backend `auto` resolved to.
    os.environ[f"{ENV_PREFIX}DECODE_BACKEND"] = decoders.resolve(settings)

    argv = worker_argv(
        settings,
        args.concurrency or settings.worker_concurrency,
        f"{settings.deployment}-{settings.node_name}@%h",
        "--loglevel",
        args.loglevel,
    )
    os.execvp(sys.executable, [sys.executable, "-m", "celery", *argv])


def cmd_callback_worker(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    from workers.app import callback_worker_argv

    if args.concurrency:
        settings = settings.replace(callback_concurrency=args.concurrency)
    argv = callback_worker_argv(
        settings,
        f"{settings.deployment}-callbacks-{settings.node_name}@%h",
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
DESCRIPTION = """\
clipline turns product videos into short highlight clips: the window of a video that
best shows the product, cut at the source frame rate with its audio.

One job, start to finish (a temporary local stack unless one is up):
  clipline highlight VIDEO --image PRODUCT.jpg [--out DIR]

A local stack in the background, and jobs through its HTTP API:
  clipline up / status / logs / down
  clipline submit VIDEO --image PRODUCT.jpg [--wait]; clipline job|wait|cancel JOB_ID
  clipline list [--state STATE]

The API of a cluster instead: set CLIPLINE_API_URL and CLIPLINE_API_KEY."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clipline")
    except PackageNotFoundError:
        return "unknown"


def _global_options(p: argparse.ArgumentParser, defaults: bool) -> None:
    """--quiet/--verbose/--no-color, accepted before or after the command name.

    On the command's parser they default to SUPPRESS, so they never undo one given
    before the command.
    """
    extra: dict[str, Any] = {} if defaults else {"default": argparse.SUPPRESS}
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only results and errors: no progress, no notes",
        **extra,
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print details and debug logs on stderr",
        **extra,
    )
    p.add_argument(
        "--no-color",
        action="store_true",
        help="no colours (also when NO_COLOR is set)",
        **extra,
    )


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", help="video file path or http(s) URL")
    p.add_argument(
        "--image",
        action="append",
        required=True,
        metavar="IMAGE",
        help="product image path or URL (repeatable: a product shown in any one is found)",
    )
    p.add_argument("--title", default="", help="product title (for the caption)")
    p.add_argument("--description", default="", help="product description (for the caption)")
    p.add_argument(
        "--duration",
        type=_finite_float,
        default=5.0,
        metavar="SECONDS",
        help="highlight length in seconds (default 5)",
    )
    p.add_argument(
        "--aspect",
        default="source",
        metavar="{9:16,1:1,4:5,source}",
        help="the clip's shape: a vertical or square crop that keeps the product in "
        "frame, or the source's own (default source)",
    )
    p.add_argument(
        "--priority",
        default=constants.DEFAULT_PRIORITY.value,
        choices=[c.value for c in constants.PriorityClass],
        help=f"queue priority class (default {constants.DEFAULT_PRIORITY.value})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object, no progress")


def _add_wait_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timeout",
        type=_finite_float,
        default=900.0,
        metavar="SECONDS",
        help="give up waiting after this long (exit 1; the job keeps running; default 900)",
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="download the clip into DIR as <job id>.mp4"
    )


def build_parser(bench: str | None = None) -> argparse.ArgumentParser:
    """The parser; a benchmark's own options are loaded only when it is the one named."""
    parser = argparse.ArgumentParser(
        prog="clipline",
        description=DESCRIPTION,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"clipline {_version()}")
    _global_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func: Any, service: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=help[0].upper() + help[1:] + ".",
            epilog=None if service else EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _global_options(p, defaults=False)
        p.set_defaults(func=func)
        return p

    p = command("highlight", "make a highlight clip of a product video", cmd_highlight)
    _add_job_args(p)
    p.add_argument(
        "--out",
        default="highlights",
        metavar="DIR",
        help="write <job id>.mp4 and <job id>.json here (default ./highlights)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="worker processes of a temporary stack (default CLIPLINE_WORKER_CONCURRENCY)",
    )

    p = command("up", "start the local stack in the background", cmd_up)
    p.add_argument("--workers", type=int, default=2, metavar="N", help="worker processes (2)")
    p.add_argument(
        "--allow-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="also accept local files from DIR (repeatable; default: the current directory)",
    )
    p.add_argument(
        "--timeout",
        type=_finite_float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for the stack to be ready (default 120)",
    )
    p = command("status", "show the local stack (exit 3 when none is up)", cmd_status)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = command("down", "stop the local stack", cmd_down)
    p.add_argument(
        "--timeout",
        type=_finite_float,
        default=60.0,
        metavar="SECONDS",
        help="how long running jobs get to finish (default 60)",
    )
    p = command("logs", "show the local stack's logs", cmd_logs)
    p.add_argument(
        "name",
        nargs="?",
        choices=list(LOG_FILES),
        metavar="{worker,daemon,api,callbacks}",
        help="one process's log (also: supervisor); default: all of them",
    )
    p.add_argument(
        "-n",
        "--lines",
        type=int,
        default=20,
        metavar="N",
        help="the last N lines of each (default 20)",
    )
    p.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C"
    )

    p = command(
        "submit", "enqueue a job through the API (the running stack's, or remote)", cmd_submit
    )
    _add_job_args(p)
    p.add_argument(
        "--idempotency-key",
        default=None,
        metavar="KEY",
        help="retrying with the same key and request returns the same job",
    )
    p.add_argument(
        "--callback-url", default=None, metavar="URL", help="URL to POST the signed outcome to"
    )
    p.add_argument(
        "--wait", action="store_true", help="wait for the job, showing its progress, as `wait`"
    )
    _add_wait_args(p)
    p = command("job", "show a job (JSON)", cmd_job)
    p.add_argument("job_id", metavar="JOB_ID", help="the job's id")
    p = command("wait", "wait for a job to finish, showing its progress", cmd_wait)
    p.add_argument("job_id", metavar="JOB_ID", help="the job's id")
    _add_wait_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object, no progress")
    p = command("list", "list jobs, newest first", cmd_list)
    p.add_argument(
        "--state",
        choices=[s.value for s in _job_states()],
        action="append",
        default=None,
        help="only jobs in this state (repeatable: any of them)",
    )
    p.add_argument("--limit", type=int, default=20, metavar="N", help="at most N jobs (default 20)")
    p.add_argument(
        "--cursor", default=None, help="continue a listing (the cursor a previous one printed)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = command("cancel", "cancel a job that has not finished", cmd_cancel)
    p.add_argument("job_id", metavar="JOB_ID", help="the job's id")
    p.add_argument("--json", action="store_true", help="print the job as JSON")

    command(
        "gpu-daemon",
        "run the GPU inference daemon (service entrypoint)",
        cmd_gpu_daemon,
        service=True,
    )
    p = command(
        "worker", "run the Celery CPU workers (service entrypoint)", cmd_worker, service=True
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=0,
        metavar="N",
        help="worker processes (default CLIPLINE_WORKER_CONCURRENCY)",
    )
    p.add_argument("--loglevel", default="INFO", help="Celery log level (default INFO)")
    p = command(
        "callback-worker",
        "run the completion-callback delivery worker, threads (service entrypoint)",
        cmd_callback_worker,
        service=True,
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=0,
        metavar="N",
        help="threads (default CLIPLINE_CALLBACK_CONCURRENCY)",
    )
    p.add_argument("--loglevel", default="INFO", help="Celery log level (default INFO)")
    p = command("api", "run the HTTP job API (service entrypoint)", cmd_api, service=True)
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    p.add_argument(
        "--port",
        type=int,
        default=constants.DEFAULT_API_PORT,
        help=f"port (default {constants.DEFAULT_API_PORT})",
    )

    p = command("bench", "run a benchmark (prints a table, writes JSON)", None)
    bench_sub = p.add_subparsers(dest="bench_name", required=True, metavar="NAME")
    for name, module_name in BENCHMARKS.items():
        bp = bench_sub.add_parser(name, help=f"the {name} benchmark")
        bp.set_defaults(func=cmd_bench)
        if name == bench:
            importlib.import_module(module_name).add_arguments(bp)
    return parser


def _job_states() -> list[Any]:
    from clipline_core.job import JobState

    return list(JobState)


def _configure(args: argparse.Namespace) -> None:
    """Apply the global options: :data:`OUT`, and logging with ``--verbose``."""
    global OUT
    OUT = Output(
        quiet=getattr(args, "quiet", False),
        verbose=getattr(args, "verbose", False),
        color=not getattr(args, "no_color", False),
    )
    if OUT.verbose:
        import logging

        logging.basicConfig(
            level=logging.DEBUG,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        for noisy in ("httpx", "httpcore", "urllib3", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.INFO)


def _bench_named(argv: Sequence[str]) -> str | None:
    """The benchmark ``argv`` names (``clipline [options] bench NAME ...``), if any."""
    for i, word in enumerate(argv):
        if not word.startswith("-"):
            return argv[i + 1] if word == "bench" and i + 1 < len(argv) else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    named = _bench_named(argv)
    parser = build_parser(named if named in BENCHMARKS else None)
    args = parser.parse_args(argv)  # a usage error exits 2 here
    _configure(args)
    try:
        return int(args.func(args))
    except (KeyboardInterrupt, _Terminated) as exc:
        OUT.error("the command was stopped", label="interrupted")
        return exit_code(exc)
    except Exception as exc:
        code = exit_code(exc)
        OUT.error(describe(exc))
        expected = (CliError, ApiError, ClipError)
        if OUT.verbose or (code == Exit.FAILED and not isinstance(exc, expected)):
            import traceback

            traceback.print_exc()
        return code


if __name__ == "__main__":
    sys.exit(main())
