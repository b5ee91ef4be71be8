"""Vertical and square clips: a crop path over the clip that keeps the product in frame.

:func:`plan` turns where the product was seen (its boxes at the job's sampled
timestamps, as picture fractions: :func:`sightings` reads them from the localizer's
``highlight.product`` summary, :func:`workers.localize.summary`) into a
:class:`CropPath`: the crop window's position at every output frame of the clip.

* **Window**: the largest window of the aspect inside the source picture
  (:func:`crop_size`, even sides). The clip is that window scaled to the aspect's
  standard size (:data:`STANDARD_SIZES`) when the window holds that many pixels, else to
  the largest even size of the aspect not above the window's own (:func:`output_size`):
  never upscaled, and the path says so (``standard``, ``note``).
* **Aim**: at each sampled frame with a box, the positions that keep the whole box
  (plus a margin, when there is room) inside the window, narrowed to a dead zone
  around the position that centres it; a box larger than the window is centred. The
  camera moves only when the box leaves that corridor: a product that barely moves
  gets a still camera.
* **Gaps**: sampled frames without a box between two boxes at most ``hold_s`` apart
  get the box interpolated between them (a missed verification of a moving product);
  otherwise, up to ``hold_s`` after the last box, they keep it (the product went out
  of sight or was occluded). Longer gaps follow the attention
  centres when given (a saliency map's peak, per sampled frame), else hold still. A
  clip where the product is never seen follows the attention, else is a still centre
  crop.
* **Smoothing**: the corridor is walked forwards and backwards (each position the
  nearest to the previous one inside its corridor; their mean anticipates as much as
  it lags), interpolated to every output frame at the source frame times, then the
  velocity is limited (forwards and backwards, averaged) and the acceleration bounded
  by moving averages just wide enough: ``|dx| <= max_speed`` and ``|d2x| <= max_accel``
  per frame hold exactly (:class:`ReframeConfig`, in fractions of the source's longer
  side; :attr:`CropPath.max_speed_px` and :attr:`CropPath.max_accel_px` in pixels).
* **Keyframes**: :meth:`CropPath.keyframes` keeps the frames a piecewise-linear path
  needs to stay within ``tolerance_px`` of the smooth one: what the renderer's crop
  expressions and the job's result (``highlight.reframe``) carry.

Pure NumPy: must not import OpenCV, torch, the daemon or the rest of the worker.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

#: the aspects a clip may be cut to, as (width, height) ratios
ASPECTS: dict[str, tuple[int, int]] = {"9:16": (9, 16), "1:1": (1, 1), "4:5": (4, 5)}
#: the size a clip of each aspect gets when its source allows (px)
STANDARD_SIZES: dict[str, tuple[int, int]] = {
    "9:16": (1080, 1920),
    "1:1": (1080, 1080),
    "4:5": (1080, 1350),
}
#: the most keyframes a path is described with (see :meth:`CropPath.keyframes`)
MAX_KEYFRAMES = 240
#: what a path follows
FOLLOW_PRODUCT, FOLLOW_ATTENTION, FOLLOW_CENTRE = "product", "attention", "centre"

Box = tuple[float, float, float, float]  # x, y, w, h as fractions of the picture
Times = Sequence[float] | np.ndarray  # seconds


@dataclasses.dataclass(frozen=True)
class ReframeConfig:
    """Bounds of a crop path; speeds in fractions of the source's longer side per frame."""

    max_speed: float = 0.02  # at most this far per frame (1920 px source: 38 px)
    max_accel: float = 0.001  # velocity change per frame (1920 px source: 1.9 px)
    dead_zone: float = 0.08  # the product's centre may stray this fraction of the window
    margin: float = 0.04  # room kept around the product, a fraction of the window
    hold_s: float = 1.0  # a gap in the sightings up to this long is bridged (see above)
    tolerance_px: float = 0.25  # keyframes: the most the linear path strays from the smooth
    outlier_area: float = 2.5  # a sighting this many times off the median area is dropped

    def __post_init__(self) -> None:
        if not (self.max_speed > 0 and math.isfinite(self.max_speed)):
            raise ValueError("max_speed must be a positive number")
        if not (self.max_accel > 0 and math.isfinite(self.max_accel)):
            raise ValueError("max_accel must be a positive number")
        if not (self.outlier_area > 1 and math.isfinite(self.outlier_area)):
            raise ValueError("outlier_area must be a number above 1")
        if not 0 <= self.dead_zone < 0.5:
            raise ValueError("dead_zone must be in [0, 0.5)")
        if not 0 <= self.margin < 0.5:
            raise ValueError("margin must be in [0, 0.5)")
        if not (self.hold_s >= 0 and math.isfinite(self.hold_s)):
            raise ValueError("hold_s must not be negative")
        if not (self.tolerance_px > 0 and math.isfinite(self.tolerance_px)):
            raise ValueError("tolerance_px must be a positive number")


