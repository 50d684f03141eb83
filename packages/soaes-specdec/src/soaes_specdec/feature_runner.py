"""A `FeatureDraft` ready to decode: its 1-layer model as a `CachedCausalLM` (stream projections on the fp32 CPU,
restricted head, per-row cache pointers) plus `fc`.

One draft step is fc(cat(embed(token), feature)) -> the layer -> the draft's norm -> the head, returning the
logits and the post-norm state g, which is the next step's feature. The decoder (`decoding.SpeculativeDecoder`)
feeds it the target's true features where it has them (prefill, and the catch-up after each verify) and g for
the speculative steps in between.
"""

from __future__ import annotations

import torch

from soaes_core.errors import InvalidArgumentError

from .feature_draft import FeatureDraft
from .kv_cache import StaticKVCache
from .runner import CachedCausalLM, stream_linear


class FeatureDraftRunner:
    """Cached decoding steps of a `FeatureDraft` (the draft side of feature-conditioned speculative decoding)."""

    def __init__(self, draft: FeatureDraft, linear: str = "auto") -> None:
        if not isinstance(draft, FeatureDraft):
            raise InvalidArgumentError(f"FeatureDraftRunner needs a FeatureDraft, got {type(draft).__name__}")
        self.draft = draft
        self.lm = CachedCausalLM(draft.lm, linear=linear)
        self._linear = stream_linear if self.lm.linear_mode == "stream" else None
        self.hidden_size = draft.hidden_size
        self.vocab_size = self.lm.vocab_size
        self.device, self.dtype = self.lm.device, self.lm.dtype

    @property
    def cache(self) -> StaticKVCache | None:
        return self.lm.cache

    def start(self, batch: int, capacity: int) -> StaticKVCache:
        """(Re)use the layer's cache for `batch` rows of up to `capacity` tokens, emptied."""
        return self.lm.start(batch, capacity)

    def num_parameter_bytes(self) -> int:
        """Bytes of the draft's weights: the 1-layer model's (embeddings and head included) and fc's. A step reads
        less: one embedding row, not the matrix (unless it is tied to the head)."""
        return self.lm.num_parameter_bytes() + sum(p.numel() * p.element_size() for p in self.draft.fc.parameters())

    def step(self, features: torch.Tensor, tokens: torch.Tensor, starts: torch.Tensor,
             logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft positions starts[b].. of each row with inputs (features [B, T, H], tokens [B, T]); returns fp32 logits
        and the post-norm states g ([B, T, V] / [B, T, H], or [B, V] / [B, H] at `logits_at`). K/V are written
        into the cache; the caller moves its lengths."""
        embeds = self.draft.input_embeds(features, tokens, linear=self._linear)
        logits, hidden = self.lm.forward(tokens, starts, logits_at=logits_at, inputs_embeds=embeds, return_hidden=True)
        return logits, hidden
