"""The quality benchmark's case set: hard product-localisation videos with known answers.

This module owns generating the case set: 27 short videos (19 development cases
``c01``-``c19`` and 8 held-out cases ``h01``-``h08``, the latter never used to tune a
scorer) made only from real photographs and real footage, each with the product images a
job would be given and the true windows (in seconds) in which the product is on screen.
What makes each case hard is in :attr:`Case.kind`: a small product moving over moving
footage, perspective tilt with rotation and relighting, occlusion, cropping at the frame
edge, two images of which one is shown, a full-frame look-alike elsewhere, two
appearances, a 3-second appearance, grayscale footage, CRF-35 compression, a vertical
9:16 video, a real photo of the product in a cluttered scene, white and black studio
backdrops, low-texture products, and products that are never shown.

Media comes from two places on the machine; nothing is downloaded at run time:

* the shared sample media (``CLIPLINE_MEDIA_DIR`` or ``../shared/media``, found by
  :func:`clipline.samples.real_media_dir`): ``Megamind.avi``, ``tree.avi`` and four
  photos;
* the OpenCV sample data of Debian's ``opencv-doc`` package,
  ``/usr/share/doc/opencv-doc/examples/data/`` (``apt-get install opencv-doc``), or the
  folder named by the ``opencv_data`` argument or ``CLIPLINE_OPENCV_DATA``. A file may
  also be there gzipped (``NAME.gz``); it is unpacked into the output folder.

A case whose sources are missing (or that needs ffmpeg where there is none) is skipped
with its reason, never a crash. Output is cached: a case whose video, images and recipe
record exist with the recipe's hash is not rebuilt. Every frame is a pure function of the
recipe (no random numbers are drawn), so a rebuild writes the same pictures.

Imports: OpenCV, NumPy and the standard library, plus :mod:`clipline.samples` to find the
shared media. Nothing else of ``clipline``, and never ``workers``, ``gpu_service`` or
``clipline.cli``: the case set must not depend on the scorer it judges.

Run ``python -m clipline_bench.quality_cases OUT_DIR`` to build the set and print it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from clipline import samples

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
"""Where Debian's ``opencv-doc`` installs the OpenCV sample data."""

FPS = 24
LANDSCAPE = (640, 360)
PORTRAIT = (360, 640)
CLIP_S = 5.0
"""Length of the highlight a scorer chooses (what :func:`hit` is meant for)."""

_RECIPE_VERSION = 2  # bump when rendering changes in a way the specs do not show
_HUE_MASKED = frozenset({"apple.jpg", "orange.jpg"})  # cut out by hue, not by flood fill


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: a video, the product images given with it, and the answer."""

    name: str
    video: Path
    images: tuple[Path, ...]
    windows: tuple[tuple[float, float], ...]  # true product windows in seconds; empty: never shown
    kind: str  # short description of what makes it hard
    heldout: bool
    duration_s: float  # length of the video (frames / FPS)
    #: where the product is: ``(t, x, y, w, h)`` per frame it shows in (the box of its
    #: visible pixels as fractions of the picture; computed from the recipe, not cached)
    boxes: tuple[tuple[float, float, float, float, float], ...] = ()


# --------------------------------------------------------------------------- recipes
@dataclasses.dataclass(frozen=True)
class _Clip:
    """Real footage, centre-cropped to the output aspect, looped forwards and back."""

    source: str
    gray: bool = False
    speed: float = 1.0


@dataclasses.dataclass(frozen=True)
class _Photo:
    """A still photo with a slow pan and zoom (Ken Burns), from ``t0`` for ``dur`` s."""

    source: str
    zoom: tuple[float, float] = (1.0, 1.3)
    pan: tuple[float, float] = (0.0, 1.0)
    dur: float = 5.0
    t0: float = 0.0


@dataclasses.dataclass(frozen=True)
class _Cuts:
    """Hard cuts: each part's background is shown until its time (seconds)."""

    parts: tuple[tuple[float, _Clip | _Photo], ...]


_Background = _Clip | _Photo | _Cuts


@dataclasses.dataclass(frozen=True)
class _Show:
    """One appearance of an image over the background, from ``t0`` to ``t1`` seconds."""

    image: str
    t0: float
    t1: float
    width_frac: float = 0.3  # product width / frame width
    path: tuple[tuple[float, float], tuple[float, float]] = ((0.3, 0.5), (0.7, 0.5))
    rot_deg: tuple[float, float] = (0.0, 0.0)  # rotation at t0 and t1
    tilt: float = 0.0  # perspective: fraction the right edge shrinks (out-of-plane turn)
    relight: tuple[float, float, float, float] | None = None  # B, G, R gains and gamma
    occlude: float = 0.0  # fraction of the product's width hidden (right side)
    keep_backdrop: bool = True  # False: the product is cut out of its photo
    full_frame: bool = False  # the whole frame is the image (a distractor)


