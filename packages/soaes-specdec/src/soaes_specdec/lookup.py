"""Prompt-lookup proposals: continue the text with what followed an earlier occurrence of its last n-gram."""

from __future__ import annotations

import torch


def find_ngram_continuation(tokens: list[int], num_tokens: int, max_ngram: int, min_ngram: int = 1) -> list[int]:
    """Up to `num_tokens` tokens that followed the most recent earlier match of the longest suffix n-gram.

    Tries n-gram sizes max_ngram..min_ngram (longest first, as in prompt-lookup decoding); returns [] when no
    earlier occurrence exists.
    """
    length = len(tokens)
    for size in range(min(max_ngram, length - 1), max(min_ngram, 1) - 1, -1):
        suffix = tokens[length - size:]
        for start in range(length - size - 1, -1, -1):
            if tokens[start:start + size] == suffix:
                follow = tokens[start + size:start + size + num_tokens]
                if follow:
                    return follow
    return []


def propose_ngram_continuations(tokens: torch.Tensor, lengths: torch.Tensor, active: torch.Tensor,
                                num_tokens: int, max_ngram: int, min_ngram: int = 1,
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row proposals from `tokens[b, :lengths[b]]`: (drafts [B, w] right-padded with 0, counts [B])."""
    rows = []
    for row, n_tok, live in zip(tokens.tolist(), lengths.tolist(), active.tolist(), strict=False):
        rows.append(find_ngram_continuation(row[:n_tok], num_tokens, max_ngram, min_ngram) if live else [])
    width = max(len(r) for r in rows)
    drafts = torch.zeros((len(rows), width), dtype=torch.long, device=tokens.device)
    for b, r in enumerate(rows):
        if r:
            drafts[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    counts = torch.tensor([len(r) for r in rows], dtype=torch.long, device=tokens.device)
    return drafts, counts
