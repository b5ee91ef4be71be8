"""The product localizer: finds the product in every sampled frame, on the device.

Training-free (nothing to download). Frames and product images arrive letterboxed
(aspect kept, bars of exact zeros; :func:`workers.preprocess.into`). For every picture
the model computes, batched on the device:

1. **Where the picture is**: the content rectangle inside the bars (``content``).
2. **Keypoints and descriptors**: up to ``localizer_keypoints`` RootSIFT features inside
   the picture. On CUDA (``localizer_features=auto``, kornia installed) kornia's SIFT on
   torch tensors; on a CPU OpenCV's SIFT, measured 4-5x faster there than kornia's; both
   give the same windows on the quality set (``clipline bench quality``).
3. **Colour cells**: a ``GRID x GRID`` grid of colour histograms (12 hue x 2 saturation
   bins for chromatic pixels, 3 grey levels for the rest). Hue and saturation do not
   change with a global brightness gain, and the grey bins keep grayscale footage and
   black/white products comparable. For product images the studio backdrop (white,
   black, plain or gradient, flood-filled from the border through smooth pixels of the
   border's colour) is left out, so it never counts as product.
4. **Matching** (frames only) against the job's product images: their features are
   computed once, when the job's refs chunk runs, at three sizes (products look much
   smaller in footage than in their photos), and kept in a per-job cache keyed by
   ``(job_id, generation)``. Per product image and size: ratio test (0.8) and mutual
   nearest neighbours on RootSIFT.

**Fused and batched** (every backend but ``eager``; the ``eager`` backend, every model's
unoptimized reference, runs the per-picture path, ``fused=False``: the same outputs):
colour bins are one gather per pixel from a 2^24-entry table (:class:`ColourLut`,
exact: built from :func:`colour_bins` itself); keypoints are padded into ``[N, k, ...]``
tensors and each job's frames are matched against each product view in one batched
product (:func:`match_batched`), ranked and packed into rows by tensor operations
(:func:`pack_pairs`): the number of device calls per batch grows with the product
views, not with the frames, and nothing in matching waits on the host. The model keeps
its time per stage (``colour``, ``features``, ``match``, ``refs``) in ``stage_s``.

Outputs per picture (:data:`gpu_service.protocol.LOCALIZER`):

``pairs``    ``[MAX_PAIRS, 5]`` matched (frame x, frame y, product x, product y, product
             index), best first per product, rows of -1 after the last match; product
             coordinates are in that product image's own buffer.
``colour``   ``[GRID, GRID, BINS]`` colour cells (product images: backdrop left out).
``content``  ``[5]`` the picture's rectangle (x, y, w, h) and the buffer's side, pixels.
``status``   ``[1]``: 1 matched against the job's product images, 0 this daemon has not
             seen the job's product images (a restarted daemon: the worker retries the
             job), 2 a product image itself.

Geometric verification (RANSAC homography with sanity checks) and the window choice run
on the worker from these (:mod:`workers.localize`): a few milliseconds per frame.

The model needs to know which job each batch item belongs to, so it is batch-aware:
the executor calls :meth:`LocalizerModel.bind` with the batch's items before each call.
Must not import the workers, the daemon or the engine.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from gpu_service import protocol
from gpu_service.models.base import BuildContext, InputSpec, Model, register
from gpu_service.models.common import setting
from gpu_service.shm import ChunkKind, Descriptor

log = logging.getLogger("gpu_service.localizer")

GRID = 16
HUE_BINS, SAT_BINS, GREY_BINS = 12, 2, 3
BINS = HUE_BINS * SAT_BINS + GREY_BINS
#: matched pairs sent per picture (all product images together)
MAX_PAIRS = 512
#: matched pairs kept per product image
MAX_PAIRS_PER_PRODUCT = 256
#: the sizes a product image is described at, relative to its buffer
REF_SCALES = (1.0, 0.6, 0.35)
RATIO = 0.8
#: jobs whose product features are kept (a job's frames follow its refs within seconds)
CACHE_JOBS = 512

STATUS_NO_REFS = protocol.LOCALIZER_NO_REFS
STATUS_MATCHED = protocol.LOCALIZER_MATCHED
STATUS_REFS = protocol.LOCALIZER_REFS


# ---------------------------------------------------------------------------
# Pixels: content rectangle, colour bins, backdrop, cells.
# ---------------------------------------------------------------------------
def content_rects(frames: torch.Tensor) -> torch.Tensor:
    """``[N, 4]`` (x, y, w, h) of the picture inside letterbox bars of exact zeros."""
    _, h, w, _ = frames.shape
    nonzero = frames.amax(dim=-1) > 0  # [N, H, W]
    rows = nonzero.any(dim=2)  # [N, H]
    cols = nonzero.any(dim=1)  # [N, W]
    ar_h = torch.arange(h, device=frames.device)
    ar_w = torch.arange(w, device=frames.device)
    big = torch.tensor(1 << 30, device=frames.device)
    y0 = torch.where(rows, ar_h, big).amin(dim=1)
    y1 = torch.where(rows, ar_h, -1).amax(dim=1) + 1
    x0 = torch.where(cols, ar_w, big).amin(dim=1)
    x1 = torch.where(cols, ar_w, -1).amax(dim=1) + 1
    empty = y1 <= 0
    y0, x0 = torch.where(empty, 0, y0), torch.where(empty, 0, x0)
    y1, x1 = torch.where(empty, h, y1), torch.where(empty, w, x1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=1).float()


def colour_bins(img: torch.Tensor) -> torch.Tensor:
    """``img`` float ``[N, 3, H, W]`` RGB in [0, 1] -> bin index ``[N, H, W]``."""
    r, g, b = img[:, 0], img[:, 1], img[:, 2]
    mx = img.amax(dim=1)
    mn = img.amin(dim=1)
    d = mx - mn
    sat = d / mx.clamp_min(1e-6)
    dd = d.clamp_min(1e-6)
    hue = (
        torch.where(
            mx == r,
            ((g - b) / dd) % 6,
            torch.where(mx == g, (b - r) / dd + 2, (r - g) / dd + 4),
        )
        / 6.0
    )
    hb = (hue * HUE_BINS).long().clamp(0, HUE_BINS - 1)
    sb = ((sat - 0.2) / 0.8 * SAT_BINS).long().clamp(0, SAT_BINS - 1)
    chromatic = (sat > 0.2) & (mx > 0.12) & (d > 0.06)
    vb = (mx * GREY_BINS).long().clamp(0, GREY_BINS - 1)
    return torch.where(chromatic, hb * SAT_BINS + sb, HUE_BINS * SAT_BINS + vb)


class ColourLut:
    """:func:`colour_bins` of every 24-bit RGB colour, looked up instead of computed.

    The frames are uint8, so a picture's bins are a pure function of its pixels' 2^24
    possible colours: the table (16 MiB of uint8, built once per device by running
    :func:`colour_bins` itself over every colour, in slices) gives exactly the same bin
    for every pixel as computing it (a test checks all of it), at one integer gather per
    pixel instead of a dozen float passes over the batch.
    """

    SLICE = 1 << 20

    def __init__(self, device: torch.device) -> None:
        self.device = device
        table = torch.empty(1 << 24, dtype=torch.uint8, device=device)
        with torch.inference_mode():
            for lo in range(0, 1 << 24, self.SLICE):
                code = torch.arange(lo, lo + self.SLICE, device=device, dtype=torch.int32)
                rgb = torch.stack([(code >> 16) & 255, (code >> 8) & 255, code & 255], dim=0)
                img = rgb.to(torch.uint8).float().div(255.0)[None, :, None, :]
                table[lo : lo + self.SLICE] = colour_bins(img)[0, 0].to(torch.uint8)
        self.table = table

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """``frames`` uint8 ``[N, H, W, 3]`` RGB -> bin index ``[N, H, W]`` (int64)."""
        px = frames.to(torch.int32)
        code = (px[..., 0] << 16) | (px[..., 1] << 8) | px[..., 2]
        return self.table[code].long()


_LUTS: dict[str, ColourLut] = {}
_LUTS_LOCK = threading.Lock()


def colour_lut(device: torch.device) -> ColourLut:
    """The process's :class:`ColourLut` for ``device`` (built on first use)."""
    key = str(device)
    with _LUTS_LOCK:
        lut = _LUTS.get(key)
        if lut is None:
            lut = _LUTS[key] = ColourLut(device)
        return lut