@dataclasses.dataclass(frozen=True)
class _Spec:
    name: str
    kind: str
    background: _Background
    images: tuple[str, ...]
    shows: tuple[_Show, ...] = ()
    windows: tuple[tuple[float, float], ...] | None = None  # None: from the shows
    duration_s: float = 15.0
    size: tuple[int, int] = LANDSCAPE
    gray: bool = False
    crf: int | None = None
    heldout: bool = False

    def true_windows(self) -> tuple[tuple[float, float], ...]:
        if self.windows is not None:
            return self.windows
        return tuple(
            (s.t0, s.t1) for s in self.shows if s.image in self.images and not s.full_frame
        )

    def sources(self) -> list[str]:
        names: list[str] = []
        for n in [*_background_sources(self.background), *self.images]:
            if n not in names:
                names.append(n)
        for s in self.shows:
            if s.image not in names:
                names.append(s.image)
        return names


def _background_sources(bg: _Background) -> list[str]:
    if isinstance(bg, _Cuts):
        return [n for _, part in bg.parts for n in _background_sources(part)]
    return [bg.source]


_MM = _Clip("Megamind.avi")
_TREE = _Clip("tree.avi")
_VT = _Clip("vtest.avi")
_WARM = (0.75, 0.95, 1.3, 0.8)
_DIM = (0.6, 0.6, 0.6, 1.2)
_COOL = (1.25, 1.0, 0.8, 1.1)

