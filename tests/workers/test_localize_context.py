"""Product photos cropped tight: :func:`workers.localize.without_context`.

The pictures are painted pixel by pixel (colour-bin indices) and pooled into cells as
the daemon's localizer pools them (:mod:`tests.workers.test_localize_refine`'s
``pooled``), so the checks run against pixels, not against the model under test.
"""

from __future__ import annotations

import numpy as np

from tests.workers.test_localize_refine import CELL, SIDE, paint_product, pooled
from workers import localize

WHOLE = np.array([0, 0, SIDE, SIDE])
PRODUCT = (70.0, 80.0, 150.0, 120.0)  # x, y, w, h in the product photo


def scene(bins: np.ndarray) -> None:
    """The photo's surroundings: stripes of two colours the product does not have."""
    bins[:] = 14
    bins[::3] = 12


def whole(bins: np.ndarray) -> np.ndarray:
    """Cells of a picture none of which is backdrop."""
    return pooled(bins, np.ones((SIDE, SIDE), np.float32))


def tight_photo() -> np.ndarray:
    """A product photo with no plain backdrop: the product inside a textured scene."""
    bins = np.zeros((SIDE, SIDE), np.int64)
    scene(bins)
    paint_product(bins, *PRODUCT)
    return whole(bins)


def frame_with(cut_out: bool, shown: bool = True) -> np.ndarray:
    """A 16:9 frame (letterboxed square buffer) on a plain scene of another colour."""
    bins = np.full((SIDE, SIDE), 20, np.int64)
    if shown:
        x0, y0, w, h = 90.0, 100.0, 100.0, 80.0
        if not cut_out:  # the photo shown whole, its scene around the product
            m = 0.45
            sub = np.zeros((SIDE, SIDE), np.int64)
            scene(sub)
            yy, xx = np.mgrid[0:SIDE, 0:SIDE]
            px = (xx >= x0 - m * w) & (xx < x0 + w * (1 + m))
            px &= (yy >= y0 - m * h) & (yy < y0 + h * (1 + m))
            bins[px] = sub[px]
        paint_product(bins, x0, y0, w, h)
    return whole(bins)


def score(cells: np.ndarray, model: localize.ProductModel) -> float:
    content = np.array([0.0, 63.0, SIDE, 162.0])
    cc = localize.content_cells(content, CELL)
    palette = cells[cc[1] : cc[3], cc[0] : cc[2]].sum((0, 1))
    palette /= palette.sum()
    wb = model.hist / np.maximum(model.hist + palette, 1e-6)
    return localize.colour_match(cells, model, cc, wb)[0]


def test_the_surroundings_colours_are_left_out_and_the_products_kept() -> None:
    cells = tight_photo()
    bare = localize.without_context(cells, WHOLE, SIDE)
    assert bare is not None
    kept = bare.sum((0, 1))
    assert kept[12] == 0 and kept[14] == 0  # the scene's stripes
    for b in (0, 3, 8):  # the product's three colours, untouched
        assert np.isclose(kept[b], cells[..., b].sum())
    # the bare model's box is the product's, not the whole photo's
    model = localize.product_model(bare, WHOLE, SIDE)
    x0, y0 = model.outline[0]
    x1, y1 = model.outline[2]
    px, py, pw, ph = PRODUCT
    assert abs(x0 - px) <= CELL and abs(x1 - (px + pw)) <= CELL, model.outline
    assert abs(y0 - py) <= CELL and abs(y1 - (py + ph)) <= CELL, model.outline
    full = localize.product_model(cells, WHOLE, SIDE)
    assert full.outline[2, 0] - full.outline[0, 0] > 1.5 * (x1 - x0)


def test_a_product_cut_out_of_its_photo_matches_the_bare_view_the_photo_whole_both() -> None:
    cells = tight_photo()
    full = localize.product_model(cells, WHOLE, SIDE)
    bare_cells = localize.without_context(cells, WHOLE, SIDE)
    assert bare_cells is not None
    bare = localize.product_model(bare_cells, WHOLE, SIDE)
    cut = frame_with(cut_out=True)
    assert score(cut, bare) > 0.85
    assert score(cut, bare) > score(cut, full) + 0.25
    shown_whole = frame_with(cut_out=False)
    assert max(score(shown_whole, full), score(shown_whole, bare)) > 0.8
    # and neither view finds a product that is not there
    empty = frame_with(cut_out=True, shown=False)
    assert max(score(empty, full), score(empty, bare)) < 0.2


def test_pictures_with_a_backdrop_left_out_get_no_second_view() -> None:
    bins = np.full((SIDE, SIDE), 26, np.int64)
    mask = paint_product(bins, *PRODUCT)
    cells = pooled(bins, mask.astype(np.float32))  # the daemon left the backdrop out
    assert localize.without_context(cells, WHOLE, SIDE) is None
    # a photo all of one scene (no colour rarer on its edge) gets none either
    flat = np.zeros((SIDE, SIDE), np.int64)
    scene(flat)
    assert localize.without_context(whole(flat), WHOLE, SIDE) is None