def backdrop(
    img: torch.Tensor, res: int = 80, edge_t: float = 0.07, tol: float = 0.18
) -> torch.Tensor:
    """Border-connected smooth backdrop of each picture, ``[N, H, W]`` bool (bars included).

    At ``res x res``: pixels that are smooth (colour gradient under ``edge_t``) and near
    (``tol``) the median colour of the picture's border ring are candidates; the mask is
    the part of them connected to that ring (flood by repeated 3x3 dilation), so the
    product's outline stops it. A picture whose border ring is mostly not such a backdrop
    (a photo cropped tight, a video frame) gets only its bars.
    """
    n, _, h, w = img.shape
    zero = img.amax(dim=1) == 0
    bars = zero.all(dim=2, keepdim=True) | zero.all(dim=1, keepdim=True)
    bars_s = F.interpolate(bars.float()[:, None], size=(res, res), mode="area")[:, 0] > 0.0
    small = F.interpolate(img, size=(res, res), mode="area")
    outer = F.pad(bars_s.float()[:, None], (1, 1, 1, 1), value=1.0)
    ring = (F.max_pool2d(outer, 3, 1, 0)[:, 0] > 0) & ~bars_s
    out = torch.zeros_like(bars_s)
    for i in range(n):
        border = small[i][:, ring[i]]
        if border.shape[1] == 0:
            continue
        med = border.median(dim=1).values
        si = torch.where(bars_s[i][None], med[:, None, None], small[i])[None]
        sm = F.avg_pool2d(F.pad(si, (1, 1, 1, 1), mode="replicate"), 3, 1)
        p = F.pad(sm, (1, 1, 1, 1), mode="replicate")
        gx = (p[:, :, 1:-1, 2:] - p[:, :, 1:-1, :-2]).abs()
        gy = (p[:, :, 2:, 1:-1] - p[:, :, :-2, 1:-1]).abs()
        grad = (gx + gy).amax(dim=1)[0]
        near = ((small[i] - med[:, None, None]).abs().amax(dim=0) < tol) & (grad < edge_t)
        near &= ~bars_s[i]
        if near[ring[i]].float().mean() <= 0.5:
            continue
        m = (near & ring[i]).float()[None, None]
        allowed = near.float()[None, None]
        for _ in range(2 * res):
            grown = F.max_pool2d(m, 3, 1, 1) * allowed
            if torch.equal(grown, m):
                break
            m = grown
        out[i] = m[0, 0] > 0
    full = F.interpolate(out.float()[:, None], size=(h, w), mode="nearest")[:, 0] > 0.5
    return full | bars


