"""Which box says where the product is in a frame: :func:`workers.localize.summary`.

A homography from few inliers passes the checks yet can land the outline tens of
pixels off (a product with little texture); there the frame's refined colour box, when
it is the tighter of the two, is what reframing follows. Evidence is built directly:
the policy under test reads nothing else.
"""

from __future__ import annotations

import numpy as np

from workers import localize


def square(x: float, y: float, w: float, h: float) -> np.ndarray:
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float32)


def evidence(inliers: list[int], quads: list, colour: list) -> localize.Evidence:
    n = len(inliers)
    inl = np.array(inliers).reshape(n, 1)
    geo = np.where(inl >= 10, 0.9, 0.0).astype(np.float64)
    return localize.Evidence(
        inliers=inl,
        geo_conf=geo,
        colour_conf=np.ones((n, 1)),
        evidence=np.ones(n),
        boxes=quads,
        content=np.array([0.0, 0.0, 100.0, 100.0]),
        colour_boxes=colour,
    )


def test_each_frame_is_in_one_list_and_few_inliers_yield_to_a_tighter_colour_box() -> None:
    wide, tight, wider = square(10, 10, 60, 60), square(20, 20, 30, 30), square(0, 0, 90, 90)
    few, many = localize.PRECISE_INLIERS - 5, localize.PRECISE_INLIERS + 5
    ev = evidence(
        [few, many, few, few, 0],
        [wide, wide, wide, wide, None],
        [tight, tight, wider, None, tight],
    )
    t = np.arange(5) * 0.25
    out = localize.summary(ev, t, localize.Window(0.0, 5.0, 1.0, True))
    in_boxes = {b["t"] for b in out["boxes"]}
    in_colour = {b["t"] for b in out["colour_boxes"]}
    assert in_boxes == {0.25, 0.5, 0.75}  # many inliers; colour box wider; no colour box
    assert in_colour == {0.0, 1.0}  # few inliers and a tighter colour box; unverified
    assert not in_boxes & in_colour
    assert next(b for b in out["colour_boxes"] if b["t"] == 0.0)["box"] == [0.2, 0.2, 0.3, 0.3]
    # the clip's box still spans every verified frame's outline
    assert out["box"] == [0.1, 0.1, 0.6, 0.6] and out["verified_frames"] == 4
