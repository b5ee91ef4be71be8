"""A tiny GPT-2 saved as a Hugging Face directory, for the copywriter and caption tests.

:func:`train_tiny_gpt2` trains a byte-level BPE tokenizer and a 2-layer GPT-2 in about
a second until the model has memorised one product's caption, then saves both exactly
as a real GPT-2 directory in ``weights_dir`` looks (``config.json``, weights, tokenizer
files), so the copywriter loads it as real weights. :func:`shared_weights` trains
one for ``TITLE``/``DESCRIPTION`` -> ``CAPTION`` once per test session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from gpu_service.models.common import seeded
from gpu_service.models.copywriter import caption_prompt

#: the one product the shared tiny model knows, and its caption
TITLE, DESCRIPTION, CAPTION = "Red running shoe", "Light and fast.", "Run faster in red"
_TRAINED: dict[Path, Path] = {}


def shared_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``weights_dir`` holding ``gpt2/`` (the model above), trained once per session.

    Read-only for the tests that share it.
    """
    base = tmp_path_factory.getbasetemp()
    if base not in _TRAINED:
        root = tmp_path_factory.mktemp("gpt2-weights")
        train_tiny_gpt2(root / "gpt2", TITLE, DESCRIPTION, CAPTION)
        _TRAINED[base] = root
    return _TRAINED[base]


def train_tiny_gpt2(
    directory: Path, title: str, description: str, caption: str, *, steps: int = 40
) -> Path:
    """Train and save a GPT-2 that captions ``(title, description)`` with ``caption``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    text = caption_prompt(title, description) + f" {caption}\n"
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only add contention
    try:
        with seeded(5):
            model = _memorise(GPT2LMHeadModel(config), torch.tensor([tok.encode(text)]), steps)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def _memorise(model: Any, ids: torch.Tensor, steps: int) -> Any:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model
