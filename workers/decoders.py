"""Decode backends: which library turns a video into its kept frames (``decode_backend``).

Every backend hands the sink what :func:`workers.decode.sample_video` (``opencv``, the
default and the reference) hands it. The container is probed with OpenCV by all of them
(:func:`workers.decode.probe_video`: frame rate, rotation, the limits), so they keep
the same frames (:func:`workers.decode.keep_index` of the same step); each kept frame
is written letterboxed into the sink's place for its ordinal with the geometry of
:func:`workers.preprocess.into`; and the frames read become the same
:class:`~workers.decode.VideoInfo` (``decoder`` names the backend that decoded).

``opencv``
    sparse grab/retrieve and parallel segments (:mod:`workers.decode`).
``pyav``
    FFmpeg through PyAV, on the CPU: one sequential reader with FFmpeg's frame and
    slice threads (``thread_type="AUTO"``; ``decode_threads`` of them, default FFmpeg's
    one per core). Every frame is decoded; only kept frames are converted to BGR
    (swscale, as OpenCV's FFmpeg backend does) and letterboxed by ``into``. It is the
    CPU twin of ``nvdec``: the same loop (:func:`_read_sequential`), testable anywhere.
``nvdec``
    the node's GPU through PyNvVideoCodec: NVDEC decodes every frame into device memory
    (NV12, the decoder's native surface); only kept frames are converted to RGB (the
    stream's matrix and range, as swscale converts them; chroma repeated over its 2x2
    block: :func:`yuv_to_rgb`) and letterboxed on the device with torch
    (:func:`letterbox_tensor`: 2x2 box halvings, then one bilinear step, into
    :func:`workers.preprocess.content_rect`). The slot handoff still costs one
    device-to-host copy per kept frame (``H x W x 3`` bytes, 243 KiB at 288 px): the
    arena is host shared memory, written by the workers and read by the GPU daemon
    (another process, with its own CUDA context), so every frame has to land in it.
    What the GPU takes off the CPU is decoding and resizing full-resolution frames. The
    worker decodes on GPU ``gpu_index`` (modulo the GPUs it sees; each worker process
    holds a CUDA context of its own).
``auto``
    ``nvdec`` where CUDA, PyNvVideoCodec and PyAV (which reads the stream's start time
    and colours for it) are available, else ``opencv``.

**A backend that cannot run on the node fails fast**: ``clipline worker`` calls
:func:`resolve` before it starts Celery, so a worker whose ``decode_backend`` names a
backend the node cannot run does not start (``decoder_unavailable``); ``auto`` never
refuses, and the pool processes get the backend it resolved to. A worker started
otherwise (the local stack) fails its jobs with the same code.

**Per video**: a video the backend cannot read (a codec NVDEC lacks, such as Cinepak;
an error of the decoding library) is read again with OpenCV, after
:meth:`~workers.decode.FrameSink.restart` when frames were already published (logged;
``VideoInfo.fallback`` says why). A stream that breaks mid-file keeps, with ``pyav``
as with OpenCV, the frames decoded before the break.

**Timestamps** (``pyav``, ``nvdec``): the known presentation times sorted into display
order, less the stream's start time. Sorting gives streams whose frames carry
decode-order stamps (AVIs with packed B-frames) the times OpenCV reports for them;
frames without a stamp and streams whose stamps do not increase are then handled by
:func:`workers.decode._times`, as for OpenCV.

Imports clipline_core, :mod:`workers.decode` and :mod:`workers.preprocess`; ``av``,
``torch`` and ``PyNvVideoCodec`` are imported only by the backends that use them,
never when this module is imported. Must not import clipline or bench.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib.util
import logging
import math
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np

from clipline_core import constants
from clipline_core.errors import ClipError, ErrorCode
from clipline_core.settings import Settings
from workers import decode
from workers.decode import FrameSink, VideoInfo
from workers.preprocess import content_rect, into

log = logging.getLogger("clipline.worker")

OPENCV: Final = "opencv"
PYAV: Final = "pyav"
NVDEC: Final = "nvdec"
AUTO: Final = "auto"
BACKENDS: Final = constants.DECODE_BACKENDS
CHOICES: Final = constants.DECODE_BACKEND_CHOICES

#: OpenCV's rotation (clockwise degrees, ``CAP_PROP_ORIENTATION_META``) as cv2.rotate codes.
_CV_ROTATE: Final = {
    90: cv2.ROTATE_90_CLOCKWISE,
    180: cv2.ROTATE_180,
    270: cv2.ROTATE_90_COUNTERCLOCKWISE,
}
#: (Kr, Kb) of FFmpeg's AVColorSpace values other than BT.601 (its default, and swscale's).
_KR_KB: Final = {1: (0.2126, 0.0722), 9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}
_BT601: Final = (0.299, 0.114)


# ---------------------------------------------------------------------------
# Choosing the backend.
# ---------------------------------------------------------------------------
def check_settings(settings: Settings) -> None:
    """Refuse an unknown ``decode_backend`` (a clear error at start, not per job)."""
    if settings.decode_backend not in CHOICES:
        raise ValueError(
            f"CLIPLINE_DECODE_BACKEND={settings.decode_backend!r}: use one of {', '.join(CHOICES)}"
        )


@functools.cache
def unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot run in this process; None when it can (cached)."""
    if name == OPENCV:
        return None
    if name not in BACKENDS:
        return f"unknown decode backend {name!r}"
    if importlib.util.find_spec("av") is None:
        return f"PyAV is not installed (pip install 'clipline[{name}]')"
    if name == NVDEC:
        if importlib.util.find_spec("PyNvVideoCodec") is None:
            return "PyNvVideoCodec is not installed (pip install 'clipline[nvdec]')"
        import torch

        if not torch.cuda.is_available():
            return "CUDA is not available"
    try:
        importlib.import_module("PyNvVideoCodec" if name == NVDEC else "av")
    except Exception as exc:  # e.g. no NVIDIA video codec libraries in the container
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"{'PyNvVideoCodec' if name == NVDEC else 'PyAV'} does not load: {first}"
    return None