def ratio(aspect: str) -> tuple[int, int]:
    """``(width, height)`` of an aspect other than ``source``."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {', '.join(ASPECTS)}, not {aspect!r}")
    return ASPECTS[aspect]


def crop_size(source: tuple[int, int], aspect: str) -> tuple[int, int]:
    """The largest window of ``aspect`` inside a ``source`` picture, even sides."""
    sw, sh = source
    if sw < 2 or sh < 2:
        raise ValueError(f"the source picture is too small: {sw}x{sh}")
    num, den = ratio(aspect)
    if sw * den > sh * num:  # wider than the aspect: full height
        w, h = sh * num / den, float(sh)
    else:
        w, h = float(sw), sw * den / num
    return max(2, int(w) // 2 * 2), max(2, int(h) // 2 * 2)


def output_size(crop: tuple[int, int], aspect: str) -> tuple[int, int, bool]:
    """The clip's size for a ``crop`` window: ``(width, height, standard)``.

    The aspect's standard size when the window holds that many pixels, else the largest
    even size of exactly the aspect that is not above the window's (never upscaled).
    """
    sw, sh = STANDARD_SIZES[aspect]
    cw, ch = crop
    if cw >= sw and ch >= sh:
        return sw, sh, True
    num, den = ratio(aspect)
    m = min(cw // num, ch // den)
    if (num * m) % 2 or (den * m) % 2:
        m -= 1
    if m < 1:
        return cw, ch, False
    return num * m, den * m, False


def sightings(product: dict[str, Any] | None, timestamps: Sequence[float]) -> list[Box | None]:
    """The product's box at each of ``timestamps`` from a ``highlight.product`` summary.

    The summary lists verified frames (``boxes``: ``{"t", "box"}``, times rounded to
    milliseconds) and, for other frames, where the product's colours are
    (``colour_boxes``, coarser); a verified box wins; every other timestamp gets None.
    """
    ts = np.asarray(timestamps, dtype=np.float64)
    out: list[Box | None] = [None] * len(ts)
    if not product or not len(ts):
        return out
    for item in [*(product.get("colour_boxes") or []), *(product.get("boxes") or [])]:
        i = int(np.argmin(np.abs(ts - float(item["t"]))))
        if abs(ts[i] - float(item["t"])) <= 2e-3:
            x, y, w, h = (float(v) for v in item["box"])
            out[i] = (x, y, w, h)
    return out


@dataclasses.dataclass(frozen=True)
class CropPath:
    """The crop window of every output frame of a clip (source pixels)."""

    aspect: str
    source: tuple[int, int]  # the source picture (px)
    crop: tuple[int, int]  # the window's width and height (source px)
    size: tuple[int, int]  # the clip's picture (px)
    standard: bool  # ``size`` is the aspect's standard size
    follow: str  # product | attention | centre
    times: np.ndarray  # [F] source time of each output frame (s)
    x: np.ndarray  # [F] the window's left edge (float px)
    y: np.ndarray  # [F] its top edge
    max_speed_px: float
    max_accel_px: float
    tolerance_px: float

    def __len__(self) -> int:
        return len(self.x)

    @property
    def note(self) -> str | None:
        """Why the clip is smaller than the aspect's standard size (None when it is not)."""
        if self.standard:
            return None
        sw, sh = STANDARD_SIZES[self.aspect]
        cw, ch = self.crop
        return (
            f"smaller than the standard {sw}x{sh}: the source's {self.aspect} window "
            f"is {cw}x{ch} px"
        )

    def windows(self) -> np.ndarray:
        """``[F, 2]`` whole-pixel left and top edges of each frame's window."""
        cw, ch = self.crop
        sw, sh = self.source
        x = np.clip(np.floor(self.x + 1e-6), 0, sw - cw)
        y = np.clip(np.floor(self.y + 1e-6), 0, sh - ch)
        return np.stack([x, y], axis=1).astype(np.int64)

    def keyframes(self) -> list[int]:
        """Frame indices of a piecewise-linear path within ``tolerance_px`` of this one.

        The first and last frames always; between two keys the window moves linearly.
        A path that needs more than :data:`MAX_KEYFRAMES` keys (one restless over a long
        clip) gets a tolerance doubled until it fits, so the renderer's expressions and
        the job's document stay small.
        """
        tol = self.tolerance_px
        while True:
            keys = self._keyframes(tol)
            if len(keys) <= MAX_KEYFRAMES:
                return keys
            tol *= 2.0

    def _keyframes(self, tol: float) -> list[int]:
        n = len(self.x)
        if n <= 2:
            return list(range(n))
        keep = np.zeros(n, bool)
        keep[0] = keep[-1] = True
        stack = [(0, n - 1)]
        idx = np.arange(n, dtype=np.float64)
        while stack:
            a, b = stack.pop()
            if b - a < 2:
                continue
            u = (idx[a + 1 : b] - a) / (b - a)
            err = np.maximum(
                np.abs(self.x[a + 1 : b] - (self.x[a] + u * (self.x[b] - self.x[a]))),
                np.abs(self.y[a + 1 : b] - (self.y[a] + u * (self.y[b] - self.y[a]))),
            )
            k = int(err.argmax())
            if err[k] > tol:
                mid = a + 1 + k
                keep[mid] = True
                stack += [(a, mid), (mid, b)]
        return [int(i) for i in np.nonzero(keep)[0]]

    def to_dict(self) -> dict[str, Any]:
        """``highlight.reframe``: the window and its keyframes (source time, source px)."""
        cw, ch = self.crop
        keys = self.keyframes()
        return {
            "source": list(self.source),
            "crop": [cw, ch],
            "standard": self.standard,
            "note": self.note,
            "follow": self.follow,
            "path": [
                {
                    "t": round(float(self.times[i]), 3),
                    "x": round(float(self.x[i])),
                    "y": round(float(self.y[i])),
                    "w": cw,
                    "h": ch,
                }
                for i in keys
            ],
        }


