"""The ``copywriter`` text model: greedy, bounded, KV-cached GPT-2 captions.

A tiny GPT-2 and a byte-level BPE tokenizer are trained in a second on one product
text (``gpt2lib.shared_weights``, once per session), then saved as a Hugging
Face directory, which is exactly what a real GPT-2 directory in ``weights_dir`` looks
like to the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gpt2lib import CAPTION, DESCRIPTION, TITLE, shared_weights

from clipline_core.settings import Settings
from gpu_service.models import BuildContext, build_text
from gpu_service.models.copywriter import CopywriterModel, caption_prompt

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: a second thread only adds synchronisation cost."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gpt2_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_weights(tmp_path_factory)


@pytest.fixture(scope="module")
def gpt2_dir(gpt2_weights: Path) -> Path:
    return gpt2_weights / "gpt2"


@pytest.fixture(scope="module")
def writer(gpt2_dir: Path) -> CopywriterModel:
    return CopywriterModel(CPU, gpt2_dir, max_new_tokens=16)


def test_writes_the_caption_and_stops_at_the_line_end(writer: CopywriterModel) -> None:
    assert writer.weights_loaded
    assert writer.captions([(TITLE, DESCRIPTION)]) == [CAPTION]


def test_deterministic_and_batch_independent(writer: CopywriterModel) -> None:
    prompts = [caption_prompt("Blue hat"), caption_prompt(TITLE, DESCRIPTION)]
    batched = writer.generate_ids(prompts)
    assert batched == writer.generate_ids(prompts)
    # Left padding must not change a row's continuation.
    assert batched == [writer.generate_ids([p])[0] for p in prompts]


def test_kv_cache_equals_recomputing_the_whole_sequence(writer: CopywriterModel) -> None:
    prompt = caption_prompt("Blue hat")
    ids = writer.tokenizer.encode(prompt)
    stops = set(writer.stop_ids.tolist())
    expected: list[int] = []
    with torch.inference_mode():
        for _ in range(writer.max_new_tokens):
            logits = writer.model(input_ids=torch.tensor([ids + expected])).logits
            nxt = int(logits[0, -1].argmax())
            if nxt in stops:
                break
            expected.append(nxt)
    assert writer.generate_ids([prompt]) == [expected]


def test_bounded_tokens(gpt2_dir: Path) -> None:
    short = CopywriterModel(CPU, gpt2_dir, max_new_tokens=2)
    ids = short.generate_ids([caption_prompt(TITLE, DESCRIPTION)])[0]
    assert 1 <= len(ids) <= 2
    caption = short.captions([(TITLE, DESCRIPTION)])[0]
    assert caption and CAPTION.startswith(caption)


def test_without_weights_captions_are_null(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    m = build_text("copywriter", BuildContext(Settings(), CPU))
    assert not m.weights_loaded
    assert "captions stay null" in caplog.text
    assert m.generate([caption_prompt(TITLE), "x"]) == [None, None]
    # The placeholder still decodes (benchmarks), greedily and boundedly.
    assert isinstance(m, CopywriterModel)
    ids = m.generate_ids(["hello"])
    assert ids == m.generate_ids(["hello"]) and len(ids[0]) <= m.max_new_tokens


def test_registry_loads_gpt2_directory(gpt2_dir: Path) -> None:
    m = build_text("copywriter", BuildContext(Settings(weights_dir=str(gpt2_dir.parent)), CPU))
    assert m.weights_loaded and m.name == "copywriter"


def test_prompt_is_bounded() -> None:
    p = caption_prompt("t" * 1000, "d" * 5000)
    assert p.endswith("Catchy one-line video caption:")
    assert len(p) < 900