def resolve(settings: Settings) -> str:
    """The backend ``settings.decode_backend`` means on this node.

    ``auto``: ``nvdec`` when it can run here, else ``opencv``. A backend named
    explicitly that cannot run raises ``decoder_unavailable``; an unknown name,
    ValueError.
    """
    check_settings(settings)
    choice = settings.decode_backend
    if choice == AUTO:
        return NVDEC if unavailable(NVDEC) is None else OPENCV
    why = unavailable(choice)
    if why is not None:
        raise ClipError(
            ErrorCode.DECODER_UNAVAILABLE,
            f"decode_backend={choice} cannot run on this node: {why}",
        )
    return choice


def sample_video(
    path: Path, settings: Settings, sink: FrameSink, *, backend: str | None = None
) -> VideoInfo:
    """Decode ``path`` with ``backend`` (default: :func:`resolve` of ``settings``) and
    write the frames kept at ``settings.sample_fps`` into ``sink``."""
    name = backend or resolve(settings)
    if name == OPENCV:
        return decode.sample_video(path, settings, sink)
    if name not in _READERS:
        raise ValueError(f"unknown decode backend {name!r}: use one of {', '.join(BACKENDS)}")
    try:
        return _READERS[name](path, settings, sink)
    except ClipError:
        raise  # the video's own fault (a limit, undecodable): OpenCV would say the same
    except Exception as exc:
        reason = f"{name} could not read the video ({type(exc).__name__}: {exc})"
        log.warning("%s: %s; reading it with OpenCV", path.name, reason)
        if sink.published_from(0):
            sink.restart()
        else:
            sink.truncate(0)
        info = decode.sample_video(path, settings, sink)
        info.fallback = reason if info.fallback is None else f"{reason}; {info.fallback}"
        return info


