"""Where the product is, frame by frame, and the window that shows it best (worker side).

The daemon's localizer (:mod:`gpu_service.models.localizer`) did the heavy part on the
device: keypoints of every frame matched against the job's product images, colour
cells of every frame and of every product image with its backdrop left out. This module
turns that into evidence, on the worker's CPU (a few milliseconds per frame):

* **Geometry**, per frame and product image: a RANSAC homography (OpenCV's MAGSAC, 5 px)
  from the product image's matched keypoints to the frame's, accepted only when the
  projected outline is sane: positive, not wildly varying perspective (no fold or
  collapse), convex, not tiny, not a sliver, at least partly inside the picture, not
  several frames large, inliers spread over the product (not one blob); covering
  almost the whole picture needs at least 20 inliers. Confidence
  ``1 - exp(-(inliers - 7) / 6)``: on frames without the product RANSAC finds 6-15
  "inliers" in noise, which the checks reject.
* **Colour**, for products with little texture: boxes of the product's aspect at six
  sizes slid over the frame's colour cells; a box scores how much of the product's
  expected colour mass it holds (0.5 whole box + 0.5 its four quarters, for a coarse
  layout), colours weighted by how distinctive they are of the product against this
  video's overall palette. A product photo cropped tight (no plain backdrop for the
  daemon to leave out) is also scored without its surroundings' colours
  (:func:`without_context`), and the better of the two views counts per frame: a video
  may show the product cut out of that photo's scene or the photo whole. Confidence =
  how far the score is above the video's own background level (its 25th percentile)
  and an absolute floor. Where that box says where the product is (reframing follows
  it), it is refined below the cell (:func:`refine_colour_box`): the product image's
  own colour layout is laid over the frame's cells at sub-cell positions and scales,
  and the placement whose expected colour mass best matches the observed (weighted
  intersection over union) wins; a whole-cell box is off by up to a cell and leans
  towards the product's most distinctive colours.
* **Gating**, per product image, decided by the data: when geometry verifies the product
  in two or more frames, frames count by their geometric confidence and colour only
  fills gaps (0.6 x) inside colour runs that geometry confirmed at least once (a
  look-alike palette elsewhere cannot win); otherwise (a plain orange, a notebook)
  colour counts at 0.8 x. The frame's evidence is the best over the product images, so
  a product shown in any one image is found and images never shown do not pull.
* **Window**: the ``length_s`` window with the highest mean evidence; no motion term,
  so cuts and zooms earn nothing; ties (within 2 %) go to the middle of the tied run,
  not the earliest. ``found`` when that mean is at least :data:`FOUND_MIN`.
* **CLIP**, only when the job's results trust the ``clip`` model (real weights; see
  :mod:`gpu_service.models.clip`): per frame the mean of its cosine to the job's text
  (when the job has one) and its best cosine over the job's product images, made robust
  within the video (``z = (s - median) / (1.4826 * MAD)``, confidence
  ``clip(z / 3, 0, 1)``: only frames standing out from the rest of this video count),
  and the frame's evidence becomes ``max(evidence, CLIP_WEIGHT * confidence)``. With
  :data:`CLIP_WEIGHT` 0.5 CLIP alone never outweighs verified geometry (at least
  :data:`VERIFIED`); without trusted CLIP outputs the evidence is exactly the above.

Must not import torch, the daemon or the models: it reads
:class:`gpu_service.protocol.JobResults` only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import cv2
import numpy as np

from gpu_service.protocol import CLIP, LOCALIZER, LOCALIZER_NO_REFS, JobResults

#: mean evidence over the chosen window from which the product counts as found
FOUND_MIN = 0.25
#: colour confidence: margin over the video's background level, floor, span
COL_MARGIN, COL_FLOOR, COL_SPAN = 0.2, 0.55, 0.15
#: geometry confidence from which a frame counts as verified
VERIFIED = 0.5
#: inliers from which a verified frame's homography outline says where the product is
#: better than its refined colour box (fewer, on a product with little texture, fit a
#: homography that passes the checks but lands the outline tens of pixels off)
PRECISE_INLIERS = 30
#: gated colour evidence from which a frame's best colour box says where the product is
#: (for reframing, where geometry did not verify the product)
COLOUR_BOX_MIN = 0.3
#: a frame is still when no cell's colour mass changed more than this (summed over both
#: neighbouring frames; a cell a moving object enters and leaves changes by up to 4)
MOTION_FLOOR = 0.5
#: the most a motion centre's change may spread across the picture (weighted standard
#: deviation of its x, a fraction of the width): wider is motion everywhere, no centre
MOTION_SPREAD = 0.12
#: the most a frame's evidence can get from CLIP alone (see the module docstring)
CLIP_WEIGHT = 0.5


class ProductImagesLost(Exception):
    """The daemon that matched these frames had not seen the job's product images."""