_DEV: tuple[_Spec, ...] = (
    _Spec(
        "c01_moving_fish_megamind",
        "cut-out product 32% of the width moving over moving film footage",
        _MM,
        ("HappyFish.jpg",),
        (_Show("HappyFish.jpg", 7, 12, 0.32, ((0.25, 0.4), (0.75, 0.6)), keep_backdrop=False),),
    ),
    _Spec(
        "c02_tilt_rot_relight",
        "perspective tilt, rotation -10..20 deg, warm relight",
        _TREE,
        ("butterfly.jpg",),
        (
            _Show(
                "butterfly.jpg",
                2,
                7.5,
                0.38,
                ((0.35, 0.45), (0.6, 0.55)),
                rot_deg=(-10, 20),
                tilt=0.3,
                relight=_WARM,
            ),
        ),
    ),
    _Spec(
        "c03_occluded_30pct",
        "30% of the product hidden",
        _VT,
        ("baboon.jpg",),
        (_Show("baboon.jpg", 8, 13.5, 0.3, ((0.3, 0.5), (0.6, 0.5)), occlude=0.3),),
    ),
    _Spec(
        "c04_edge_cropped",
        "cropped at the frame edge (30-38% outside); background a panned photo",
        _Photo("building.jpg", dur=15),
        ("starry_night.jpg",),
        (_Show("starry_night.jpg", 5, 10.5, 0.4, ((0.92, 0.5), (0.95, 0.45))),),
    ),
    _Spec(
        "c05_two_refs_one_shown",
        "two images given, only the second is shown",
        _MM,
        ("HappyFish.jpg", "smarties.png"),
        (_Show("smarties.png", 1, 6.5, 0.35, ((0.3, 0.5), (0.5, 0.5))),),
    ),
    _Spec(
        "c06_lookalike_fullframe",
        "full-frame look-alike (fruits) at 2-6.5 s; low-texture product cut out",
        _TREE,
        ("orange.jpg",),
        (
            _Show("fruits.jpg", 2, 6.5, full_frame=True),
            _Show("orange.jpg", 9, 14.5, 0.3, ((0.3, 0.5), (0.7, 0.45)), keep_backdrop=False),
        ),
    ),
    _Spec(
        "c07_shown_twice",
        "shown twice (2.5 s and 6 s); either appearance counts",
        _VT,
        ("baboon.jpg",),
        (
            _Show("baboon.jpg", 1, 3.5, 0.28, ((0.3, 0.5), (0.4, 0.5))),
            _Show("baboon.jpg", 9, 15, 0.3, ((0.7, 0.5), (0.4, 0.5))),
        ),
        duration_s=16.0,
    ),
    _Spec(
        "c08_three_seconds",
        "a 3-second appearance, cut out",
        _MM,
        ("HappyFish.jpg",),
        (_Show("HappyFish.jpg", 8, 11, 0.3, ((0.4, 0.5), (0.6, 0.5)), keep_backdrop=False),),
    ),
    _Spec(
        "c09_grayscale_footage",
        "grayscale footage (whole video, product too), colour product image",
        _Clip("Megamind.avi", gray=True),
        ("butterfly.jpg",),
        (_Show("butterfly.jpg", 4, 9.5, 0.35, ((0.3, 0.5), (0.6, 0.5)), rot_deg=(0, 15)),),
        gray=True,
    ),
    _Spec(
        "c10_crf35",
        "H.264 CRF 35, product 25% of the width moving diagonally",
        _VT,
        ("baboon.jpg",),
        (_Show("baboon.jpg", 6, 11.5, 0.25, ((0.3, 0.4), (0.7, 0.6))),),
        crf=35,
    ),
    _Spec(
        "c11_vertical_9x16",
        "vertical 9:16 video (360x640), rotating",
        _TREE,
        ("starry_night.jpg",),
        (_Show("starry_night.jpg", 3, 8.5, 0.6, ((0.5, 0.35), (0.5, 0.6)), rot_deg=(0, 10)),),
        size=PORTRAIT,
    ),
    _Spec(
        "c12_box_in_scene",
        "real photo of the product in a cluttered scene (box_in_scene), pan/zoom, hard cuts",
        _Cuts(
            (
                (5, _MM),
                (10.5, _Photo("box_in_scene.png", (1.0, 1.35), (0.2, 0.8), dur=5.5, t0=5)),
                (99, _Photo("home.jpg", (1.3, 1.0), dur=4.5, t0=10.5)),
            )
        ),
        ("box.png",),
        windows=((5, 10.5),),
    ),
    _Spec(
        "c13_white_backdrop_kept",
        "white studio backdrop kept; white paper (sudoku) full frame at 0-5 s",
        _Cuts(
            ((5, _Photo("sudoku.png", (1.0, 1.2), dur=5)), (99, _Photo("home.jpg", dur=10, t0=5)))
        ),
        ("HappyFish.jpg",),
        (_Show("HappyFish.jpg", 8.5, 14, 0.3, ((0.3, 0.5), (0.6, 0.5))),),
    ),
    _Spec(
        "c14_black_backdrop_kept",
        "black studio backdrop kept (box photo) over dark film footage, rotating",
        _MM,
        ("box.png",),
        (_Show("box.png", 2, 7.5, 0.35, ((0.35, 0.55), (0.55, 0.45)), rot_deg=(5, -10)),),
    ),
    _Spec(
        "c15_apple_lowtex",
        "low-texture product (apple), cut out",
        _TREE,
        ("apple.jpg",),
        (_Show("apple.jpg", 6, 11.5, 0.35, ((0.3, 0.5), (0.65, 0.5)), keep_backdrop=False),),
    ),
    _Spec(
        "c16_orange_relit",
        "low-texture product (orange), dimmed light, rotating, cut out",
        _VT,
        ("orange.jpg",),
        (
            _Show(
                "orange.jpg",
                3,
                8.5,
                0.3,
                ((0.6, 0.5), (0.35, 0.5)),
                rot_deg=(0, -20),
                relight=_DIM,
                keep_backdrop=False,
            ),
        ),
    ),
    _Spec(
        "c17_apple_backdrop_tilt",
        "low-texture product, backdrop kept, tilt and warm light, panned photo background",
        _Photo("leuvenA.jpg", (1.0, 1.4), dur=15),
        ("apple.jpg",),
        (_Show("apple.jpg", 9, 14.5, 0.4, ((0.4, 0.5), (0.6, 0.5)), tilt=0.25, relight=_WARM),),
    ),
    _Spec(
        "c18_absent",
        "never shown (two images given): expect found=False",
        _Cuts(((7, _MM), (99, _TREE))),
        ("baboon.jpg", "HappyFish.jpg"),
    ),
    _Spec(
        "c19_small_graffiti_megamind",
        "25% of the width, rotating, tilted, diagonal motion over film footage",
        _MM,
        ("graf1.png",),
        (_Show("graf1.png", 4, 9.5, 0.25, ((0.7, 0.3), (0.3, 0.7)), rot_deg=(0, 30), tilt=0.2),),
    ),
)

