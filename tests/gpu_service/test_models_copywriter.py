"""The ``copywriter`` text model: greedy, bounded, KV-cached GPT-2 captions.

A tiny GPT-2 and a byte-level BPE tokenizer are trained here in a second on one
product text, then saved as a Hugging Face directory, which is exactly what a real
GPT-2 directory in ``weights_dir`` looks like to the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from clipline.config import Settings
from gpu_service.models import BuildContext, build_text
from gpu_service.models.common import seeded
from gpu_service.models.copywriter import CopywriterModel, caption_prompt

CPU = torch.device("cpu")
TITLE, DESCRIPTION, CAPTION = "Red running shoe", "Light and fast.", "Run faster in red"


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: a second thread only adds synchronisation cost."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    text = caption_prompt(TITLE, DESCRIPTION) + f" {CAPTION}\n"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [text, caption_prompt("Blue hat")] * 8,
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<|endoftext|>"],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=128,
        n_embd=48,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    with seeded(5):
        model = GPT2LMHeadModel(config)
        ids = torch.tensor([tok.encode(text)])
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(40):  # memorise the one example
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    directory = tmp_path_factory.mktemp("weights") / "gpt2"
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


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
