"""Colour boxes below the cell: :func:`workers.localize.refine_colour_box`.

The frame and the product image are painted pixel by pixel (colour-bin indices) and
pooled into cells exactly as the daemon's localizer pools them (the fraction of each
cell's pixels in each bin), so the test checks the fit against pixels, not against the
model the fit itself uses.
"""

from __future__ import annotations

import numpy as np

from workers import localize

SIDE, GRID, BINS = 288, 16, 27
CELL = SIDE / GRID


def paint_product(canvas: np.ndarray, x0: float, y0: float, w: float, h: float) -> np.ndarray:
    """Paint the product into ``canvas`` (bin indices); returns the mask of its pixels.

    Three colours in an uneven layout (two thirds of one, a right third of another, a
    stripe along the bottom of a third): the product's colour mass is not centred in
    its box, and its edges fall inside the cells.
    """
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64) + 0.5
    u, v = (xx - x0) / w, (yy - y0) / h
    mask = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    canvas[mask & (u <= 0.66)] = 0
    canvas[mask & (u > 0.66)] = 3
    canvas[mask & (v > 0.8)] = 8
    return mask


def pooled(bins: np.ndarray, weight: np.ndarray) -> np.ndarray:
    cells = np.zeros((GRID, GRID, BINS), np.float32)
    cy = (np.arange(SIDE) * GRID // SIDE)[:, None].repeat(SIDE, 1)
    cx = (np.arange(SIDE) * GRID // SIDE)[None, :].repeat(SIDE, 0)
    np.add.at(cells, (cy, cx, bins), weight)
    return cells / (SIDE / GRID) ** 2


def test_the_refined_box_finds_the_products_edges_within_the_cell() -> None:
    ref_bins = np.full((SIDE, SIDE), 26, np.int64)
    ref_mask = paint_product(ref_bins, 20, 50, 248, 186)
    ref = localize.product_model(
        pooled(ref_bins, ref_mask.astype(np.float32)), np.array([0, 0, SIDE, SIDE]), SIDE
    )
    content = np.array([0.0, 63.0, SIDE, 162.0])
    cc = localize.content_cells(content, CELL)
    errors = {"whole": [], "refined": []}
    for x0 in (61.3, 97.0, 130.6, 151.9):
        frame_bins = np.full((SIDE, SIDE), 14, np.int64)
        frame_bins[::2] = 12  # the scene: stripes of two colours the product does not have
        w = 86.0
        paint_product(frame_bins, x0, 110.2, w, w * 186 / 248)
        cells = pooled(frame_bins, np.ones((SIDE, SIDE), np.float32))
        palette = cells[cc[1] : cc[3], cc[0] : cc[2]].sum((0, 1))
        palette /= palette.sum()
        wb = ref.hist / np.maximum(ref.hist + palette, 1e-6)
        score, box = localize.colour_match(cells, ref, cc, wb)
        assert box is not None and score > 0.5
        (fx, fy, fw, fh), iou = localize.refine_colour_box(cells, ref, cc, wb, box)
        assert 0.0 < iou <= 1.0
        truth = np.array([x0, 110.2, x0 + w, 110.2 + w * 186 / 248])
        whole = np.array([box[0], box[1], box[0] + box[2], box[1] + box[3]]) * CELL
        fine = np.array([fx, fy, fx + fw, fy + fh]) * CELL
        errors["whole"].append(np.abs(whole - truth).max())
        errors["refined"].append(np.abs(fine - truth).max())
    # every edge within 6 px (a third of a cell); the whole-cell box is worse
    assert max(errors["refined"]) <= 6.0, errors
    assert np.mean(errors["refined"]) < 0.5 * np.mean(errors["whole"]), errors