# ---------------------------------------------------------------------------
# The sequential reader both pyav and nvdec run.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StreamClock:
    """What the container says of the video stream beyond OpenCV's probe."""

    time_base: Fraction | None  # of the frames' presentation stamps (None: no stamps)
    start_s: float  # the stream's start time (timestamps count from it)
    width: int  # decoded picture, before rotation
    height: int
    colorspace: int  # FFmpeg's AVColorSpace (1: BT.709, 9/10: BT.2020, else BT.601)
    full_range: bool  # JPEG (full) range, else MPEG (limited) range


def stream_clock(vstream: Any) -> StreamClock:
    """The :class:`StreamClock` of a PyAV video stream (its header, nothing decoded)."""
    cc = vstream.codec_context
    tb = vstream.time_base
    start = vstream.start_time
    return StreamClock(
        time_base=Fraction(tb) if tb else None,
        start_s=float(start * tb) if start is not None and tb else 0.0,
        width=int(cc.width),
        height=int(cc.height),
        colorspace=int(cc.colorspace or 0),
        full_range=int(cc.color_range or 0) == 2,
    )


def display_times(
    stamps: list[int | None], time_base: Fraction | None, start_s: float
) -> list[float]:
    """Seconds of each decoded frame: the known stamps sorted, less the start (NaN: none)."""
    if time_base is None:
        return [math.nan] * len(stamps)
    known = iter(sorted(s for s in stamps if s is not None))
    return [math.nan if s is None else float(next(known) * time_base) - start_s for s in stamps]


def _probe(path: Path, settings: Settings) -> decode.Probe:
    """OpenCV's view of the container, checked against the limits (as the reference)."""
    cap = decode.open_capture(path)
    try:
        return decode.probe_video(cap, settings)
    finally:
        cap.release()


def _read_sequential(
    frames: Iterator[tuple[int | None, Any]],
    convert: Callable[[Any, np.ndarray], None],
    p: decode.Probe,
    clock: StreamClock,
    time_base: Fraction | None,
    settings: Settings,
    sink: FrameSink,
) -> VideoInfo:
    """Count every decoded ``(stamp, frame)``; ``convert`` only the kept ones into the sink."""
    step = decode.sample_step(p.fps, settings.sample_fps)
    limits = decode._Limits(settings)
    reader = decode._Reader(None, 0, None, 0)
    stamps: list[int | None] = []
    next_keep = decode.keep_index(0, step)
    origin: float | None = None
    for stamp, frame in frames:
        index = reader.index
        t = math.nan
        if stamp is not None and time_base is not None:
            t = float(stamp * time_base) - clock.start_s
        if origin is None:
            origin = t if math.isfinite(t) else 0.0
        limits.check(index, t if math.isfinite(t) else origin + index / p.fps, origin)
        stamps.append(stamp)
        if index == next_keep:
            convert(frame, sink.buffer(reader.ordinal))
            sink.commit(reader.ordinal)
            reader.kept.append(decode._Kept(reader.ordinal, index, t))
            reader.ordinal += 1
            next_keep = decode.keep_index(reader.ordinal, step)
        reader.index += 1
    reader.times = display_times(stamps, time_base, clock.start_s)
    return decode._finish(p, sink, [reader], step, settings, "sequential", 1, None)


# ---------------------------------------------------------------------------
# pyav: FFmpeg on the CPU.
# ---------------------------------------------------------------------------
def _pyav_frames(container: Any, vstream: Any) -> Iterator[tuple[int | None, Any]]:
    import av

    try:
        for packet in container.demux(vstream):
            for frame in packet.decode():  # the last, empty packet drains the decoder
                yield frame.pts, frame
    except av.FFmpegError as exc:  # a broken stream ends here, keeping what came before
        log.info("decoding stopped: %s", exc)


