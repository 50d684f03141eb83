"""The teacher-logit store: sharded safetensors files of per-position top-k (or dense) teacher logits.

Layout of a store directory::

    store.json            capture settings + one entry per finished shard (file, sha256, counts); rewritten
                          atomically after every shard, so a killed dump resumes at shard granularity
    shard-00000.safetensors[.zst]
    manifest.json         written last (soaes_core manifest): the store is complete only when it exists

Per position t of an example (logits at t predict token t+1) a shard holds, for top-k mode, the k largest
teacher **log-probabilities at τ = 1** in 16 bits (storing log-probs rather than raw logits keeps the likely
tokens, whose log-probs are near 0, precise; log-probs are the logits shifted by a constant, which no
softmax at any τ sees), their token ids bit-packed to ceil(log2 V) bits, and the fp32 full-vocabulary
``logsumexp(logp/τ)`` for every captured τ. Dense mode stores all V log-probs. With ``tail_samples`` s > 0
(format 2) it also holds s token ids per position drawn i.i.d. from the teacher at ``tail_temperature`` τ_s
restricted to the tokens outside the top-k (bit-packed like the top-k ids) and their τ=1 log-probs (16 bits),
from which `losses` builds an unbiased estimate of the divergence's tail. Format-1 stores (no tail samples)
are read unchanged. Examples are addressed by example id and position, so lookups survive shuffling and
packing.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from soaes_core import atomic_write_bytes, atomic_write_json, sha256_bytes
from soaes_core.errors import IntegrityError, InvalidArgumentError

from .bitpack import bits_for_vocab, pack_ids, unpack_ids
from .losses import TopKLogits

STORE_FILE = "store.json"
STORE_FORMAT = 2
READABLE_FORMATS = (1, 2)  # 1: no tail samples; 2: optional tail samples
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
REDO_HINT = ("rerun `soaes-distill dump` with the same settings and output directory: it re-dumps only the shards "
             "that are missing or fail their checksum")


@dataclass
class CaptureSettings:
    """What a store was captured with; training refuses a store whose settings differ from what it expects."""

    model: str
    model_fingerprint: str
    tokenizer_sha256: str
    dataset_sha256: str
    vocab_size: int
    top_k: int  # 0 = dense (all V log-probs)
    dtype: str = "float16"
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    compression: str = "none"  # "none" | "zstd"
    examples_per_shard: int = 256
    tail_samples: int = 0  # s tail ids per position (0 = tail bucket only, as in format 1)
    tail_temperature: float | None = None  # τ_s of the tail samples; default max(temperatures)

    def __post_init__(self) -> None:
        if self.dtype not in VALUE_DTYPES:
            raise InvalidArgumentError(f"dtype must be one of {', '.join(VALUE_DTYPES)}, got {self.dtype!r}")
        if self.compression not in ("none", "zstd"):
            raise InvalidArgumentError(f"compression must be 'none' or 'zstd', got {self.compression!r}")
        if not 0 <= self.top_k <= self.vocab_size:
            raise InvalidArgumentError(f"top-k k={self.top_k} must be in [0, vocab size {self.vocab_size}] "
                                       "(0 = dense)")
        if any(not (isinstance(t, (int, float)) and t > 0) for t in self.temperatures):
            raise InvalidArgumentError(f"temperatures must be > 0, got {self.temperatures}")
        if self.examples_per_shard < 1:
            raise InvalidArgumentError(f"examples_per_shard must be ≥ 1, got {self.examples_per_shard}")
        if not self.temperatures:
            raise InvalidArgumentError("at least one capture temperature is needed")
        self.temperatures = sorted({float(t) for t in self.temperatures})
        self._check_tail()

    def _check_tail(self) -> None:
        s = self.tail_samples
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise InvalidArgumentError(f"tail_samples must be an int ≥ 0, got {s!r}")
        if s and (self.dense or self.top_k >= self.vocab_size):
            raise InvalidArgumentError(f"tail_samples needs a top-k store with k < vocab size {self.vocab_size} "
                                       f"(got top_k={self.top_k}): there is no tail to sample")
        if self.tail_temperature is None:
            if s:
                self.tail_temperature = self.temperatures[-1]
            return
        tau = self.tail_temperature
        match = [t for t in self.temperatures if isinstance(tau, (int, float)) and math.isclose(t, tau, rel_tol=1e-6)]
        if not match:
            raise InvalidArgumentError(f"tail_temperature {tau!r} must be one of the captured temperatures "
                                       f"{self.temperatures}")
        self.tail_temperature = match[0]

    @property
    def dense(self) -> bool:
        return self.top_k == 0

    @property
    def index_bits(self) -> int:
        return bits_for_vocab(self.vocab_size)

    def bytes_per_position(self) -> float:
        """Uncompressed payload bytes per stored position (values + packed ids + logsumexps + tail samples)."""
        width = VALUE_DTYPES[self.dtype].itemsize
        if self.dense:
            return self.vocab_size * width + 4 * len(self.temperatures)
        per_id = width + self.index_bits / 8  # one stored log-prob + one packed id, top-k or tail sample alike
        return (self.top_k + self.tail_samples) * per_id + 4 * len(self.temperatures)

    @property
    def tail_column(self) -> int | None:
        """Column of the tail temperature τ_s in the stored logsumexps (None without tail samples)."""
        if not self.tail_samples:
            return None
        return next(i for i, t in enumerate(self.temperatures) if math.isclose(t, self.tail_temperature, rel_tol=1e-6))


def settings_mismatch(stored: CaptureSettings, **expected: Any) -> list[str]:
    """Human-readable differences between a store's settings and expected values (None = don't care)."""
    out = []
    for name, want in expected.items():
        if want is None:
            continue
        if name == "temperature":
            if not any(math.isclose(float(want), t, rel_tol=1e-6) for t in stored.temperatures):
                out.append(f"temperature {want} was not captured (captured: {stored.temperatures})")
            continue
        have = getattr(stored, name)
        if have != want:
            out.append(f"{name}: store has {have!r}, expected {want!r}")
    return out


# ---- encoding of one shard ----------------------------------------------------------------------------------

def _packed(ids: np.ndarray, bits: int) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(pack_ids(ids, bits), dtype=np.uint8).copy())


def encode_shard(settings: CaptureSettings, example_ids: list[int],
                 per_example: list[dict[str, torch.Tensor]]) -> bytes:
    """Serialise examples to shard bytes. Each `per_example` item has `values` (L, k or V) log-probs at τ=1,
    `indices` (L, k) for top-k mode, `logsumexp` (L, T) fp32 for `settings.temperatures`, and with tail
    samples `tail_indices` (L, s) and `tail_values` (L, s) τ=1 log-probs."""
    dtype = VALUE_DTYPES[settings.dtype]
    lengths = [int(ex["values"].shape[0]) for ex in per_example]
    values = torch.cat([ex["values"] for ex in per_example]).to(dtype).contiguous()
    lse = torch.cat([ex["logsumexp"] for ex in per_example]).float().contiguous()
    tensors = {
        "example_ids": torch.tensor(example_ids, dtype=torch.int64),
        "lengths": torch.tensor(lengths, dtype=torch.int64),
        "values": values,
        "logsumexp": lse,
    }
    if not settings.dense:
        idx = torch.cat([ex["indices"] for ex in per_example]).numpy()
        tensors["indices_packed"] = _packed(idx, settings.index_bits)
    if settings.tail_samples:
        tensors["tail_values"] = torch.cat([ex["tail_values"] for ex in per_example]).to(dtype).contiguous()
        tensors["tail_indices_packed"] = _packed(torch.cat([ex["tail_indices"] for ex in per_example]).numpy(),
                                                 settings.index_bits)
    data = st_save(tensors, metadata={"format": str(STORE_FORMAT)})
    if settings.compression == "zstd":
        import zstandard

        data = zstandard.ZstdCompressor(level=3).compress(data)
    return data


def decode_shard(settings: CaptureSettings, data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of `encode_shard`: `example_ids`, `lengths`, `values`, `logsumexp`, (top-k) `indices` and (tail
    samples) `tail_indices`, `tail_values`."""
    if settings.compression == "zstd":
        import zstandard

        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    tensors = st_load(data)
    if not settings.dense:
        n = int(tensors["values"].shape[0]) * settings.top_k
        ids = unpack_ids(tensors.pop("indices_packed").numpy().tobytes(), settings.index_bits, n)
        tensors["indices"] = torch.from_numpy(ids).view(-1, settings.top_k)
    if settings.tail_samples:
        s = settings.tail_samples
        n = int(tensors["tail_values"].shape[0]) * s
        ids = unpack_ids(tensors.pop("tail_indices_packed").numpy().tobytes(), settings.index_bits, n)
        tensors["tail_indices"] = torch.from_numpy(ids).view(-1, s)
    return tensors