def plan(
    timestamps: Times,
    boxes: Sequence[Box | None],
    frame_times: Times,
    source: tuple[int, int],
    aspect: str,
    config: ReframeConfig | None = None,
    attention: Sequence[tuple[float, float] | None] | None = None,
) -> CropPath:
    """The crop path of a clip (see the module docstring).

    ``timestamps``: the sampled frames' times (s) within the clip; ``boxes``: the
    product's box at each (fractions of the picture) or None where it was not
    verified; ``frame_times``: the source time of every output frame; ``source``: the
    picture's width and height (px); ``attention``: optional attention centres
    (fractions) per sampled frame, followed where the product is not.
    """
    cfg = config or ReframeConfig()
    ts = np.asarray(timestamps, dtype=np.float64)
    if len(boxes) != len(ts):
        raise ValueError(f"{len(ts)} timestamps but {len(boxes)} boxes")
    if attention is not None and len(attention) != len(ts):
        raise ValueError(f"{len(ts)} timestamps but {len(attention)} attention centres")
    ft = np.asarray(frame_times, dtype=np.float64)
    if len(ft) == 0:
        raise ValueError("a crop path needs at least one output frame")
    if len(ts) and np.any(np.diff(ts) < 0):
        raise ValueError("timestamps must not decrease")
    sw, sh = source
    cw, ch = crop_size(source, aspect)
    ow, oh, standard = output_size((cw, ch), aspect)
    long_side = float(max(sw, sh))
    vmax, amax = cfg.max_speed * long_side, cfg.max_accel * long_side

    held = _held(ts, _consistent(boxes, cfg.outlier_area), cfg.hold_s)
    seen = any(b is not None for b in held)
    looks = attention is not None and any(a is not None for a in attention)
    follow = FOLLOW_PRODUCT if seen else FOLLOW_ATTENTION if looks else FOLLOW_CENTRE
    axes = []
    for axis, (size, win) in enumerate(((sw, cw), (sh, ch))):
        lo, hi = _corridor(held, attention, axis, size, win, cfg)
        knots = _walk(lo, hi, (size - win) / 2.0)
        middle = np.full(len(ft), (size - win) / 2.0)
        target = np.interp(ft, ts, knots) if len(ts) else middle
        target = np.clip(target, 0.0, float(size - win))
        axes.append(_bounded(target, vmax, amax))
    return CropPath(
        aspect=aspect,
        source=(int(sw), int(sh)),
        crop=(cw, ch),
        size=(ow, oh),
        standard=standard,
        follow=follow,
        times=ft,
        x=axes[0],
        y=axes[1],
        max_speed_px=vmax,
        max_accel_px=amax,
        tolerance_px=cfg.tolerance_px,
    )


