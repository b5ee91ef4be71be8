"""``copywriter``: GPT-2 writes a one-line caption for a highlight from its product text.

Weights are a Hugging Face GPT-2 directory (``config.json``, ``model.safetensors`` or
``pytorch_model.bin``, and the tokenizer files) at ``Settings.weights_dir/copywriter``
or ``Settings.weights_dir/gpt2``, loaded with ``local_files_only``: nothing is ever
downloaded at run time. Without it a tiny deterministic GPT-2 (byte-level vocabulary)
is built so the decoding path still runs (tests, benchmarks), and :meth:`generate`
returns ``None`` for every prompt (the job's caption stays null).

Decoding is batched greedy search with a KV cache: prompts are left-padded, one
prefill pass fills the cache, then one token per step for every unfinished row until
end-of-text, a newline, or ``max_new_tokens``. The caption is the first line of the
continuation, stripped, at most ``MAX_CAPTION_CHARS`` characters; empty → ``None``.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch

from gpu_service.models.base import BuildContext
from gpu_service.models.common import seeded, setting
from gpu_service.models.text import TextModel, register_text
from gpu_service.models.weights import WeightsError, find_weights

log = logging.getLogger(__name__)

WEIGHT_DIRS = ("copywriter", "gpt2")
MAX_CAPTION_CHARS = 120
MAX_TITLE_CHARS = 200
MAX_DESCRIPTION_CHARS = 600


def caption_prompt(title: str, description: str = "") -> str:
    """The prompt for one highlight (long fields are cut, the cue line is kept)."""
    title = " ".join(title.split())[:MAX_TITLE_CHARS]
    description = " ".join(description.split())[:MAX_DESCRIPTION_CHARS]
    lines = [f"Product: {title}"]
    if description:
        lines.append(f"Description: {description}")
    lines.append("Catchy one-line video caption:")
    return "\n".join(lines)


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, id 256 is end-of-text (placeholder model only)."""

    eos_token_id = 256
    vocab_size = 257

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class CopywriterModel(TextModel):
    """Greedy GPT-2 captioning (see the module docstring)."""

    name = "copywriter"

    def __init__(
        self,
        device: torch.device,
        directory: Path | None = None,
        *,
        max_new_tokens: int = 24,
        max_prompt_tokens: int = 256,
    ) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        self.device = device
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizer: Any
        if directory is not None:
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(
                    str(directory), local_files_only=True
                )
                model = GPT2LMHeadModel.from_pretrained(str(directory), local_files_only=True)
            except (OSError, ValueError) as exc:
                raise WeightsError(f"cannot load GPT-2 from {directory}: {exc}") from exc
            self.weights_loaded = True
            log.info("copywriter: loaded GPT-2 from %s", directory)
        else:
            self.tokenizer = ByteTokenizer()
            config = GPT2Config(
                vocab_size=ByteTokenizer.vocab_size,
                n_positions=512,
                n_embd=64,
                n_layer=2,
                n_head=2,
                bos_token_id=ByteTokenizer.eos_token_id,
                eos_token_id=ByteTokenizer.eos_token_id,
            )
            with seeded():
                model = GPT2LMHeadModel(config)
            self.weights_loaded = False
            log.info(
                "copywriter: no GPT-2 directory (looked for %s in weights_dir); tiny "
                "deterministic model, captions stay null",
                " or ".join(WEIGHT_DIRS),
            )
        self.model = model.eval().to(device)
        eos: Any = self.tokenizer.eos_token_id
        if eos is None:
            eos = model.config.eos_token_id
        self.eos_id = int(eos)
        self.pad_id = self.eos_id
        self.context = int(model.config.n_positions)
        self.stop_ids = self._stop_ids()
        params = inspect.signature(type(self.model).forward).parameters
        # transformers renamed ``past_key_values`` to ``cache``; support both.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._extra: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _stop_ids(self) -> torch.Tensor:
        """Token ids ending a caption: end-of-text and every token containing a newline."""
        vocab = min(int(self.model.config.vocab_size), len(self.tokenizer))
        singles = [[i] for i in range(vocab)]
        if hasattr(self.tokenizer, "batch_decode"):
            texts = list(self.tokenizer.batch_decode(singles))
        else:
            texts = [self.tokenizer.decode(ids) for ids in singles]
        ids = {i for i, s in enumerate(texts) if "\n" in s} | {self.eos_id}
        return torch.tensor(sorted(ids), device=self.device)

    @staticmethod
    def _cache_of(result: Any) -> Any:
        cache = getattr(result, "cache", None)
        return cache if cache is not None else result.past_key_values

    def captions(self, items: list[tuple[str, str]]) -> list[str | None]:
        """Captions for ``(title, description)`` pairs."""
        return self.generate([caption_prompt(t, d) for t, d in items])

    def generate(self, prompts: list[str]) -> list[str | None]:
        if not self.weights_loaded:
            return [None] * len(prompts)
        return self.generate_unchecked(prompts)

    def generate_unchecked(self, prompts: list[str]) -> list[str | None]:
        """Decode even with placeholder weights (benchmarks and tests)."""
        if not prompts:
            return []
        ids = self.generate_ids(prompts)
        out: list[str | None] = []
        for row in ids:
            text = self.tokenizer.decode(row).split("\n", 1)[0].strip().strip("\"'").strip()
            out.append(text[:MAX_CAPTION_CHARS] or None)
        return out

    @torch.inference_mode()
    def generate_ids(self, prompts: list[str]) -> list[list[int]]:
        """Greedy continuation token ids per prompt (stop token excluded)."""
        budget = min(self.max_prompt_tokens, self.context - self.max_new_tokens)
        encoded = [self.tokenizer.encode(p)[-budget:] or [self.eos_id] for p in prompts]
        n, width = len(encoded), max(len(e) for e in encoded)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, e in enumerate(encoded):  # left padding: every row ends at the same column
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        result = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **self._extra,
        )
        cache = self._cache_of(result)
        nxt = result.logits[:, -1].argmax(-1)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        steps: list[torch.Tensor] = []
        last_pos = positions[:, -1:]
        for step in range(self.max_new_tokens):
            done = done | torch.isin(nxt, self.stop_ids)
            steps.append(torch.where(done, -1, nxt))
            if step == self.max_new_tokens - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
            last_pos = last_pos + 1
            result = self.model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=last_pos,
                use_cache=True,
                **{self._cache_arg: cache},
                **self._extra,
            )
            cache = self._cache_of(result)
            nxt = result.logits[:, -1].argmax(-1)
        table = torch.stack(steps, dim=1).cpu().tolist()
        return [[t for t in row if t >= 0] for row in table]


@register_text("copywriter")
def _build(ctx: BuildContext) -> TextModel:
    settings = ctx.settings
    directory = find_weights(settings, WEIGHT_DIRS)
    return CopywriterModel(
        ctx.device,
        directory if directory is not None and directory.is_dir() else None,
        max_new_tokens=setting(settings, "copywriter_max_new_tokens", 24),
    )