def cells(bins: torch.Tensor, weight: torch.Tensor, grid: int = GRID) -> torch.Tensor:
    """Per-cell bin mass ``[N, G, G, BINS]`` (fraction of the cell's pixels)."""
    n, h, w = bins.shape
    cy = (torch.arange(h, device=bins.device) * grid // h)[:, None]
    cx = (torch.arange(w, device=bins.device) * grid // w)[None, :]
    idx = ((cy * grid + cx)[None] * BINS + bins).reshape(n, -1)
    out = torch.zeros(n, grid * grid * BINS, device=bins.device)
    out.scatter_add_(1, idx, weight.reshape(n, -1).float())
    return out.reshape(n, grid, grid, BINS) / float(h * w / grid / grid)


# ---------------------------------------------------------------------------
# Keypoints and descriptors.
# ---------------------------------------------------------------------------
def _rootsift(d: np.ndarray) -> np.ndarray:
    d = d.astype(np.float32)
    d /= np.maximum(d.sum(axis=1, keepdims=True), 1e-6)
    return np.sqrt(d)


class Features:
    """Detects up to ``k`` RootSIFT keypoints per picture, inside its content rectangle."""

    name = ""

    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(
        self, frames: torch.Tensor, rects: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per picture: (xy ``[m, 2]`` float32, unit descriptors ``[m, 128]`` float32)."""
        raise NotImplementedError


class OpenCVSift(Features):
    """OpenCV's SIFT on the host (the CPU path), frames spread over the daemon's threads.

    OpenCV releases the GIL while it detects, so a small pool of threads (as many as
    the daemon's intra-op threads) describes several frames of a batch at once; each
    thread keeps its own detector.
    """

    name = "sift_cv2"

    def __init__(self, k: int, threads: int = 1) -> None:
        super().__init__(k)
        self.threads = max(1, threads)
        self._local = threading.local()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _sift(self) -> Any:
        sift = getattr(self._local, "sift", None)
        if sift is None:
            sift = cv2.SIFT_create(nfeatures=self.k, contrastThreshold=0.01)  # type: ignore[attr-defined]
            self._local.sift = sift
        return sift

    def _one(self, img: np.ndarray, box: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, w, h = (int(v) for v in box)
        # Only the picture: the bars cost scale-space work and their edges are not the
        # product's (a few pixels off the picture's border are masked too).
        gray = cv2.cvtColor(np.ascontiguousarray(img[y : y + h, x : x + w]), cv2.COLOR_RGB2GRAY)
        mask = np.zeros(gray.shape, np.uint8)
        mask[2:-2, 2:-2] = 255
        kps, desc = self._sift().detectAndCompute(gray, mask)
        if desc is None or not kps:
            return torch.zeros(0, 2), torch.zeros(0, 128)
        order = np.argsort([-p.response for p in kps])[: self.k]
        xy = np.array([kps[i].pt for i in order], np.float32) + np.array([x, y], np.float32)
        return torch.from_numpy(xy), torch.from_numpy(_rootsift(desc[order]))

    def __call__(
        self, frames: torch.Tensor, rects: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        host = frames.cpu().numpy()
        boxes = rects.cpu().numpy()
        if self.threads == 1 or len(host) == 1:
            return [self._one(img, box) for img, box in zip(host, boxes, strict=True)]
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.threads, thread_name_prefix="localizer"
            )
        return list(self._pool.map(self._one, host, boxes))


class KorniaSift(Features):
    """kornia's SIFT on torch tensors (the CUDA path)."""

    name = "sift_kornia"

    def __init__(self, k: int, device: torch.device) -> None:
        super().__init__(k)
        import kornia.feature as kf

        self.kf = kf
        self.feature = kf.SIFTFeature(num_features=k, upright=False, rootsift=True, device=device)

    @torch.inference_mode()
    def __call__(
        self, frames: torch.Tensor, rects: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        img = frames.permute(0, 3, 1, 2).float() / 255.0
        gray = (0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2])[:, None]
        out = []
        for i in range(gray.shape[0]):  # kornia 0.9's scale-space detector takes one image
            lafs, resp, desc = self.feature(gray[i : i + 1])
            xy = self.kf.get_laf_center(lafs)[0]
            x, y, w, h = rects[i].to(xy.device).unbind()  # stays on the device
            keep = (resp[0].reshape(-1) != 0) & (xy[:, 0] >= x + 2) & (xy[:, 0] < x + w - 2)
            keep &= (xy[:, 1] >= y + 2) & (xy[:, 1] < y + h - 2)
            out.append((xy[keep].float(), F.normalize(desc[0][keep].float(), dim=1)))
        return out


def make_features(kind: str, k: int, device: torch.device) -> Features:
    """The feature backend: ``auto`` is kornia on CUDA when installed, else OpenCV."""
    if kind == "auto":
        kind = "sift_cv2"
        if device.type == "cuda":
            try:
                import kornia.feature  # noqa: F401

                kind = "sift_kornia"
            except ImportError:
                log.warning("kornia is not installed: the localizer detects on the host")
    if kind == "sift_kornia":
        return KorniaSift(k, device)
    if kind == "sift_cv2":
        return OpenCVSift(k, threads=torch.get_num_threads())
    raise ValueError(f"unknown localizer_features {kind!r} (auto | sift_cv2 | sift_kornia)")


# ---------------------------------------------------------------------------
# Matching.
# ---------------------------------------------------------------------------
def match(dq: torch.Tensor, dr: torch.Tensor, ratio: float = RATIO) -> torch.Tensor:
    """Ratio-test + mutual-nearest-neighbour matches ``[P, 3]`` (query, ref, ratio)."""
    if dq.shape[0] < 2 or dr.shape[0] < 2:
        return torch.zeros(0, 3, device=dq.device)
    d2 = (2.0 - 2.0 * dq @ dr.T).clamp_min(0.0)  # unit vectors
    best2, idx2 = torch.topk(d2, 2, dim=1, largest=False)
    r = best2[:, 0].sqrt() / best2[:, 1].sqrt().clamp_min(1e-6)
    first = idx2[:, 0]
    back = d2.argmin(dim=0)
    ok = (r < ratio) & (back[first] == torch.arange(dq.shape[0], device=dq.device))
    q = torch.nonzero(ok).reshape(-1)
    return torch.stack([q.float(), first[q].float(), r[q]], dim=1)


class RefView:
    """One product image at one size: keypoints in the image's own buffer, descriptors."""

    __slots__ = ("desc", "xy")

    def __init__(self, xy: torch.Tensor, desc: torch.Tensor) -> None:
        self.xy, self.desc = xy, desc


def pad_features(
    feats: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-picture features padded: xy ``[N, k, 2]``, desc ``[N, k, 128]``, count ``[N]``."""
    n = len(feats)
    xy = torch.zeros(n, k, 2, device=device)
    desc = torch.zeros(n, k, 128, device=device)
    counts = []
    for i, (p, d) in enumerate(feats):
        m = min(k, int(p.shape[0]))  # a shape: known on the host, no device wait
        if m:
            xy[i, :m] = p[:m].to(device)
            desc[i, :m] = d[:m].to(device)
        counts.append(m)
    return xy, desc, torch.tensor(counts, dtype=torch.long).to(device, non_blocking=True)


def match_batched(
    dq: torch.Tensor, nq: torch.Tensor, dr: torch.Tensor, ratio: float = RATIO
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`match` for ``T`` pictures against one reference view, in one batched product.

    ``dq`` ``[T, k, 128]`` unit descriptors of which the first ``nq[t]`` are real;
    ``dr`` ``[m, 128]``. Returns, per query row, ``ok [T, k]`` (ratio test and mutual
    nearest neighbour), ``first [T, k]`` (the matched reference row) and the ratio
    ``[T, k]``; the same decisions as :func:`match` on each picture alone.
    """
    t, k, _ = dq.shape
    rows = torch.arange(k, device=dq.device)
    real = rows[None, :] < nq[:, None]  # [T, k]
    if dr.shape[0] < 2:
        zero = torch.zeros(t, k, dtype=torch.bool, device=dq.device)
        return (
            zero,
            torch.zeros(t, k, dtype=torch.long, device=dq.device),
            torch.ones(t, k, device=dq.device),
        )
    # Nearest = most similar (unit vectors: d^2 = 2 - 2 cos), so the ranking runs on the
    # product itself and only the two best per row become distances.
    sim = dq @ dr.T  # [T, k, m]
    if sim.is_cuda or not bool(real.all()):  # on a GPU always: no wait for the answer
        sim.masked_fill_(~real[:, :, None], -float("inf"))
    best2, idx2 = torch.topk(sim, 2, dim=2)
    d2 = (2.0 - 2.0 * best2).clamp_min(0.0)
    r = d2[..., 0].sqrt() / d2[..., 1].sqrt().clamp_min(1e-6)
    first = idx2[..., 0]
    back = sim.argmax(dim=1)  # [T, m]: the nearest query of each reference row
    mutual = torch.gather(back, 1, first) == rows[None, :]
    ok = real & (nq[:, None] >= 2) & (r < ratio) & mutual
    return ok, first, r


def pack_pairs(
    xy: torch.Tensor,
    nq: torch.Tensor,
    desc: torch.Tensor,
    refs: Sequence[Sequence[RefView]],
) -> torch.Tensor:
    """Matched pairs of ``T`` pictures of one job, ``[T, MAX_PAIRS, 5]``, in one pass.

    Per product image its views' matches are ranked by ratio (best first), the best
    :data:`MAX_PAIRS_PER_PRODUCT` kept, and the products packed one after the other
    into each picture's rows; rows after the last match are -1. No per-picture loop:
    every step is a batched tensor operation, so on a GPU nothing waits on the host.
    """
    t, k, _ = xy.shape
    device = xy.device
    out = torch.full((t, MAX_PAIRS + 1, 5), -1.0, device=device)
    offset = torch.zeros(t, dtype=torch.long, device=device)
    for product, views in enumerate(refs):
        ratios, ref_xy = [], []
        for view in views:
            ok, first, r = match_batched(desc, nq, view.desc)
            ratios.append(torch.where(ok, r, torch.full_like(r, float("inf"))))
            if view.xy.shape[0]:
                ref_xy.append(view.xy[first.clamp_max(view.xy.shape[0] - 1)])
            else:
                ref_xy.append(torch.zeros(t, k, 2, device=device))
        if not ratios:
            continue
        rr = torch.cat(ratios, dim=1)  # [T, V*k]
        fx = xy.repeat(1, len(ratios), 1)  # each view's candidates are the frame's keypoints
        px = torch.cat(ref_xy, dim=1)
        keep = min(MAX_PAIRS_PER_PRODUCT, rr.shape[1])
        best, order = torch.sort(rr, dim=1, stable=True)
        best, order = best[:, :keep], order[:, :keep]
        valid = torch.isfinite(best)
        pos = offset[:, None] + torch.arange(keep, device=device)[None, :]
        valid &= pos < MAX_PAIRS
        row = torch.cat(
            [
                torch.gather(fx, 1, order[..., None].expand(-1, -1, 2)),
                torch.gather(px, 1, order[..., None].expand(-1, -1, 2)),
                torch.full((t, keep, 1), float(product), device=device),
            ],
            dim=2,
        )
        # rows that are not kept go to a spare row past the end (no boolean indexing:
        # it would wait for the device to count them)
        dest = torch.where(valid, pos, torch.full_like(pos, MAX_PAIRS))
        out.scatter_(1, dest[..., None].expand(-1, -1, 5), row)
        offset = offset + valid.sum(dim=1)
    return out[:, :MAX_PAIRS]


# ---------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------
class LocalizerModel(Model):
    name = "localizer"
    outputs = protocol.LOCALIZER
    batch_aware = True
    input_spec = InputSpec(
        min_frames=1,
        net_input=(3, 0, 0),
        preprocessing="letterboxed RGB -> RootSIFT keypoints, colour cells, matches",
    )

    def __init__(
        self,
        device: torch.device,
        features: str = "auto",
        keypoints: int = 512,
        *,
        fused: bool = True,
    ):
        self.device = device
        #: ``False``: the per-picture reference path (float colour bins, one match per
        #: picture and view); the same outputs, kept for tests and ``bench models``
        self.fused = fused
        self.features = make_features(features, keypoints, device)
        self.backend = self.features.name
        self._cache: collections.OrderedDict[tuple[str, int], list[list[RefView]]] = (
            collections.OrderedDict()
        )
        self._kind = ChunkKind.FRAMES
        self._items: list[Descriptor] = []
        self.lut = colour_lut(device) if fused else None
        #: seconds per stage (colour, features, match, refs) since the model was built;
        #: with ``profile`` the device is waited for at each stage's end (GPU figures
        #: are then exact, at the cost of a sync per stage)
        self.stage_s: dict[str, float] = collections.defaultdict(float)
        self.profile = False

    @property
    def trusted(self) -> bool:
        return True

    def bind(self, kind: ChunkKind, items: Sequence[Descriptor]) -> None:
        """The batch's kind and items (in row order) for the next call."""
        self._kind, self._items = kind, list(items)

    # -- refs ------------------------------------------------------------------
    def _ref_views(self, frame: torch.Tensor, rect: torch.Tensor) -> list[RefView]:
        """Describe one product image at each of :data:`REF_SCALES`, backdrop left out."""
        s = frame.shape[0]
        x, y, w, h = (int(v) for v in rect.tolist())
        picture = frame[y : y + h, x : x + w].permute(2, 0, 1)[None].float()
        views: list[RefView] = []
        for scale in REF_SCALES:
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            buf = torch.zeros(1, 3, s, s, device=frame.device)
            x0, y0 = (s - nw) // 2, (s - nh) // 2
            small = F.interpolate(picture, size=(nh, nw), mode="area") if scale != 1.0 else picture
            buf[:, :, y0 : y0 + nh, x0 : x0 + nw] = small
            as_u8 = buf.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            vrect = torch.tensor([[x0, y0, nw, nh]], dtype=torch.float32)
            ((xy, desc),) = self.features(as_u8, vrect)
            fg = ~backdrop(buf / 255.0)[0]
            if xy.shape[0]:
                px = xy.round().long()
                px[:, 0].clamp_(0, s - 1)
                px[:, 1].clamp_(0, s - 1)
                on = fg.cpu()[px[:, 1].cpu(), px[:, 0].cpu()] if fg.any() else None
                if on is not None and int(on.sum()) >= 8:
                    xy, desc = xy[on.to(xy.device)], desc[on.to(desc.device)]
            # back to the full-size buffer's coordinates
            back = xy.clone()
            back[:, 0] = (xy[:, 0] - x0) * (w / nw) + x
            back[:, 1] = (xy[:, 1] - y0) * (h / nh) + y
            views.append(RefView(back.to(self.device), desc.to(self.device)))
        return views

    def _remember(self, key: tuple[str, int], views: list[list[RefView]]) -> None:
        self._cache[key] = views
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_JOBS:
            self._cache.popitem(last=False)

    # -- frames ----------------------------------------------------------------
    def _pairs(
        self, xy: torch.Tensor, desc: torch.Tensor, refs: list[list[RefView]]
    ) -> torch.Tensor:
        """One picture's pairs, picture by picture: the reference for :func:`pack_pairs`."""
        out = torch.full((MAX_PAIRS, 5), -1.0, device=self.device)
        row = 0
        xy, desc = xy.to(self.device), desc.to(self.device)
        for product, views in enumerate(refs):
            found = []
            for view in views:
                m = match(desc, view.desc)
                if m.shape[0]:
                    q, r = m[:, 0].long(), m[:, 1].long()
                    found.append(torch.cat([xy[q], view.xy[r], m[:, 2:3]], dim=1))
            if not found:
                continue
            allm = torch.cat(found)
            allm = allm[torch.argsort(allm[:, 4])][:MAX_PAIRS_PER_PRODUCT]
            n = min(int(allm.shape[0]), MAX_PAIRS - row)
            if n <= 0:
                break
            out[row : row + n, :4] = allm[:n, :4]
            out[row : row + n, 4] = float(product)
            row += n
        return out

    # -- timing ----------------------------------------------------------------
    def _mark(self, stage: str, since: float) -> float:
        """Add the time since ``since`` to ``stage`` (device work waited for when profiling)."""
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.stage_s[stage] += now - since
        return now

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        b, t, h, w, c = frames.shape
        t0 = time.perf_counter()
        flat = frames.reshape(b * t, h, w, c)
        rects = content_rects(flat)
        items = self._items[:b]
        is_refs = self._kind == ChunkKind.REFS
        lut = self.lut
        if lut is None or is_refs:  # float pictures: the reference bins, the product backdrop
            img = flat.permute(0, 3, 1, 2).float() / 255.0
        bins = lut(flat) if lut is not None else colour_bins(img)
        weight = (~backdrop(img)).float() if is_refs else torch.ones_like(bins, dtype=torch.float32)
        colour = cells(bins, weight)
        t0 = self._mark("colour", t0)
        status = torch.full((b * t, 1), STATUS_NO_REFS, device=frames.device)
        if is_refs:
            pairs = torch.full((b * t, MAX_PAIRS, 5), -1.0, device=frames.device)
            for i, d in enumerate(items):
                n = min(t, int(d.shape[0]) if d.shape else t)  # rows past n are padding
                views = [self._ref_views(flat[i * t + j], rects[i * t + j]) for j in range(n)]
                self._remember((d.job_id, d.generation), views)
            status.fill_(STATUS_REFS)
            self._mark("refs", t0)
        else:
            feats = self.features(flat, rects)
            if self.fused:
                xy, desc, count = pad_features(feats, self.features.k, self.device)
            t0 = self._mark("features", t0)
            pairs = torch.full((b, t, MAX_PAIRS, 5), -1.0, device=frames.device)
            status = status.reshape(b, t, 1)
            for i in range(b):
                item = items[i] if i < len(items) else None
                refs = self._cache.get((item.job_id, item.generation)) if item else None
                if refs is None:
                    continue
                rows = slice(i * t, (i + 1) * t)
                if self.fused:
                    pairs[i] = pack_pairs(xy[rows], count[rows], desc[rows], refs)
                else:
                    for j in range(t):
                        fxy, fdesc = feats[i * t + j]
                        pairs[i, j] = self._pairs(fxy, fdesc, refs)
                status[i] = STATUS_MATCHED
            self._mark("match", t0)
        return {
            "pairs": pairs.reshape(b, t, MAX_PAIRS, 5),
            "colour": colour.reshape(b, t, GRID, GRID, BINS),
            "content": torch.cat(
                [rects, torch.full((b * t, 1), float(w), device=rects.device)], dim=1
            ).reshape(b, t, 5),
            "status": status.reshape(b, t, 1),
        }


@register("localizer")
def _build(ctx: BuildContext) -> Model:
    s: Any = ctx.settings
    # The ``eager`` backend is every model's unoptimized reference: here the per-picture
    # path; every other backend gets the fused one (the same outputs).
    return LocalizerModel(
        ctx.device,
        features=setting(s, "localizer_features", "auto"),
        keypoints=setting(s, "localizer_keypoints", 512),
        fused=setting(s, "backend", "auto") != "eager",
    )