def centre_path(frame_times: Times, source: tuple[int, int], aspect: str) -> CropPath:
    """A still window in the middle of the picture (what a plain centre crop shows)."""
    return plan([], [], frame_times, source, aspect)


def _consistent(boxes: Sequence[Box | None], factor: float) -> list[Box | None]:
    """``boxes`` without those whose area is ``factor`` times off the clip's median.

    One product in one clip keeps roughly its size; a sighting many times larger or
    smaller is a wrong match (a homography that verified on a look-alike, a colour box
    on a patch of the same colour), and following it would throw the window off.
    """
    areas = [b[2] * b[3] for b in boxes if b is not None and b[2] > 0 and b[3] > 0]
    if len(areas) < 3:
        return list(boxes)
    median = float(np.median(areas))
    return [
        b if b is not None and median / factor <= b[2] * b[3] <= median * factor else None
        for b in boxes
    ]


def _held(ts: np.ndarray, boxes: Sequence[Box | None], hold_s: float) -> list[Box | None]:
    """``boxes`` with gaps up to ``hold_s`` seconds bridged.

    A gap with a box on either side is interpolated between them (a product moving
    through a missed sighting keeps moving); one at the end keeps the last box for its
    first ``hold_s`` seconds (the product went out of sight: hold where it was).
    """
    good = [
        b if b is not None and all(math.isfinite(v) for v in b) and b[2] > 0 and b[3] > 0 else None
        for b in boxes
    ]
    out: list[Box | None] = list(good)
    t = ts.tolist()
    seen = [k for k, b in enumerate(good) if b is not None]
    for a, z in itertools.pairwise(seen):  # gaps between two boxes: interpolated
        first, last = good[a], good[z]
        assert first is not None and last is not None
        if z - a < 2 or t[z] - t[a] > hold_s + 1e-9:
            continue
        span = t[z] - t[a]
        for i in range(a + 1, z):
            u = (t[i] - t[a]) / span if span > 0 else 0.0
            x, y, w, h = (p + u * (q - p) for p, q in zip(first, last, strict=True))
            out[i] = (x, y, w, h)
    held = -1  # the rest of the gaps: the last box held for ``hold_s``
    for k, b in enumerate(good):
        if b is not None:
            held = k
        elif out[k] is None and held >= 0 and t[k] - t[held] <= hold_s + 1e-9:
            out[k] = good[held]
    return out