# Held-out: other products and backgrounds, written after the scorer's constants were
# fixed on the development cases; never used to tune them.
_HELDOUT: tuple[_Spec, ...] = (
    _Spec(
        "h01_logo_lowtex_cutout",
        "low-texture logo, black backdrop removed",
        _TREE,
        ("opencv-logo.png",),
        (_Show("opencv-logo.png", 8, 13.5, 0.3, ((0.3, 0.5), (0.6, 0.5)), keep_backdrop=False),),
        heldout=True,
    ),
    _Spec(
        "h02_winlogo_tilt_relight",
        "perspective tilt, rotation, cool relight, backdrop kept, aerial photo pan",
        _Photo("aero3.jpg", dur=15),
        ("WindowsLogo.jpg",),
        (
            _Show(
                "WindowsLogo.jpg",
                3,
                8.5,
                0.35,
                ((0.6, 0.5), (0.4, 0.5)),
                rot_deg=(0, -15),
                tilt=0.3,
                relight=_COOL,
            ),
        ),
        heldout=True,
    ),
    _Spec(
        "h03_squirrel_occluded",
        "photo product 28% of the width, 25% occluded, over film footage",
        _MM,
        ("squirrel_cls.jpg",),
        (_Show("squirrel_cls.jpg", 9, 14.5, 0.28, ((0.3, 0.4), (0.6, 0.6)), occlude=0.25),),
        heldout=True,
    ),
    _Spec(
        "h04_chicky_crf35_rotating",
        "H.264 CRF 35, rotating 40 deg",
        _VT,
        ("chicky_512.png",),
        (_Show("chicky_512.png", 1, 6.5, 0.3, ((0.35, 0.5), (0.55, 0.5)), rot_deg=(0, 40)),),
        crf=35,
        heldout=True,
    ),
    _Spec(
        "h05_shapes_white_scene",
        "low-texture line drawing cut out over a white-ish desk scene",
        _Cuts(
            ((4, _Photo("messi5.jpg", dur=4)), (99, _Photo("stuff.jpg", (1.0, 1.25), dur=11, t0=4)))
        ),
        ("pic3.png",),
        (_Show("pic3.png", 6, 11.5, 0.3, ((0.4, 0.5), (0.6, 0.5)), keep_backdrop=False),),
        heldout=True,
    ),
    _Spec(
        "h06_vertical_twice",
        "vertical 9:16 video, shown twice (3 s and 6 s)",
        _TREE,
        ("messi5.jpg",),
        (
            _Show("messi5.jpg", 1, 4, 0.6, ((0.5, 0.3), (0.5, 0.4))),
            _Show("messi5.jpg", 8, 14, 0.55, ((0.5, 0.6), (0.5, 0.4)), rot_deg=(0, 10)),
        ),
        duration_s=16.0,
        size=PORTRAIT,
        heldout=True,
    ),
    _Spec(
        "h07_fruits_vs_orange_fullframe",
        "full-frame look-alike (orange) at 1-5 s, similar palette",
        _Photo("basketball1.png", dur=15),
        ("fruits.jpg",),
        (
            _Show("orange.jpg", 1, 5, full_frame=True),
            _Show("fruits.jpg", 8, 13.5, 0.35, ((0.35, 0.5), (0.6, 0.5)), rot_deg=(-5, 5)),
        ),
        heldout=True,
    ),
    _Spec(
        "h08_absent",
        "never shown (two images given), cuts and zooms: expect found=False",
        _Cuts(((5, _TREE), (10, _MM), (99, _Photo("aero3.jpg", dur=5, t0=10)))),
        ("squirrel_cls.jpg", "opencv-logo.png"),
        heldout=True,
    ),
)


# --------------------------------------------------------------------------- hit rule
def hit(
    windows: Sequence[tuple[float, float]], start_s: float, end_s: float, *, found: bool
) -> bool:
    """Whether a chosen window ``[start_s, end_s]`` answers a case with these true windows.

    It must overlap one true window by at least 4 s; a true window shorter than 5 s (a
    brief appearance) only needs ``min(2.5, 0.8 * length)`` s of it inside the choice.
    A scorer that says it did not find the product misses every case with windows, and
    a case with no windows (never shown) is a hit only when ``found`` is False.
    """
    if end_s < start_s:
        raise ValueError(f"window ends before it starts: {start_s}..{end_s}")
    if not windows:
        return not found
    if not found:
        return False
    for a, b in windows:
        length = b - a
        need = 4.0 if length >= CLIP_S else min(2.5, 0.8 * length)
        if min(end_s, b) - max(start_s, a) >= need - 1e-6:
            return True
    return False


# --------------------------------------------------------------------------- media sources
class _SourceError(Exception):
    """A source file exists but cannot be read."""


class _Sources:
    """Finds source files by name; unpacks ``NAME.gz`` into ``unpack_dir`` on first use."""

    def __init__(self, dirs: Sequence[Path], unpack_dir: Path) -> None:
        self.dirs = tuple(dirs)
        self.unpack_dir = unpack_dir
        self._digests: dict[str, str] = {}

    def locate(self, name: str) -> Path | None:
        for d in self.dirs:
            for p in (d / name, d / f"{name}.gz"):
                if p.is_file():
                    return p
        return None

    def path(self, name: str) -> Path:
        """A plain file holding ``name`` (unpacked if the source is gzipped)."""
        p = self.locate(name)
        if p is None:
            raise _SourceError(f"{name} not found")
        if p.suffix != ".gz":
            return p
        dest = self.unpack_dir / name
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{name}.tmp")
            try:
                with gzip.open(p, "rb") as src, tmp.open("wb") as out:
                    shutil.copyfileobj(src, out)
            except (OSError, EOFError) as e:
                tmp.unlink(missing_ok=True)
                raise _SourceError(f"cannot unpack {p}: {e}") from e
            os.replace(tmp, dest)
        return dest

    def digest(self, name: str) -> str:
        if name not in self._digests:
            self._digests[name] = hashlib.sha256(self.path(name).read_bytes()).hexdigest()
        return self._digests[name]

    def image(self, name: str) -> np.ndarray:
        im = cv2.imread(str(self.path(name)), cv2.IMREAD_COLOR)
        if im is None:
            raise _SourceError(f"cannot decode image {name}")
        return im