@dataclasses.dataclass
class ProductModel:
    """What the worker derives once per product image from the refs outputs."""

    outline: np.ndarray  # [4, 2] product box corners in its own buffer (pixels)
    hist: np.ndarray  # [BINS] colour distribution of the product, normalised
    quads: np.ndarray  # [2, 2, BINS] per-quarter distributions
    qfill: np.ndarray  # [2, 2] fraction of each quarter that is product
    aspect: float  # product box w / h
    fill: float  # fraction of the product box that is product (not backdrop)
    layout: np.ndarray  # [ph, pw, BINS] the product box's colour cells (its colour layout)
    #: [4] how far the product's outline lies inside its box, in box cells: left, top,
    #: right, bottom (an edge cell the product fills a third of: 2/3)
    inset: np.ndarray


def product_model(fg: np.ndarray, content: np.ndarray, side: int) -> ProductModel:
    """A product image's model from its backdrop-free colour cells ``[G, G, BINS]``."""
    grid = fg.shape[0]
    cell = side / grid
    fg = fg.astype(np.float32).copy()
    ix0, iy0, ix1, iy1 = inner_cells(content, cell)
    keep = np.zeros((grid, grid), bool)
    keep[iy0:iy1, ix0:ix1] = True
    if keep.any():
        fg[~keep] = 0
    occ = fg.sum(-1)
    ys, xs = np.nonzero(occ > 0.25)
    if len(ys) == 0:
        ys, xs = np.nonzero(occ > 0)
    if len(ys) == 0:
        ys, xs = np.array([0, grid - 1]), np.array([0, grid - 1])
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    box = fg[y0:y1, x0:x1]
    hist = box.sum((0, 1))
    hist /= max(float(hist.sum()), 1e-6)
    hy, hx = max(1, (y1 - y0) // 2), max(1, (x1 - x0) // 2)
    quads = np.zeros((2, 2, fg.shape[-1]), np.float32)
    qfill = np.zeros((2, 2), np.float32)
    for a, (ya, yb) in enumerate([(0, hy), (hy, y1 - y0)]):
        for b, (xa, xb) in enumerate([(0, hx), (hx, x1 - x0)]):
            q = box[ya:yb, xa:xb].sum((0, 1))
            quads[a, b] = q / max(float(q.sum()), 1e-6)
            qfill[a, b] = float(q.sum()) / max((yb - ya) * (xb - xa), 1)
    outline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32) * cell
    occ_box = np.clip(box.sum(-1), 0.0, 1.0)
    cols, rows = occ_box.max(axis=0), occ_box.max(axis=1)
    inset = np.array([1 - cols[0], 1 - rows[0], 1 - cols[-1], 1 - rows[-1]], np.float64)
    return ProductModel(
        outline,
        hist,
        quads,
        qfill,
        (x1 - x0) / (y1 - y0),
        float(box.sum() / box[..., 0].size),
        np.ascontiguousarray(box, np.float32),
        inset,
    )


#: a colour is the product photo's context (not the product) when its density on the
#: ring of edge cells is more than this many times its density in the middle half
CONTEXT_RATIO = 2.0