def _read_pyav(path: Path, settings: Settings, sink: FrameSink) -> VideoInfo:
    import av

    p = _probe(path, settings)
    rotate = _CV_ROTATE.get(p.rotation)
    with av.open(str(path)) as container:
        vstream = container.streams.video[0]
        vstream.codec_context.thread_type = "AUTO"
        if settings.decode_threads > 0:
            vstream.codec_context.thread_count = settings.decode_threads
        clock = stream_clock(vstream)

        def convert(frame: Any, dst: np.ndarray) -> None:
            bgr = frame.to_ndarray(format="bgr24")
            into(bgr if rotate is None else cv2.rotate(bgr, rotate), dst)

        info = _read_sequential(
            _pyav_frames(container, vstream), convert, p, clock, clock.time_base, settings, sink
        )
    info.decoder = PYAV
    return info


# ---------------------------------------------------------------------------
# nvdec: the GPU (torch for the pixels, PyNvVideoCodec for the decoding).
# ---------------------------------------------------------------------------
def yuv_to_rgb(
    surface: Any, width: int, height: int, colorspace: int = 2, full_range: bool = False
) -> Any:
    """A decoded YUV surface (a uint8 torch tensor on any device) as ``[h, w, 3]`` RGB.

    ``surface`` is NV12 (``h + ceil(h / 2)`` rows of ``w``: luma, then interleaved
    chroma at half resolution, repeated over its 2x2 block) or planar 4:4:4 (``3h``
    rows), flat or with a trailing channel of 1, 8-bit or 16-bit (P016: the high byte
    is kept). The matrix is the stream's (BT.709, BT.2020, else BT.601) in its range,
    as swscale (OpenCV's and PyAV's conversion) applies them.
    """
    import torch

    if surface.dim() == 3 and surface.shape[-1] == 1:
        surface = surface[..., 0]
    if surface.dtype != torch.uint8:
        surface = (surface.to(torch.int32) >> 8).to(torch.uint8)
    if surface.dim() == 1 and surface.numel() % width == 0:
        surface = surface.reshape(-1, width)
    rows = int(surface.shape[0])
    y = surface[:height, :width].float()
    if rows == 3 * height:
        u = surface[height : 2 * height, :width].float()
        v = surface[2 * height :, :width].float()
    elif rows == height + (height + 1) // 2 and surface.shape[1] >= width:
        ch, cw = (height + 1) // 2, (width + 1) // 2
        uv = surface[height:, : 2 * cw].reshape(ch, cw, 2).float()
        u = uv[..., 0].repeat_interleave(2, 0).repeat_interleave(2, 1)[:height, :width]
        v = uv[..., 1].repeat_interleave(2, 0).repeat_interleave(2, 1)[:height, :width]
    else:
        raise ValueError(
            f"unexpected decoded surface {tuple(surface.shape)} {surface.dtype} "
            f"for a {width}x{height} picture"
        )
    kr, kb = _KR_KB.get(colorspace, _BT601)
    kg = 1.0 - kr - kb
    if full_range:
        luma, chroma = y, 1.0
    else:
        luma, chroma = (y - 16.0) * (255.0 / 219.0), 255.0 / 224.0
    u = (u - 128.0) * chroma
    v = (v - 128.0) * chroma
    r = luma + (2.0 * (1.0 - kr)) * v
    g = luma - (2.0 * (1.0 - kb) * kb / kg) * u - (2.0 * (1.0 - kr) * kr / kg) * v
    b = luma + (2.0 * (1.0 - kb)) * u
    return torch.stack((r, g, b), dim=-1).round_().clamp_(0, 255).to(torch.uint8)


