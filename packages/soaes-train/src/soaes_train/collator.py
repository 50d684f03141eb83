"""Batch collators: packed rows (no padding inside a sequence, no cross-sequence attention) and padded rows.

A packed row holds several sequences back to back, with `position_ids` restarting at 0 for each one and
the first label of each sequence set to -100. Two layouts give the model the same, exact computation:

* `rows` (SDPA / eager): a `[batch, longest_row]` tensor. Short rows are filled with one extra padding
  *segment* (its own position_ids 0.., labels -100) instead of an attention mask, so transformers' masking
  utilities detect the packed format from `position_ids` and build a block-diagonal causal mask.
* `flatten` (flash-attention 2): all rows concatenated into `[1, total_tokens]` (batch size > 1 without
  padding), plus `cu_seq_lens_q/k` and `max_length_q/k` for the varlen kernel.

Either way the model must run with `use_cache=False` (a cache disables packed-sequence detection; the
trainer enforces it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from soaes_data.packing import IGNORE_INDEX as IGNORE_INDEX  # defined once in soaes-data; re-exported

PackedLayout = Literal["rows", "flatten"]


def _as_list(x: Any) -> list[int]:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def segment_lengths(position_ids: Sequence[int]) -> list[int]:
    """Lengths of the sequences in a packed row, read from where `position_ids` restart at 0."""
    lengths: list[int] = []
    for k, p in enumerate(position_ids):
        if p == 0 or k == 0:
            lengths.append(1)
        else:
            lengths[-1] += 1
    return lengths


def _row(feature: Mapping[str, Any]) -> tuple[list[int], list[int], list[int]]:
    ids = _as_list(feature["input_ids"])
    labels = _as_list(feature["labels"]) if feature.get("labels") is not None else list(ids)
    pos = _as_list(feature["position_ids"]) if feature.get("position_ids") is not None else list(range(len(ids)))
    if not (len(ids) == len(labels) == len(pos)):
        raise ValueError(f"row lengths differ: input_ids {len(ids)}, labels {len(labels)}, position_ids {len(pos)}")
    # the first token of every sequence is never a target (the previous sequence must not predict it)
    labels = [IGNORE_INDEX if p == 0 else lab for p, lab in zip(pos, labels, strict=True)]
    return ids, labels, pos


@dataclass
class PackedCollator:
    """Collate packed rows (`input_ids`, optional `labels`, optional `position_ids`) for exact packed attention.

    `layout="rows"` pads short rows with a separate padding segment (SDPA/eager); `layout="flatten"` joins
    the batch into one row and adds flash-attention varlen kwargs. `pad_to_multiple_of` rounds the row
    length up (rows layout).
    """

    pad_token_id: int
    layout: PackedLayout = "rows"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        rows = [_row(f) for f in features]
        if not rows:
            raise ValueError("empty batch")
        if self.layout == "flatten":
            return self._flatten(rows)
        return self._rows(rows)

    def _rows(self, rows: list[tuple[list[int], list[int], list[int]]]) -> dict[str, Any]:
        width = max(len(r[0]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids_b, lab_b, pos_b = [], [], []
        for ids, labels, pos in rows:
            pad = width - len(ids)
            ids_b.append(ids + [self.pad_token_id] * pad)
            lab_b.append(labels + [IGNORE_INDEX] * pad)
            pos_b.append(pos + list(range(pad)))  # padding is its own segment: real tokens never see it
        return {"input_ids": torch.tensor(ids_b, dtype=torch.long), "labels": torch.tensor(lab_b, dtype=torch.long),
                "position_ids": torch.tensor(pos_b, dtype=torch.long)}

    def _flatten(self, rows: list[tuple[list[int], list[int], list[int]]]) -> dict[str, Any]:
        ids = [t for r in rows for t in r[0]]
        labels = [t for r in rows for t in r[1]]
        pos = [t for r in rows for t in r[2]]
        lengths = segment_lengths(pos)
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        cu_t = torch.tensor(cu, dtype=torch.int32)
        return {"input_ids": torch.tensor([ids], dtype=torch.long), "labels": torch.tensor([labels], dtype=torch.long),
                "position_ids": torch.tensor([pos], dtype=torch.long), "cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t,
                "max_length_q": max(lengths), "max_length_k": max(lengths)}


@dataclass
class PaddedCollator:
    """Collate one sequence per row, right-padded to the longest row, with an attention mask (no packing)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        rows = []
        for f in features:
            ids = _as_list(f["input_ids"])
            labels = _as_list(f["labels"]) if f.get("labels") is not None else list(ids)
            if labels:
                labels[0] = IGNORE_INDEX
            rows.append((ids, labels))
        width = max(len(r[0]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids_b = [ids + [self.pad_token_id] * (width - len(ids)) for ids, _ in rows]
        lab_b = [lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows]
        mask = [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]
        return {"input_ids": torch.tensor(ids_b, dtype=torch.long), "labels": torch.tensor(lab_b, dtype=torch.long),
                "attention_mask": torch.tensor(mask, dtype=torch.long)}
