"""The worker <-> daemon protocol: declared output names, typed views of the wire messages.

Real models (small configurations, random weights) on the CPU; messages built by the
same function the daemon's publisher uses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipline_core.settings import Settings
from gpu_service import protocol
from gpu_service.models import BuildContext, available, build

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", [n for n in available() if n in ("features", "embed")])
def test_every_builtin_model_returns_exactly_its_declared_outputs(name: str) -> None:
    settings = Settings(embed_arch="vit_ti16", embed_size=32)
    model = build(name, BuildContext(settings, CPU))
    assert model.outputs is not None and model.outputs.model == name
    frames = torch.randint(0, 255, (1, 2, 64, 64, 3), dtype=torch.uint8)
    out = model(frames)
    assert set(out) == set(model.outputs.keys)


def test_output_names_refuse_an_unknown_key() -> None:
    assert protocol.FEATURES["hist"] == "features.hist"
    with pytest.raises(KeyError, match="no output"):
        protocol.FEATURES["histogram"]


def _message(kind: str, chunk: int, values: np.ndarray, trusted: bool = True) -> dict:
    return protocol.result_message(
        job_id="j",
        generation=8,
        chunk=chunk,
        kind=kind,
        frames=len(values),
        outputs={protocol.FEATURES["motion"]: values},
        trusted={"features": trusted},
        backends={"features": "eager"},
        device="cpu",
        queue_wait_s=0.0,
        inference_s=0.0,
        latency_s=0.0,
        batch=1,
        batch_seq=chunk,
    )


def test_job_results_order_chunks_and_concatenate_outputs() -> None:
    msgs = [
        _message("frames", 1, np.array([3.0, 4.0], np.float32)),
        _message("refs", -1, np.array([9.0], np.float32)),
        _message("frames", 0, np.array([1.0, 2.0], np.float32)),
    ]
    res = protocol.JobResults.from_messages(msgs)
    assert [r.chunk for r in res.frames] == [0, 1]
    motion = res.concat(protocol.FEATURES["motion"])
    assert motion is not None and motion.tolist() == [1.0, 2.0, 3.0, 4.0]
    ref = res.ref(protocol.FEATURES["motion"])
    assert ref is not None and ref.tolist() == [9.0]
    assert res.concat(protocol.FEATURES["hist"]) is None
    assert res.trusted("features") and not res.trusted("saliency")


def test_job_results_refuse_two_reference_chunks() -> None:
    refs = _message("refs", -1, np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="at most one"):
        protocol.JobResults.from_messages([refs, refs])