def letterbox_tensor(rgb: Any, height: int, width: int, rotation: int = 0) -> Any:
    """``[h, w, 3]`` uint8 RGB (any device) letterboxed into ``[height, width, 3]`` as
    :func:`workers.preprocess.into` does it: rotated clockwise by ``rotation`` degrees,
    scaled into :func:`~workers.preprocess.content_rect` by exact 2x2 box halvings
    (rounded to uint8 like OpenCV's ``INTER_AREA``) and one bilinear step, picture
    pixels at least 1, bars exactly 0."""
    import torch
    import torch.nn.functional as F

    if rotation in _CV_ROTATE:
        rgb = torch.rot90(rgb, k=(360 - rotation) // 90, dims=(0, 1))
    src_h, src_w = int(rgb.shape[0]), int(rgb.shape[1])
    x, y, w, h = content_rect(src_w, src_h, width, height)
    t = rgb.permute(2, 0, 1).unsqueeze(0).float()
    while t.shape[2] >= 2 * h and t.shape[3] >= 2 * w:
        rows, cols = t.shape[2] // 2, t.shape[3] // 2
        t = torch.floor(F.avg_pool2d(t[:, :, : 2 * rows, : 2 * cols], 2) + 0.5)
    if (t.shape[2], t.shape[3]) != (h, w):
        t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    picture = t[0].permute(1, 2, 0).round_().clamp_(1, 255).to(torch.uint8)
    out = torch.zeros((height, width, 3), dtype=torch.uint8, device=rgb.device)
    out[y : y + h, x : x + w] = picture
    return out


def _cuda_context() -> int:
    """The CUDA context current on this thread (torch's primary one), 0 if unknown."""
    try:
        ctx = ctypes.c_void_p()
        if ctypes.CDLL("libcuda.so.1").cuCtxGetCurrent(ctypes.byref(ctx)) == 0:
            return int(ctx.value or 0)
    except (OSError, AttributeError):
        pass
    return 0


#: FFmpeg's AV_NOPTS_VALUE: a frame without a stamp.
_NO_PTS: Final = -(2**63)


def _nvdec_frames(demuxer: Any, decoder: Any) -> Iterator[tuple[int | None, Any]]:
    for packet in demuxer:  # the last, empty packet drains the decoder
        for frame in decoder.Decode(packet):
            pts = frame.getPTS()
            yield (None if pts is None or int(pts) == _NO_PTS else int(pts)), frame


def _read_nvdec(path: Path, settings: Settings, sink: FrameSink) -> VideoInfo:
    import av
    import PyNvVideoCodec as nvc
    import torch

    p = _probe(path, settings)
    with av.open(str(path)) as container:  # the header: start time, size and colours
        clock = stream_clock(container.streams.video[0])
    gpu = settings.gpu_index % max(1, torch.cuda.device_count())
    device = torch.device("cuda", gpu)
    torch.cuda.set_device(device)
    torch.empty(1, device=device)  # torch's context is current: the decoder shares it
    stream = torch.cuda.current_stream(device)
    demuxer = nvc.CreateDemuxer(filename=str(path))
    time_base = clock.time_base
    with contextlib.suppress(AttributeError, ValueError, ZeroDivisionError):
        # the demuxer's own unit of the stamps it hands the decoder
        time_base = Fraction(int(demuxer.GetTimebaseNum()), int(demuxer.GetTimebaseDen()))
    decoder = nvc.CreateDecoder(
        gpuid=gpu,
        codec=demuxer.GetNvCodecId(),
        cudacontext=_cuda_context(),
        cudastream=stream.cuda_stream,
        usedevicememory=True,
    )

    def convert(frame: Any, dst: np.ndarray) -> None:
        rgb = yuv_to_rgb(
            torch.from_dlpack(frame), clock.width, clock.height, clock.colorspace, clock.full_range
        )
        out = letterbox_tensor(rgb, dst.shape[0], dst.shape[1], p.rotation)
        torch.from_numpy(dst).copy_(out)  # the one device-to-host copy, into the slot

    with torch.inference_mode():
        info = _read_sequential(
            _nvdec_frames(demuxer, decoder), convert, p, clock, time_base, settings, sink
        )
    info.decoder = NVDEC
    return info


_READERS: Final[dict[str, Callable[[Path, Settings, FrameSink], VideoInfo]]] = {
    PYAV: _read_pyav,
    NVDEC: _read_nvdec,
}
