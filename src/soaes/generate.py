"""Single-prompt greedy generation used by `soaes generate` (KV-cached, through transformers)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from soaes_core import encode_chat_prompt, load_model, load_tokenizer
from soaes_core.errors import InvalidArgumentError


@dataclass
class GenerationResult:
    """Decoded new text plus how many tokens and how long."""

    text: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def encode_prompt(tokenizer: object, prompt: str, chat: bool) -> torch.Tensor:
    """Token ids (1, T) of `prompt`, wrapped in the chat template when `chat` and the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        return torch.tensor([encode_chat_prompt(tokenizer, prompt)])
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def generate_text(spec: str, prompt: str, max_new_tokens: int = 64, chat: bool = True) -> GenerationResult:
    """Load `spec`, greedily generate up to `max_new_tokens` for `prompt`, return the decoded text."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    tokenizer = load_tokenizer(spec)
    model = load_model(spec)
    ids = encode_prompt(tokenizer, prompt, chat).to(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    return GenerationResult(tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), seconds)