def without_context(fg: np.ndarray, content: np.ndarray, side: int) -> np.ndarray | None:
    """A product image's colour cells with its surroundings' colours left out, or None.

    The daemon leaves out a plain backdrop; a photo cropped tight around the product (an
    orange on its tree, a bag on a table) keeps its surroundings, which a video showing
    the product elsewhere does not. Only for such pictures (most of the ring of edge
    cells occupied) the colours far more common on that ring than in the picture's
    middle half (:data:`CONTEXT_RATIO`; a product photo centres its product) are taken
    for surroundings and zeroed. None where the daemon found a backdrop or no colour
    qualifies. Colours the product shares with its surroundings go too (bins, not
    pixels): the view is for finding the product, the whole picture's view stays.
    """
    x0, y0, x1, y1 = inner_cells(content, side / fg.shape[0])
    if y1 - y0 < 3 or x1 - x0 < 3:
        return None
    f = fg[y0:y1, x0:x1].astype(np.float32)
    ring = np.ones(f.shape[:2], bool)
    ring[1:-1, 1:-1] = False
    if (f.sum(-1)[ring] > 0.9).mean() <= 0.5:
        return None
    hh, ww = f.shape[0] // 4, f.shape[1] // 4
    centre = f[hh : f.shape[0] - hh, ww : f.shape[1] - ww].reshape(-1, f.shape[-1])
    context = f[ring].mean(0) > CONTEXT_RATIO * centre.mean(0)
    if not context.any() or context.all():
        return None
    out = fg.astype(np.float32).copy()
    out[..., context] = 0
    return out


def verify(
    pairs: np.ndarray, product: ProductModel, content: np.ndarray
) -> tuple[int, float, np.ndarray | None]:
    """RANSAC homography + sanity checks -> (inliers, confidence, outline [4, 2] or None)."""
    if len(pairs) < 8:
        return 0, 0.0, None
    src = np.ascontiguousarray(pairs[:, 2:4], np.float32)
    dst = np.ascontiguousarray(pairs[:, 0:2], np.float32)
    hm, mask = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, 5.0, maxIters=2000, confidence=0.999)
    if hm is None or mask is None:
        return 0, 0.0, None
    inl = mask.ravel().astype(bool)
    n = int(inl.sum())
    if n < 8:
        return n, 0.0, None
    wden = product.outline @ hm[2, :2] + hm[2, 2]
    if wden.min() <= 0 or wden.max() / wden.min() > 4.0:
        return n, 0.0, None
    quad = cv2.perspectiveTransform(product.outline[None], hm)[0]
    if not np.isfinite(quad).all() or not cv2.isContourConvex(quad.astype(np.float32)):
        return n, 0.0, None
    area = abs(cv2.contourArea(quad))
    cx, cy, cw, ch = (float(v) for v in content)
    farea = cw * ch
    sides = np.linalg.norm(quad - np.roll(quad, 1, 0), axis=1)
    if area < 0.004 * farea or sides.min() < 0.15 * sides.max():
        return n, 0.0, None
    frame_box = np.array([[cx, cy], [cx + cw, cy], [cx + cw, cy + ch], [cx, cy + ch]], np.float32)
    inside = cv2.intersectConvexConvex(quad.astype(np.float32), frame_box)[0]
    if inside < 0.002 * farea or area > 6.0 * farea:
        return n, 0.0, None
    hull = cv2.convexHull(src[inl])
    spread = abs(cv2.contourArea(hull)) / max(abs(cv2.contourArea(product.outline)), 1e-6)
    if spread < 0.01:
        return n, 0.0, None
    conf = 1.0 - math.exp(-max(n - 7, 0) / 6.0)
    if inside > 0.9 * farea and n < 20:  # "the whole frame" by accident needs strong support
        conf *= 0.3
    return n, float(conf), quad


def _coverage(
    counts: np.ndarray, dist: np.ndarray, n_expected: float, wb: np.ndarray
) -> np.ndarray:
    exp = dist[None] * n_expected
    den = max(float((exp[0] * wb).sum()), 1e-6)
    return np.asarray((np.minimum(counts, exp) * wb).sum(1) / den)