def shard_name(index: int, settings: CaptureSettings) -> str:
    return f"shard-{index:05d}.safetensors" + (".zst" if settings.compression == "zstd" else "")


# ---- store state (store.json) ----------------------------------------------------------------------------

def _settings_from_json(data: dict[str, Any], path: Path) -> CaptureSettings:
    try:
        return CaptureSettings(**data)
    except (TypeError, InvalidArgumentError) as err:
        raise IntegrityError(f"{path}: unreadable capture settings ({err})") from None


def read_state(store_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The parsed `store.json` (settings as `CaptureSettings`), or None when absent."""
    path = Path(store_dir) / STORE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise IntegrityError(f"{path}: not valid JSON ({err})") from None
    if state.get("format", 1) not in READABLE_FORMATS:
        raise IntegrityError(f"{path}: store format {state.get('format')!r} is newer than this soaes-distill reads "
                             f"({', '.join(map(str, READABLE_FORMATS))}); upgrade soaes-distill")
    state["settings"] = _settings_from_json(state["settings"], path)
    return state


def write_state(store_dir: Path, settings: CaptureSettings, num_examples: int, shards: dict[str, Any]) -> None:
    atomic_write_json(store_dir / STORE_FILE, {
        "format": STORE_FORMAT, "settings": dataclasses.asdict(settings), "num_examples": num_examples,
        "num_shards": math.ceil(num_examples / settings.examples_per_shard), "shards": shards})


def write_shard(store_dir: Path, settings: CaptureSettings, index: int, example_ids: list[int],
                per_example: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Atomically write one shard; returns its store.json entry."""
    data = encode_shard(settings, example_ids, per_example)
    name = shard_name(index, settings)
    atomic_write_bytes(store_dir / name, data)
    positions = sum(int(ex["values"].shape[0]) for ex in per_example)
    return {"file": name, "sha256": sha256_bytes(data), "bytes": len(data), "examples": len(example_ids),
            "positions": positions}


# ---- reader ----------------------------------------------------------------------------------------------

class TeacherLogitStore:
    """Read a finished store and look up teacher logits for a batch by (example id, position).

    Shards are loaded lazily (sha256 checked against `store.json` first; a missing, corrupted or unrecorded
    shard raises `IntegrityError` naming it and how to redo it) and kept in a small LRU cache.
    """

    def __init__(self, path: str | os.PathLike[str], cache_shards: int = 8) -> None:
        self.path = Path(path)
        state = read_state(self.path)
        if state is None:
            raise IntegrityError(f"{self.path}: not a teacher-logit store (no {STORE_FILE})")
        done = len(state["shards"])
        if not (self.path / "manifest.json").is_file() or done < state["num_shards"]:
            raise IntegrityError(f"{self.path}: dump incomplete ({done}/{state['num_shards']} shards); "
                                 "rerun `soaes-distill dump` with the same settings to resume")
        self.settings: CaptureSettings = state["settings"]
        self.num_examples: int = state["num_examples"]
        self._shards: dict[int, dict[str, Any]] = {int(k): v for k, v in state["shards"].items()}
        self._where: dict[int, tuple[int, int]] = {}  # example id -> (shard, row in shard)
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._cache_size = cache_shards
        self._index_built = False

    # -- integrity -----------------------------------------------------------------------------------------
    def require(self, **expected: Any) -> None:
        """Raise `IntegrityError` naming every setting that differs from `expected` (e.g. tokenizer_sha256=,
        dataset_sha256=, temperature=, top_k=, model_fingerprint=, vocab_size=; None = don't care)."""
        problems = settings_mismatch(self.settings, **expected)
        if problems:
            raise IntegrityError(f"{self.path}: teacher logits were captured with other settings: "
                                 + "; ".join(problems))

    def verify(self) -> None:
        """Checksum every shard now (instead of lazily)."""
        for index in sorted(self._shards):
            self._read_verified(index)

    def _read_verified(self, index: int) -> bytes:
        entry = self._shards[index]
        path = self.path / entry["file"]
        if not path.is_file():
            raise IntegrityError(f"{path}: shard missing; {REDO_HINT}")
        if not isinstance(entry.get("sha256"), str):
            raise IntegrityError(f"{path}: no sha256 recorded in {STORE_FILE}; {REDO_HINT}")
        data = path.read_bytes()
        if sha256_bytes(data) != entry["sha256"]:
            raise IntegrityError(f"{path}: shard corrupted (sha256 does not match {STORE_FILE}); {REDO_HINT}")
        return data

    def _load(self, index: int) -> dict[str, Any]:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        try:
            tensors = decode_shard(self.settings, self._read_verified(index))
        except IntegrityError:
            raise
        except Exception as err:  # undecodable despite a matching checksum: report the file
            raise IntegrityError(f"{self.path / self._shards[index]['file']}: unreadable shard ({err})") from None
        lengths = tensors["lengths"]
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        shard = {**tensors, "offsets": offsets,
                 "row": {int(e): i for i, e in enumerate(tensors["example_ids"].tolist())}}
        self._cache[index] = shard
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return shard

    def _build_index(self) -> None:
        for index in sorted(self._shards):
            shard = self._load(index)
            for eid, row in shard["row"].items():
                self._where[eid] = (index, row)
        self._index_built = True

    def example_ids(self) -> list[int]:
        if not self._index_built:
            self._build_index()
        return sorted(self._where)

    # -- lookup ---------------------------------------------------------------------------------------------
    def example(self, example_id: int) -> dict[str, torch.Tensor]:
        """Stored arrays of one example: `values` (L, k|V) log-probs at τ=1, `indices`, `logsumexp` (L, T), and
        with tail samples `tail_indices`, `tail_values` (L, s)."""
        if not self._index_built:
            self._build_index()
        if example_id not in self._where:
            raise IntegrityError(f"{self.path}: no teacher logits for example id {example_id}")
        index, row = self._where[example_id]
        shard = self._load(index)
        a, b = int(shard["offsets"][row]), int(shard["offsets"][row + 1])
        out = {"values": shard["values"][a:b], "logsumexp": shard["logsumexp"][a:b]}
        for name in ("indices", "tail_indices", "tail_values"):
            if name in shard:
                out[name] = shard[name][a:b]
        return out

    def lookup(self, example_ids: torch.Tensor, positions: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor | TopKLogits:
        """Teacher logits for a (B, L) grid of (example id, position); id < 0 marks padding (filled with a
        harmless uniform placeholder, which must carry label -100). Dense stores return fp32 logits (B, L, V);
        top-k stores return `TopKLogits` whose values are τ=1 log-probs (logits up to a shift) with the full
        logsumexp at `temperature`, plus (stores with tail samples) the sampled ids, their τ=1 log-probs, τ_s
        and the logsumexp at τ_s."""
        self.require(temperature=temperature)
        s = self.settings
        t_col = next(i for i, t in enumerate(s.temperatures) if math.isclose(t, temperature, rel_tol=1e-6))
        width = s.vocab_size if s.dense else s.top_k
        shape = tuple(example_ids.shape)
        flat_ids, flat_pos = example_ids.reshape(-1).tolist(), positions.reshape(-1).tolist()
        n = len(flat_ids)
        values = torch.zeros(n, width, dtype=torch.float32)
        indices = torch.arange(width, dtype=torch.int64).repeat(n, 1) if not s.dense else None
        lse = torch.full((n,), math.log(width), dtype=torch.float32)  # placeholder: k zero logits
        ns, s_col = s.tail_samples, s.tail_column
        if ns:  # placeholder tail: any finite values (padding carries label -100)
            tail_idx = torch.zeros(n, ns, dtype=torch.int64)
            tail_val = torch.full((n, ns), -100.0, dtype=torch.float32)
            tail_lse = lse.clone()
        # group positions by example so each example's arrays are fetched once
        groups: dict[int, list[int]] = {}
        for i, eid in enumerate(flat_ids):
            if eid >= 0:
                groups.setdefault(int(eid), []).append(i)
        for eid, rows in groups.items():
            ex = self.example(eid)
            pos = torch.tensor([flat_pos[i] for i in rows], dtype=torch.int64)
            length = ex["values"].shape[0]
            if int(pos.max()) >= length or int(pos.min()) < 0:
                raise IntegrityError(f"{self.path}: example id {eid} has {length} stored positions, "
                                     f"batch asks for position {int(pos.max())} (logits dumped from another dataset?)")
            rows_t = torch.tensor(rows, dtype=torch.int64)
            values[rows_t] = ex["values"][pos].float()  # τ=1 log-probs: the logits up to a shift
            lse[rows_t] = ex["logsumexp"][pos, t_col]
            if indices is not None:
                indices[rows_t] = ex["indices"][pos]
            if ns:
                tail_idx[rows_t] = ex["tail_indices"][pos]
                tail_val[rows_t] = ex["tail_values"][pos].float()
                tail_lse[rows_t] = ex["logsumexp"][pos, s_col]
        if s.dense:
            return values.view(*shape, width)
        top = TopKLogits(values.view(*shape, width), indices.view(*shape, width), lse.view(shape),
                         float(temperature), s.vocab_size)
        if not ns:
            return top
        return dataclasses.replace(top, tail_indices=tail_idx.view(*shape, ns), tail_values=tail_val.view(*shape, ns),
                                   tail_logsumexp=tail_lse.view(shape), tail_temperature=float(s.tail_temperature))

    def stats(self) -> dict[str, Any]:
        """Counts and bytes/token of the store (shard bytes on disk / stored positions)."""
        positions = sum(e["positions"] for e in self._shards.values())
        size = sum(e["bytes"] for e in self._shards.values())
        return {"examples": sum(e["examples"] for e in self._shards.values()), "positions": positions,
                "bytes": size, "bytes_per_token": size / positions if positions else 0.0}