def _source_dirs(opencv_data: Path | None) -> list[Path]:
    """The shared media first, then the OpenCV sample data (argument, env var or Debian's)."""
    dirs: list[Path] = []
    media = samples.real_media_dir()
    if media is not None:
        dirs.append(media)
    if opencv_data is None:
        env = os.environ.get("CLIPLINE_OPENCV_DATA", "")
        opencv_data = Path(env) if env else OPENCV_DATA
    dirs.append(opencv_data)
    return dirs


def _ffmpeg() -> str | None:
    try:
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        return shutil.which("ffmpeg")


# --------------------------------------------------------------------------- rendering
def _fit(f: np.ndarray, w: int, h: int) -> np.ndarray:
    """Centre-crop to ``w:h`` and resize."""
    fh, fw = f.shape[:2]
    ar = w / h
    if fw / fh > ar:
        cw = int(fh * ar)
        x0 = (fw - cw) // 2
        f = f[:, x0 : x0 + cw]
    else:
        ch = int(fw / ar)
        y0 = (fh - ch) // 2
        f = f[y0 : y0 + ch]
    return cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA)


def _to_gray(f: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(f, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)


class _ClipFrames:
    """Frames of a :class:`_Clip` at time ``t``, decoded lazily and kept for the way back."""

    def __init__(self, spec: _Clip, src: _Sources, w: int, h: int) -> None:
        self.spec, self.w, self.h = spec, w, h
        self.cap = cv2.VideoCapture(str(src.path(spec.source)))
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if fps and fps > 0 else 24.0
        self.frames: list[np.ndarray] = []
        self.ended = False
        self.name = spec.source

    def _read_to(self, i: int) -> None:
        while not self.ended and len(self.frames) <= i:
            ok, f = self.cap.read()
            if not ok:
                self.ended = True
                self.cap.release()
                break
            f = _fit(f, self.w, self.h)
            self.frames.append(_to_gray(f) if self.spec.gray else f)

    def at(self, t: float) -> np.ndarray:
        i = int(t * self.fps * self.spec.speed)
        self._read_to(i)
        n = len(self.frames)
        if n == 0:
            raise _SourceError(f"no frame decodes from {self.name}")
        if i >= n:  # past the end: ping-pong over the whole clip
            i %= max(1, 2 * n - 2)
            i = i if i < n else 2 * n - 2 - i
        return self.frames[i].copy()


class _PhotoFrames:
    def __init__(self, spec: _Photo, src: _Sources, w: int, h: int) -> None:
        self.spec, self.w, self.h = spec, w, h
        self.im = src.image(spec.source)

    def at(self, t: float) -> np.ndarray:
        s = self.spec
        u = min(max((t - s.t0) / s.dur, 0.0), 1.0)
        z = s.zoom[0] + (s.zoom[1] - s.zoom[0]) * u
        ih, iw = self.im.shape[:2]
        ar = self.w / self.h
        cw = min(iw, ih * ar) / z
        ch = cw / ar
        p = s.pan[0] + (s.pan[1] - s.pan[0]) * u
        x0 = (iw - cw) * p
        y0 = (ih - ch) * 0.5
        kx, ky = self.w / cw, self.h / ch
        m = np.array([[kx, 0, -x0 * kx], [0, ky, -y0 * ky]], np.float64)
        return cv2.warpAffine(
            self.im, m, (self.w, self.h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )


class _CutFrames:
    def __init__(self, spec: _Cuts, src: _Sources, w: int, h: int) -> None:
        self.parts = [(until, _frames(part, src, w, h)) for until, part in spec.parts]

    def at(self, t: float) -> np.ndarray:
        for until, bg in self.parts:
            if t < until:
                return bg.at(t)
        return self.parts[-1][1].at(t)


def _frames(
    spec: _Background, src: _Sources, w: int, h: int
) -> _ClipFrames | _PhotoFrames | _CutFrames:
    if isinstance(spec, _Clip):
        return _ClipFrames(spec, src, w, h)
    if isinstance(spec, _Photo):
        return _PhotoFrames(spec, src, w, h)
    return _CutFrames(spec, src, w, h)


def _object_mask(name: str, im: np.ndarray) -> np.ndarray:
    """The product's cut-out mask (1 inside), for composites with the backdrop removed.

    White or black studio backdrops: flood fill from the corners. Apple and orange (on a
    green-grey backdrop): warm, saturated pixels, largest component, thin parts (a twig,
    a stalk) opened away, holes filled.
    """
    h, w = im.shape[:2]
    if name in _HUE_MASKED:
        hsv = cv2.cvtColor(im, cv2.COLOR_BGR2HSV)
        hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
        warm = (((hue < 25) | (hue > 165)) & (sat > 90) & (val > 50)).astype(np.uint8)
        closed = cv2.morphologyEx(warm, cv2.MORPH_CLOSE, np.ones((15, 15), np.uint8))
        m = _largest(closed)
        if m is None:
            raise _SourceError(f"no product found in {name} to cut out")
        # the fruit, not the twig or stalk beside it: holes filled, thin parts opened away
        r = max(3, min(h, w) // 12)
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        fruit = _largest(cv2.morphologyEx(_filled(m), cv2.MORPH_OPEN, disk))
        m = fruit if fruit is not None else m
    else:
        gray = cv2.cvtColor(im, cv2.COLOR_BGR2GRAY)
        ff = np.zeros((h + 2, w + 2), np.uint8)
        flags = 4 | cv2.FLOODFILL_MASK_ONLY | (255 << 8)
        for x, y in [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)]:
            if ff[y + 1, x + 1] == 0:
                cv2.floodFill(gray, ff, (x, y), 0, loDiff=12, upDiff=12, flags=flags)
        m = (ff[1:-1, 1:-1] == 0).astype(np.uint8)
    return _filled(m)


def _largest(mask: np.ndarray) -> np.ndarray | None:
    """The largest connected component of ``mask`` (uint8, 1 inside), or None if empty."""
    _n, lab, stats, _ = cv2.connectedComponentsWithStats(mask)
    if len(stats) < 2:
        return None
    return (lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)


def _filled(mask: np.ndarray) -> np.ndarray:
    """``mask`` with its holes filled (every outer contour drawn solid)."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros_like(mask)
    cv2.drawContours(out, contours, -1, 1, thickness=-1)
    return out


def _relight(im: np.ndarray, gains: tuple[float, float, float], gamma: float) -> np.ndarray:
    f = (im.astype(np.float32) / 255.0) ** gamma
    f = f * np.array(gains, np.float32)[None, None, :]
    return np.clip(f * 255.0, 0, 255).astype(np.uint8)


class _Compositor:
    """Draws :class:`_Show` appearances onto frames (product images loaded once)."""

    def __init__(self, src: _Sources) -> None:
        self.src = src
        self.loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _load(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.loaded:
            im = self.src.image(name)
            self.loaded[name] = (im, _object_mask(name, im))
        return self.loaded[name]

    def _placement(self, s: _Show, t: float, fw: int, fh: int) -> tuple[np.ndarray, np.ndarray]:
        """The show's homography into a ``fw`` x ``fh`` frame and its visible alpha there."""
        im, om = self._load(s.image)
        ih, iw = im.shape[:2]
        u = 0.0 if s.t1 <= s.t0 else min(max((t - s.t0) / (s.t1 - s.t0), 0.0), 1.0)
        (ax, ay), (bx, by) = s.path
        cx = (ax + (bx - ax) * u) * fw
        cy = (ay + (by - ay) * u) * fh
        ang = math.radians(s.rot_deg[0] + (s.rot_deg[1] - s.rot_deg[0]) * u)
        sc = s.width_frac * fw / iw
        src = np.array([[0, 0], [iw, 0], [iw, ih], [0, ih]], np.float32)
        hw, hh, tl = iw * sc / 2, ih * sc / 2, s.tilt
        dst = np.array(
            [[-hw, -hh], [hw, -hh * (1 - tl)], [hw, hh * (1 - tl)], [-hw, hh]], np.float32
        )
        dst[:, 0] *= 1 - 0.5 * tl
        c, si = math.cos(ang), math.sin(ang)
        dst = np.stack(
            [c * dst[:, 0] - si * dst[:, 1] + cx, si * dst[:, 0] + c * dst[:, 1] + cy], 1
        ).astype(np.float32)
        hm = cv2.getPerspectiveTransform(src, dst)
        alpha_src = np.ones((ih, iw), np.float32) if s.keep_backdrop else om.astype(np.float32)
        alpha = cv2.warpPerspective(alpha_src, hm, (fw, fh), flags=cv2.INTER_LINEAR)
        if s.occlude > 0:  # the background shows through over the product's right part
            x, y, bw, bh = cv2.boundingRect((alpha > 0.5).astype(np.uint8))
            ow = int(bw * s.occlude)
            alpha[y : y + bh, x + bw - ow : x + bw] = 0
        return hm, alpha

    def draw(self, frame: np.ndarray, s: _Show, t: float) -> np.ndarray:
        im, _ = self._load(s.image)
        if s.relight is not None:
            im = _relight(im, s.relight[:3], s.relight[3])
        fh, fw = frame.shape[:2]
        if s.full_frame:
            return _fit(im, fw, fh)
        hm, alpha = self._placement(s, t, fw, fh)
        warped = cv2.warpPerspective(im, hm, (fw, fh), flags=cv2.INTER_AREA)
        a = alpha[..., None]
        out = frame.astype(np.float32) * (1 - a) + warped.astype(np.float32) * a
        return np.clip(out, 0, 255).astype(np.uint8)

    def box(self, s: _Show, t: float, fw: int, fh: int) -> tuple[int, int, int, int] | None:
        """The visible product's bounding box in the frame (px), None where none shows."""
        _, alpha = self._placement(s, t, fw, fh)
        mask = (alpha > 0.5).astype(np.uint8)
        if not mask.any():
            return None
        x, y, w, h = cv2.boundingRect(mask)
        return int(x), int(y), int(w), int(h)


def _true_boxes(spec: _Spec, src: _Sources) -> tuple[tuple[float, float, float, float, float], ...]:
    """Per frame where one of the case's products shows: ``(t, x, y, w, h)``, the box as
    fractions of the picture (what :attr:`Case.boxes` holds)."""
    w, h = spec.size
    comp = _Compositor(src)
    out: list[tuple[float, float, float, float, float]] = []
    shows = [s for s in spec.shows if s.image in spec.images and not s.full_frame]
    for i in range(round(spec.duration_s * FPS)):
        t = i / FPS
        found = [b for s in shows if s.t0 <= t < s.t1 for b in [comp.box(s, t, w, h)] if b]
        if not found:
            continue
        x0 = min(b[0] for b in found)
        y0 = min(b[1] for b in found)
        x1 = max(b[0] + b[2] for b in found)
        y1 = max(b[1] + b[3] for b in found)
        out.append((round(t, 6), x0 / w, y0 / h, (x1 - x0) / w, (y1 - y0) / h))
    return tuple(out)


def _render(spec: _Spec, src: _Sources, video: Path, ffmpeg: str | None) -> None:
    w, h = spec.size
    bg = _frames(spec.background, src, w, h)
    comp = _Compositor(src)
    tmp = video.with_name(f".{video.stem}.tmp.mp4")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter.fourcc(*"mp4v"), FPS, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"cannot write {tmp}")
    try:
        for i in range(round(spec.duration_s * FPS)):
            t = i / FPS
            f = bg.at(t)
            for s in spec.shows:
                if s.t0 <= t < s.t1:
                    f = comp.draw(f, s, t)
            writer.write(_to_gray(f) if spec.gray else f)
    except BaseException:
        writer.release()
        tmp.unlink(missing_ok=True)
        raise
    writer.release()
    if spec.crf is None:
        os.replace(tmp, video)
        return
    assert ffmpeg is not None
    enc = video.with_name(f".{video.stem}.enc.mp4")
    try:
        subprocess.run(
            [ffmpeg, "-nostdin", "-v", "error", "-y", "-i", str(tmp), "-an",
             "-c:v", "libx264", "-crf", str(spec.crf), "-pix_fmt", "yuv420p", str(enc)],
            check=True,
        )  # fmt: skip
        os.replace(enc, video)
    finally:
        tmp.unlink(missing_ok=True)
        enc.unlink(missing_ok=True)


# --------------------------------------------------------------------------- building
def _recipe_hash(spec: _Spec, src: _Sources) -> str:
    parts = [
        f"v{_RECIPE_VERSION} fps={FPS}",
        repr(spec),
        *(f"{n}={src.digest(n)}" for n in spec.sources()),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _select(which: str, only: Sequence[str]) -> list[_Spec]:
    sets = {"dev": _DEV, "heldout": _HELDOUT, "all": _DEV + _HELDOUT}
    if which not in sets:
        raise ValueError(f"which must be one of {sorted(sets)}, not {which!r}")
    specs = list(sets[which])
    if not only:
        return specs
    unknown = [o for o in only if not any(s.name.startswith(o) for s in specs)]
    if unknown:
        raise ValueError(f"no case in {which!r} is named or starts with {unknown}")
    return [s for s in specs if any(s.name.startswith(o) for o in only)]


def case_names(which: str = "all") -> list[str]:
    """The names of the cases in a set (``"dev"``, ``"heldout"`` or ``"all"``)."""
    return [s.name for s in _select(which, ())]


def build_cases(
    out_dir: Path,
    *,
    which: str = "all",
    only: Sequence[str] = (),
    opencv_data: Path | None = None,
) -> tuple[list[Case], list[tuple[str, str]]]:
    """Write (or reuse) the cases' videos and product images in ``out_dir``.

    ``which`` is ``"dev"``, ``"heldout"`` or ``"all"``; ``only`` keeps the cases whose
    names are, or start with, one of its entries (``"c08"``). ``opencv_data`` overrides
    where the OpenCV sample data lives (else ``CLIPLINE_OPENCV_DATA``, else Debian's
    ``opencv-doc`` folder). Returns the cases built or reused, and ``(name, reason)``
    for each case skipped (a source missing or unreadable, or no ffmpeg for a CRF case);
    each skip is also printed.
    """
    out = Path(out_dir)
    specs = _select(which, only)
    out.mkdir(parents=True, exist_ok=True)
    src = _Sources(_source_dirs(opencv_data), out / "_sources")
    ffmpeg = _ffmpeg()
    cases: list[Case] = []
    skipped: list[tuple[str, str]] = []
    for spec in specs:
        missing = [n for n in spec.sources() if src.locate(n) is None]
        reason = ""
        if missing:
            where = ", ".join(str(d) for d in src.dirs)
            reason = f"missing source(s) {', '.join(missing)} (looked in {where})"
        elif spec.crf is not None and ffmpeg is None:
            reason = "no ffmpeg (imageio-ffmpeg or on PATH) for the CRF re-encode"
        if not reason:
            try:
                cases.append(_build_one(spec, src, out, ffmpeg))
            except _SourceError as e:
                reason = str(e)
        if reason:
            print(f"skip {spec.name}: {reason}", file=sys.stderr)
            skipped.append((spec.name, reason))
    return cases, skipped


def _build_one(spec: _Spec, src: _Sources, out: Path, ffmpeg: str | None) -> Case:
    recipe = _recipe_hash(spec, src)
    video = out / f"{spec.name}.mp4"
    record = out / f"{spec.name}.json"
    images = tuple(out / "images" / n for n in spec.images)
    n_frames = round(spec.duration_s * FPS)
    case = Case(
        name=spec.name,
        video=video,
        images=images,
        windows=spec.true_windows(),
        kind=spec.kind,
        heldout=spec.heldout,
        duration_s=n_frames / FPS,
        boxes=_true_boxes(spec, src),
    )
    if _cached(record, recipe, video, images):
        return case
    record.unlink(missing_ok=True)
    (out / "images").mkdir(exist_ok=True)
    for name, dest in zip(spec.images, images, strict=True):
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(src.path(name), tmp)
        os.replace(tmp, dest)
    _render(spec, src, video, ffmpeg)
    meta = {
        "recipe": recipe,
        "name": spec.name,
        "kind": spec.kind,
        "heldout": spec.heldout,
        "windows": [list(wnd) for wnd in case.windows],
        "duration_s": case.duration_s,
        "frames": n_frames,
        "size": list(spec.size),
        "images": [str(p.relative_to(out)) for p in images],
    }
    record.write_text(json.dumps(meta, indent=1) + "\n")
    return case


def _cached(record: Path, recipe: str, video: Path, images: Sequence[Path]) -> bool:
    if not (record.is_file() and video.is_file() and all(p.is_file() for p in images)):
        return False
    try:
        return bool(json.loads(record.read_text()).get("recipe") == recipe)
    except (OSError, ValueError, AttributeError):
        return False


# --------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    ap.add_argument("out_dir", type=Path, help="folder for the videos and images")
    ap.add_argument("--which", default="all", choices=["dev", "heldout", "all"])
    ap.add_argument("--only", default="", help="comma-separated case names or prefixes")
    ap.add_argument("--opencv-data", type=Path, default=None, help="OpenCV sample data folder")
    a = ap.parse_args(argv)
    only = [o for o in a.only.split(",") if o]
    t0 = time.monotonic()
    cases, skipped = build_cases(a.out_dir, which=a.which, only=only, opencv_data=a.opencv_data)
    elapsed = time.monotonic() - t0
    print(f"{'case':<32} {'set':<7} {'windows (s)':<16} kind")
    for c in cases:
        wins = ",".join(f"{x:g}-{y:g}" for x, y in c.windows) or "never shown"
        print(f"{c.name:<32} {'heldout' if c.heldout else 'dev':<7} {wins:<16} {c.kind}")
    for name, reason in skipped:
        print(f"{name:<32} SKIPPED  {reason}")
    print(f"{len(cases)} cases in {a.out_dir}, {len(skipped)} skipped, {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