def content_cells(rect: np.ndarray, cell: float) -> tuple[int, int, int, int]:
    """The colour cells (x0, y0, x1, y1, end excluded) that touch the picture ``rect``."""
    x, y, w, h = (float(v) for v in rect[:4])
    return int(x // cell), int(y // cell), math.ceil((x + w) / cell), math.ceil((y + h) / cell)


def inner_cells(rect: np.ndarray, cell: float) -> tuple[int, int, int, int]:
    """The colour cells (x0, y0, x1, y1, end excluded) wholly inside the picture ``rect``."""
    x, y, w, h = (float(v) for v in rect[:4])
    return math.ceil(x / cell), math.ceil(y / cell), int((x + w) // cell), int((y + h) // cell)


def colour_score(
    cells: np.ndarray,
    product: ProductModel,
    content_cells: tuple[int, int, int, int],
    wb: np.ndarray,
) -> float:
    """The best region match of the product's colour in one frame's cells, in [0, 1]."""
    return colour_match(cells, product, content_cells, wb)[0]


def colour_match(
    cells: np.ndarray,
    product: ProductModel,
    content_cells: tuple[int, int, int, int],
    wb: np.ndarray,
) -> tuple[float, tuple[int, int, int, int] | None]:
    """:func:`colour_score` and where: the best box (x, y, w, h) in cells of the grid."""
    x0c, y0c, x1c, y1c = content_cells
    c = cells[y0c:y1c, x0c:x1c].astype(np.float32)
    gh, gw = c.shape[:2]
    bins = c.shape[-1]
    ii = np.zeros((gh + 1, gw + 1, bins), np.float32)
    ii[1:, 1:] = c.cumsum(0).cumsum(1)

    def boxsum(y: np.ndarray, x: np.ndarray, hh: int, ww: int) -> np.ndarray:
        return np.asarray(ii[y + hh, x + ww] - ii[y, x + ww] - ii[y + hh, x] + ii[y, x])

    best = 0.0
    where: tuple[int, int, int, int] | None = None
    for hc in (3, 4, 5, 7, 9, 12):
        wc = round(hc * product.aspect)
        if hc > gh or wc < 2 or wc > gw:
            continue
        grid_y, grid_x = np.meshgrid(np.arange(gh - hc + 1), np.arange(gw - wc + 1), indexing="ij")
        ys, xs = grid_y.ravel(), grid_x.ravel()
        sc = 0.5 * _coverage(boxsum(ys, xs, hc, wc), product.hist, product.fill * hc * wc, wb)
        h2, w2 = hc // 2, wc // 2
        for a, (ya, hh) in enumerate([(0, h2), (h2, hc - h2)]):
            for b, (xa, ww) in enumerate([(0, w2), (w2, wc - w2)]):
                q = boxsum(ys + ya, xs + xa, hh, ww)
                sc = sc + 0.125 * _coverage(
                    q, product.quads[a, b], product.qfill[a, b] * hh * ww, wb
                )
        k = int(sc.argmax())
        if float(sc[k]) > best:
            best = float(sc[k])
            where = (x0c + int(xs[k]), y0c + int(ys[k]), wc, hc)
    return best, where


#: :func:`refine_colour_box`'s search: rounds of (position step, position span, scale span)
#: in cells and log scale, each round centred on the best placement of the one before
REFINE_ROUNDS = ((0.5, 1.5, 0.35), (0.125, 0.375, 0.1))
#: placements per round along the scale axis
REFINE_SCALES = 7


def _overlaps(starts: np.ndarray, unit: float, n: int, lo: int, hi: int) -> np.ndarray:
    """``[K, hi - lo, n]``: how much of frame cell ``lo + j`` (width 1) the ``c``-th of
    ``n`` layout cells (width ``unit``, the first starting at ``starts[k]``) covers."""
    edges = starts[:, None] + unit * np.arange(n + 1)[None, :]
    j = np.arange(lo, hi, dtype=np.float64)[None, :, None]
    a = np.maximum(edges[:, None, :-1], j)
    b = np.minimum(edges[:, None, 1:], j + 1.0)
    return np.maximum(b - a, 0.0)


def refine_colour_box(
    cells: np.ndarray,
    product: ProductModel,
    content_cells: tuple[int, int, int, int],
    wb: np.ndarray,
    box: tuple[int, int, int, int],
    margin: int = 2,
) -> tuple[tuple[float, float, float, float], float]:
    """Where the product is, below the cell, near a whole-cell colour ``box``.

    The product's colour layout (:attr:`ProductModel.layout`) placed at ``(x, y)`` with
    a width of ``s`` cells predicts each frame cell's colour mass (each layout cell's
    mass spread over the frame cells it overlaps). Over the frame cells around ``box``
    (``margin`` cells more each side), the placement whose prediction best matches the
    observed cells, by intersection over union of their ``wb``-weighted mass, wins:
    too small a placement leaves product colour unexplained, too large predicts colour
    that is not there. A coarse-to-fine search (:data:`REFINE_ROUNDS`). Returns the
    product's outline inside the winning placement (its box less
    :attr:`ProductModel.inset`) as ``(x, y, w, h)`` in cells of the grid, and the IoU.
    """
    x0c, y0c, x1c, y1c = content_cells
    bx, by, bw, _ = box
    layout = product.layout.astype(np.float64) * wb
    ph, pw = layout.shape[:2]
    rx0, ry0 = max(x0c, bx - margin), max(y0c, by - margin)
    rx1, ry1 = min(x1c, bx + bw + margin), min(y1c, by + box[3] + margin)
    seen = cells[ry0:ry1, rx0:rx1].astype(np.float64) * wb
    gh, gw, bins = seen.shape
    seen5 = seen[None, :, None]  # [1, gh, 1, gw, B]
    lay_cols = layout.transpose(1, 0, 2).reshape(pw, ph * bins)
    best, cx, cy, cs = -1.0, float(bx), float(by), float(max(bw, 1))
    for step, span, scale_span in REFINE_ROUNDS:
        xs = cx + np.arange(-span, span + 1e-9, step)
        ys = cy + np.arange(-span, span + 1e-9, step)
        round_best = (best, cx, cy, cs)
        for s in cs * np.exp(np.linspace(-scale_span, scale_span, REFINE_SCALES)):
            unit = s / pw
            ax = _overlaps(xs, unit, pw, rx0, rx1)  # [X, gw, pw]
            ay = _overlaps(ys, unit, ph, ry0, ry1)  # [Y, gh, ph]
            # expected[y, i, x, j, b] = sum over r, c of ay[y, i, r] ax[x, j, c] layout[r, c, b]
            cols = ax.reshape(-1, pw) @ lay_cols  # [X * gw, ph * B]
            cols = cols.reshape(len(xs), gw, ph, bins).transpose(2, 0, 1, 3).reshape(ph, -1)
            expected = (ay.reshape(-1, ph) @ cols).reshape(len(ys), gh, len(xs), gw, bins)
            inter = np.minimum(expected, seen5).sum((1, 3, 4))
            union = np.maximum(expected, seen5).sum((1, 3, 4))
            iou = inter / np.maximum(union, 1e-9)  # [Y, X]
            k = np.unravel_index(int(iou.argmax()), iou.shape)
            if float(iou[k]) > round_best[0]:
                round_best = (float(iou[k]), float(xs[k[1]]), float(ys[k[0]]), float(s))
        best, cx, cy, cs = round_best
    unit = cs / pw
    left, top, right, bottom = (float(v) * unit for v in product.inset)
    w = max(cs - left - right, unit)
    h = max(cs * ph / pw - top - bottom, unit)
    return (cx + left, cy + top, w, h), max(best, 0.0)


@dataclasses.dataclass
class Evidence:
    """Per-frame evidence that the product is there."""

    inliers: np.ndarray  # [N, R] verified inliers per frame and product image
    geo_conf: np.ndarray  # [N, R]
    colour_conf: np.ndarray  # [N, R]
    evidence: np.ndarray  # [N] in [0, 1]: gated, best over product images
    boxes: list[np.ndarray | None]  # per frame: the product's outline (buffer px) or None
    content: np.ndarray  # [4] the video's picture in the buffer (x, y, w, h)
    #: per frame: where the product's colours are (the best colour box refined below
    #: the cell, buffer px) when the gated colour evidence reaches
    #: :data:`COLOUR_BOX_MIN`, else None
    colour_boxes: list[np.ndarray | None] = dataclasses.field(default_factory=list)

    @property
    def verified(self) -> np.ndarray:
        """[N] bool: geometry verified the product in the frame."""
        return self.geo_conf.max(axis=1) >= VERIFIED if self.geo_conf.size else np.zeros(0, bool)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    i, n = 0, len(mask)
    while i < n:
        if mask[i]:
            j = i
            while j < n and mask[j]:
                j += 1
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


def has_localizer(results: JobResults) -> bool:
    """Whether the job's results carry the localizer's outputs (frames and refs)."""
    return (
        results.concat(LOCALIZER["pairs"]) is not None
        and results.ref(LOCALIZER["colour"]) is not None
    )


def evidence(results: JobResults) -> Evidence:
    """Per-frame evidence from the localizer's outputs (see the module docstring)."""
    pairs = results.concat(LOCALIZER["pairs"])
    colour = results.concat(LOCALIZER["colour"])
    content = results.concat(LOCALIZER["content"])
    status = results.concat(LOCALIZER["status"])
    ref_colour = results.ref(LOCALIZER["colour"])
    ref_content = results.ref(LOCALIZER["content"])
    if pairs is None or colour is None or content is None or status is None:
        raise ValueError("results lack the localizer's outputs")
    if ref_colour is None or ref_content is None:
        raise ValueError("results lack the localizer's product-image outputs")
    if (status.reshape(-1) == LOCALIZER_NO_REFS).any():
        raise ProductImagesLost("the GPU daemon had not seen this job's product images")
    n, grid = len(pairs), colour.shape[1]
    side = int(ref_content[0, 4])
    products = [product_model(ref_colour[i], ref_content[i], side) for i in range(len(ref_colour))]
    r = len(products)
    # colour views per product image: the picture, and without its surroundings' colours
    views: list[list[ProductModel]] = []
    for i, product in enumerate(products):
        bare = without_context(ref_colour[i], ref_content[i], side)
        views.append([product])
        if bare is not None:
            views[-1].append(product_model(bare, ref_content[i], side))
    frame_content = content[0, :4] if n else np.array([0, 0, side, side], np.float32)
    cell = side / grid
    cc = content_cells(frame_content, cell)
    inl = np.zeros((n, r), int)
    geo = np.zeros((n, r))
    col = np.zeros((n, r))
    quads: list[list[np.ndarray | None]] = [[None] * r for _ in range(n)]
    cboxes: list[list[tuple[int, int, int, int] | None]] = [[None] * r for _ in range(n)]
    cview = np.zeros((n, r), int)  # which colour view of the product image matched best
    palette = colour[:, cc[1] : cc[3], cc[0] : cc[2]].astype(np.float32).sum((0, 1, 2))
    palette /= max(float(palette.sum()), 1e-6)
    weights = [[v.hist / np.maximum(v.hist + palette, 1e-6) for v in vs] for vs in views]
    for i in range(n):
        rows = pairs[i][pairs[i][:, 4] >= 0]
        for j, product in enumerate(products):
            mine = rows[rows[:, 4] == j]
            inl[i, j], geo[i, j], quads[i][j] = verify(mine, product, content[i, :4])
            for k, view in enumerate(views[j]):
                score, where = colour_match(colour[i], view, cc, weights[j][k])
                if k == 0 or score > col[i, j]:
                    col[i, j], cboxes[i][j], cview[i, j] = score, where, k
    base = np.percentile(col, 25, axis=0) if n else np.zeros(r)
    ccon = np.clip((col - np.maximum(base + COL_MARGIN, COL_FLOOR)) / COL_SPAN, 0, 1)
    ev = np.zeros((n, r))
    by_colour = np.zeros((n, r))  # the colour part of the evidence, after gating
    for j in range(r):
        verified = geo[:, j] >= VERIFIED
        if verified.sum() >= 2:
            w = np.zeros(n)
            for a, b in _runs(ccon[:, j] > 0.3):
                if verified[a:b].any():
                    w[a:b] = 0.6
            by_colour[:, j] = w * ccon[:, j]
        else:
            by_colour[:, j] = 0.8 * ccon[:, j]
        ev[:, j] = np.maximum(geo[:, j], by_colour[:, j])
    best = ev.max(axis=1) if r else np.zeros(n)
    clip = clip_confidence(results, r)
    if clip is not None and len(clip) == n:
        best = np.maximum(best, CLIP_WEIGHT * clip)
    arg = ev.argmax(axis=1) if r else np.zeros(n, int)
    boxes = [quads[i][int(arg[i])] for i in range(n)]
    colour_boxes: list[np.ndarray | None] = []
    for i in range(n):
        j = int(by_colour[i].argmax()) if r else 0
        box = cboxes[i][j] if r and by_colour[i, j] >= COLOUR_BOX_MIN else None
        if box is None:
            colour_boxes.append(None)
            continue
        k = int(cview[i, j])
        fine, _ = refine_colour_box(colour[i], views[j][k], cc, weights[j][k], box)
        x, y, w, h = (v * cell for v in fine)
        colour_boxes.append(np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float32))
    return Evidence(inl, geo, ccon, best, boxes, frame_content, colour_boxes)


def motion_centres(
    results: JobResults, floor: float = MOTION_FLOOR
) -> list[tuple[float, float] | None]:
    """Per sampled frame, where the picture changes most: a motion attention centre.

    From the localizer's colour cells (no extra device work): each cell's change of
    colour mass against the frames before and after it, over the picture's cells;
    the centre is the change-weighted mean cell position, as fractions of the picture
    (x, y). None where the picture barely changes (no cell changes by ``floor``: a
    still shot has no centre of motion) or changes everywhere (the change
    spreads wider than :data:`MOTION_SPREAD`: a pan or busy footage). What reframing
    follows where the product is not seen, before falling back to the centre.
    """
    colour = results.concat(LOCALIZER["colour"])
    content = results.concat(LOCALIZER["content"])
    if colour is None or content is None or not len(colour):
        return []
    n, grid = colour.shape[0], colour.shape[1]
    side = float(content[0, 4])
    cell = side / grid
    x0, y0, w, h = (float(v) for v in content[0, :4])
    cx0, cy0, cx1, cy1 = content_cells(content[0, :4], cell)
    c = colour[:, cy0:cy1, cx0:cx1].astype(np.float32)
    step = np.abs(np.diff(c, axis=0)).sum(-1)  # [n-1, gh, gw]
    change = np.zeros(c.shape[:3], np.float32)
    if n > 1:
        change[1:] += step
        change[:-1] += step
    gy, gx = np.meshgrid(
        (np.arange(cy0, cy1) + 0.5) * cell, (np.arange(cx0, cx1) + 0.5) * cell, indexing="ij"
    )
    out: list[tuple[float, float] | None] = []
    for i in range(n):
        m = change[i]
        total = float(m.sum())
        if total <= 0 or float(m.max()) < floor:
            out.append(None)
            continue
        px = float((m * gx).sum()) / total
        py = float((m * gy).sum()) / total
        spread = math.sqrt(float((m * (gx - px) ** 2).sum()) / total) / w
        if spread > MOTION_SPREAD:  # the whole picture moves (a pan, busy footage): no centre
            out.append(None)
            continue
        out.append((min(max((px - x0) / w, 0.0), 1.0), min(max((py - y0) / h, 0.0), 1.0)))
    return out


def clip_confidence(results: JobResults, products: int) -> np.ndarray | None:
    """Per-frame CLIP confidence in [0, 1] (see the module docstring), or None when the
    results carry no trusted CLIP outputs (``products``: the job's product images)."""
    if not results.trusted(CLIP.model):
        return None
    text = results.concat(CLIP["text"])
    image = results.concat(CLIP["image"])
    if text is None or image is None:
        return None
    terms: list[np.ndarray] = []
    if np.any(text != 0):
        terms.append(text[:, 0].astype(np.float64))
    k = min(products, image.shape[1])
    if k:
        terms.append(image[:, :k].max(axis=1).astype(np.float64))
    if not terms or len(terms[0]) == 0:
        return None
    s = np.mean(terms, axis=0)
    med = float(np.median(s))
    mad = 1.4826 * float(np.median(np.abs(s - med)))
    if mad <= 1e-9:
        return np.zeros(len(s))
    return np.asarray(np.clip((s - med) / mad / 3.0, 0.0, 1.0))


@dataclasses.dataclass
class Window:
    start_s: float
    end_s: float
    score: float  # mean evidence in the window, [0, 1]
    found: bool


def choose_window(
    timestamps: np.ndarray, evidence: np.ndarray, duration_s: float, length_s: float
) -> Window:
    """The window with the most evidence; ties resolved to the middle of the tied run."""
    t = np.asarray(timestamps, float)
    e = np.asarray(evidence, float)
    if duration_s <= length_s or len(e) == 0:
        sc = float(e.mean()) if len(e) else 0.0
        return Window(0.0, duration_s, sc, sc >= FOUND_MIN)
    latest = duration_s - length_s
    starts = np.unique(np.concatenate([np.arange(0.0, latest + 1e-9, 0.25), [latest]]))
    means = np.zeros(len(starts))
    for k, s in enumerate(starts):
        inside = (t >= s - 1e-9) & (t < s + length_s - 1e-9)
        means[k] = float(e[inside].mean()) if inside.any() else 0.0
    best = float(means.max())
    if best <= 1e-9:
        mid = latest / 2
        return Window(mid, mid + length_s, 0.0, False)
    near = means >= best - 0.02 * best
    k = int(means.argmax())
    lo, hi = k, k
    while lo > 0 and near[lo - 1]:
        lo -= 1
    while hi < len(near) - 1 and near[hi + 1]:
        hi += 1
    j = (lo + hi) // 2
    s = float(starts[j])
    return Window(s, s + length_s, float(means[j]), bool(means[j] >= FOUND_MIN))


def _area(quad: np.ndarray) -> float:
    """The area of a quadrilateral's bounding box."""
    span = quad.max(axis=0) - quad.min(axis=0)
    return float(span[0] * span[1])


def summary(ev: Evidence, timestamps: np.ndarray, window: Window) -> dict[str, Any]:
    """``highlight.product``: whether and where the product was found in the clip.

    ``box`` is the product's bounding box over the clip's verified frames, as fractions
    of the picture (x, y, w, h in [0, 1]); ``boxes`` the per-frame boxes (time, box) of
    verified frames; ``colour_boxes`` where the product's colours are in the clip's
    other frames, when its colour evidence counts (from the colour cells, refined below
    the cell; what reframing follows where geometry did not verify the product), and in
    verified frames whose homography rests on fewer than :data:`PRECISE_INLIERS`
    inliers (those frames are then not in ``boxes``): each frame is in one list.
    """
    t = np.asarray(timestamps, float)
    inside = (t >= window.start_s - 1e-9) & (t < window.end_s - 1e-9)
    verified = ev.verified
    x0, y0, w, h = (float(v) for v in ev.content)

    def entry(i: int, quad: np.ndarray) -> dict[str, Any]:
        lo = np.clip((quad.min(axis=0) - [x0, y0]) / [w, h], 0, 1)
        hi = np.clip((quad.max(axis=0) - [x0, y0]) / [w, h], 0, 1)
        return {"t": round(float(t[i]), 3), "box": [round(float(v), 4) for v in (*lo, *(hi - lo))]}

    best_inliers = ev.inliers.max(axis=1) if ev.inliers.size else np.zeros(len(t), int)
    per_frame: list[dict[str, Any]] = []
    by_colour: list[dict[str, Any]] = []
    seen: list[dict[str, Any]] = []  # every verified frame's box
    for i in np.nonzero(inside)[0].tolist() if len(verified) else []:
        quad = ev.boxes[i] if verified[i] else None
        where = ev.colour_boxes[i] if i < len(ev.colour_boxes) else None
        if quad is not None:
            seen.append(entry(i, quad))
        if quad is not None and (
            where is None or best_inliers[i] >= PRECISE_INLIERS or _area(where) > _area(quad)
        ):
            per_frame.append(seen[-1])
        elif where is not None:
            by_colour.append(entry(i, where))
    box = None
    if seen:
        arr = np.array([f["box"] for f in seen])
        lo = arr[:, :2].min(axis=0)
        hi = (arr[:, :2] + arr[:, 2:]).max(axis=0)
        box = [round(float(v), 4) for v in (*lo, *(hi - lo))]
    n_in = int(inside.sum())
    return {
        "found": bool(window.found),
        "score": round(float(window.score), 4),
        "frames": n_in,
        "verified_frames": int((inside & verified).sum()) if len(verified) else 0,
        "mean_inliers": round(float(best_inliers[inside].mean()), 2) if n_in else 0.0,
        "box": box,
        "boxes": per_frame,
        "colour_boxes": by_colour,
    }
