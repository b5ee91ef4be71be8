"""Each way the whole-frame scorer failed on real footage, against the product localizer.

Cases from the quality benchmark's set (real photographs composited into real footage,
:mod:`clipline_bench.quality_cases`), run through the workers' real decoder and
selection with the daemon's models in this process (:func:`clipline_bench.quality.run_case`).
Each test asserts that today's localizer picks a true window (or says "not found")
*and* that the whole-frame colour scorer it replaced does not, so the test would fail
if the localizer regressed to the old behaviour.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipline_bench import quality, quality_cases
from clipline_core.settings import Settings
from gpu_service.models import BuildContext, build
from workers import localize

CPU = torch.device("cpu")

#: failure mode -> the case that shows it
FAILURE_MODES = {
    "a small moving product is outvoted by the background": "c01_moving_fish_megamind",
    "a full-frame look-alike palette elsewhere wins": "h07_fruits_vs_orange_fullframe",
    "a low-texture product is found by colour over regions": "c15_apple_lowtex",
    "a white scene matches the product photo's white backdrop": "h05_shapes_white_scene",
    "a short appearance loses to busier footage": "c08_three_seconds",
    "an occluded product among film footage": "h03_squirrel_occluded",
    "a product never shown is reported as not found": "c18_absent",
    "a tight product photo's scene is not in the video (cut out, dimmed)": "c16_orange_relit",
}


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Settings, list, list]:
    settings = Settings(localizer_features="sift_cv2", decode_segments=1, device="cpu")
    ctx = BuildContext(settings, CPU)
    return (
        tmp_path_factory.mktemp("quality-cases"),
        settings,
        [build("localizer", ctx)],
        [build("features", ctx)],
    )


@pytest.mark.parametrize("mode", list(FAILURE_MODES))
def test_the_localizer_fixes_what_the_whole_frame_scorer_got_wrong(
    mode: str, runner: tuple[Path, Settings, list, list]
) -> None:
    out, settings, localizer, features = runner
    name = FAILURE_MODES[mode]
    cases, skipped = quality_cases.build_cases(out, only=[name])
    if not cases:
        pytest.skip(f"{name}: {dict(skipped).get(name, 'not built')}")
    row = quality.run_case(cases[0], settings, localizer, features, CPU)
    new, old = row["localizer"], row["whole_frame"]
    assert new["hit"], (mode, row)
    assert not old["hit"], (mode, "the old scorer was right here: the case shows nothing", row)
    if cases[0].windows:
        assert new["found"] and new["score"] >= localize.FOUND_MIN
    else:
        assert not new["found"] and new["score"] < localize.FOUND_MIN