def _corridor(
    boxes: Sequence[Box | None],
    attention: Sequence[tuple[float, float] | None] | None,
    axis: int,
    size: int,
    win: int,
    cfg: ReframeConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Per sampled frame, the window positions (left or top edge) that are acceptable.

    ``-inf``/``inf`` where nothing is known (the path holds still there).
    """
    n = len(boxes)
    lo = np.full(n, -np.inf)
    hi = np.full(n, np.inf)
    dz = cfg.dead_zone * win
    top = float(size - win)
    for k in range(n):
        b = boxes[k]
        if b is not None:
            b0 = min(max(b[axis] * size, 0.0), float(size))
            b1 = min(max((b[axis] + b[axis + 2]) * size, b0), float(size))
            centred = (b0 + b1) / 2.0 - win / 2.0
            if b1 - b0 <= win:
                m = min(cfg.margin * win, (win - (b1 - b0)) / 2.0)
                lo[k] = max(b1 + m - win, centred - dz)
                hi[k] = min(b0 - m, centred + dz)
            else:
                lo[k] = hi[k] = centred
        elif attention is not None and attention[k] is not None:
            a = attention[k]
            assert a is not None
            centred = a[axis] * size - win / 2.0
            lo[k], hi[k] = centred - dz, centred + dz
        else:
            continue
        lo[k] = min(max(lo[k], 0.0), top)
        hi[k] = min(max(hi[k], lo[k]), top)
    return lo, hi


def _follow(lo: np.ndarray, hi: np.ndarray, start: float) -> np.ndarray:
    """Each position the nearest to the one before inside its corridor (a lazy camera)."""
    out = np.empty(len(lo))
    p = start
    for k in range(len(lo)):
        p = min(max(p, lo[k]), hi[k])
        out[k] = p
    return out


def _walk(lo: np.ndarray, hi: np.ndarray, centre: float) -> np.ndarray:
    """The mean of the lazy camera walked forwards and backwards through the corridor."""
    known = np.nonzero(np.isfinite(lo))[0]
    if len(known) == 0:
        return np.full(len(lo), centre)
    first, last = int(known[0]), int(known[-1])
    fwd = _follow(lo, hi, (lo[first] + hi[first]) / 2.0)
    bwd = _follow(lo[::-1], hi[::-1], (lo[last] + hi[last]) / 2.0)[::-1]
    return np.asarray((fwd + bwd) / 2.0)


def _slew(x: np.ndarray, vmax: float) -> np.ndarray:
    out = x.copy()
    for i in range(1, len(out)):
        out[i] = min(max(out[i], out[i - 1] - vmax), out[i - 1] + vmax)
    return out


def _moving_average(x: np.ndarray, k: int) -> np.ndarray:
    """Centred mean over ``k`` frames, the ends held (a convex combination of ``x``)."""
    if k <= 1:
        return x.copy()
    left = k // 2
    padded = np.pad(x, (left, k - 1 - left), mode="edge")
    c = np.concatenate([[0.0], np.cumsum(padded)])
    return np.asarray((c[k:] - c[:-k]) / k)


#: rounds of local smoothing before :func:`_bounded` falls back to moving averages
SMOOTHING_ROUNDS = 20000


def _violations(p: np.ndarray, vmax: float, amax: float) -> np.ndarray:
    """[F] bool: frames in a step faster than ``vmax`` or a turn sharper than ``amax``."""
    bad = np.zeros(len(p), bool)
    fast = np.abs(np.diff(p)) > vmax
    bad[:-1] |= fast
    bad[1:] |= fast
    if len(p) > 2:
        bad[1:-1] |= np.abs(np.diff(p, 2)) > amax
    return bad


def _bounded(target: np.ndarray, vmax: float, amax: float) -> np.ndarray:
    """``target`` with ``|dx| <= vmax`` and ``|d2x| <= amax`` per frame.

    Smoothed only where it breaks a bound: each round replaces those frames by the
    ``1/4, 1/2, 1/4`` mean of their neighbourhood (the ends mirrored), which spreads a
    sharp step or turn over just the frames it needs, centred on it. Should that not
    settle within :data:`SMOOTHING_ROUNDS`, a guaranteed fallback: the mean of a
    forwards and a backwards slew limiter (each keeps ``|dx| <= vmax``, so does their
    mean), then moving averages of ``k`` frames, which turn every velocity step into a
    ramp over ``k`` frames (``|d2x| <= (range of dx) / k``, ``k`` just wide enough).
    """
    p = target.astype(np.float64).copy()
    if len(p) < 2:
        return p
    for _ in range(SMOOTHING_ROUNDS):
        bad = _violations(p, vmax, amax)
        if not bad.any():
            return p
        padded = np.concatenate([[p[0]], p, [p[-1]]])
        mean = (padded[:-2] + 2.0 * padded[1:-1] + padded[2:]) / 4.0
        p = np.where(bad, mean, p)
    v = (_slew(p, vmax) + _slew(p[::-1], vmax)[::-1]) / 2.0
    d = np.diff(v)
    spread = float(max(d.max(), 0.0) - min(d.min(), 0.0))
    k = max(1, math.ceil(spread / amax - 1e-9))
    if k >= len(v):  # too short a clip to ramp: the mean position holds still
        return np.full(len(v), float(v.mean()))
    return _moving_average(_moving_average(v, k), k)
