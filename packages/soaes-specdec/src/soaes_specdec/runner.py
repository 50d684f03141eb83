"""A lean cached forward pass over an HF Llama/Qwen2-style model, with a `StaticKVCache`.

It reuses the model's own modules (embeddings, norms, projections, MLPs, rotary table, head) and only
replaces the attention/cache plumbing, so each row of a batch can sit at its own position: this is what
lets speculative decoding advance rows by different amounts and roll back by moving a pointer. It also
skips HF `generate`'s per-step machinery and computes the output head only where logits are needed.

On CPU in fp32 the projections of a decoding step (1 to 16 rows) can run as `weight @ x.T` (`stream_linear`)
instead of `F.linear`: MKL then reads each weight matrix once, unpacked. Which path is faster depends on the host
(docs/benchmarks.md, "Streaming projections"). Results equal `F.linear` up to float rounding (summation order).

A block of several rows rounds differently from a one-row step (GEMM and attention kernels pick their blocking,
hence their summation order, by shape), so in bfloat16 a verification pass can flip a near-tie that plain
decoding resolves the other way. `batch_invariant=True` runs each row of a batch alone and every pass that
continues cached rows token by token, through exactly the calls of plain batch-1 decoding: bit-identical in every
dtype, but a verify then costs n+1 steps (the speed-up is gone); see the package README, "Exactness per dtype".

`prepack(rows)` (fp32 on a CPU with MKL) keeps a copy of every projection and the head packed by MKL for a fixed
row count (`torch.ops.mkl._mkl_linear`, what torch.compile's CPU backend uses for static shapes): a pass of exactly
that many rows then skips MKL's per-call packing; whether that pays depends on the host (docs/benchmarks.md,
"Lever: prepacked verification"). It costs one copy of those weights per row count.

Each pass runs its projections through one path chosen by its row count (`path_for_rows`): "module" (`F.linear`),
"stream" (`stream_linear`) or "prepacked". `apply_cost_table` installs the fastest path per row count measured on
this host (`cost_table`), packing only the row counts where prepacking wins; without a table every row count uses
`linear_mode`, except counts packed by `prepack`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from soaes_core.errors import InvalidArgumentError

from .draft import RestrictedLMHead
from .kv_cache import StaticKVCache, write_block

STREAM_MAX_ROWS = 16
"""Above this many rows (prefill) the projections use `F.linear`, which is as fast there."""


def stream_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed as `weight @ x.T` for up to `STREAM_MAX_ROWS` rows.

    With the weight as the left operand MKL's sgemm streams it without packing a copy; a single row is
    duplicated, since sgemm on two columns beats sgemv on one. More rows fall back to `F.linear`.
    """
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    if rows > STREAM_MAX_ROWS or rows == 0:
        return F.linear(x, weight, bias)
    x2 = x2.contiguous()
    if rows == 1:
        out = torch.mm(weight, torch.cat([x2, x2]).t())[:, :1].t()
    else:
        out = torch.mm(weight, x2.t()).t()
    out = out.contiguous()
    if bias is not None:
        out.add_(bias)
    return out.reshape(*lead, weight.shape[0])


PREPACK_MIN_ROWS = 2
"""Row counts below this are never prepacked: one packed row was measured slower than `F.linear` (layers) here."""


def prepack_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `CachedCausalLM.prepack` can pack weights here: fp32 on a CPU whose torch has MKL's packed GEMM."""
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkl.is_available():
        return False
    try:
        return hasattr(torch.ops.mkl, "_mkl_linear") and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


def packed_linear(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  rows: int) -> torch.Tensor:
    """`F.linear(x, weight, bias)` through MKL's GEMM on `packed` (`weight` packed for exactly `rows` rows). The op
    takes x [..., K] as it is (no reshapes: at ~200 calls per pass their dispatch was ~0.8 ms of a 31 ms verify)."""
    return torch.ops.mkl._mkl_linear(x if x.is_contiguous() else x.contiguous(), packed, weight, bias, rows)


def default_linear_mode(device: torch.device, dtype: torch.dtype) -> str:
    """Where `linear="auto"` considers `stream_linear` at all: "stream" on CPU in fp32 with MKL (then the runner
    times both modes on the model's own weights, `calibrate_linear_mode`); "module" (the modules' own forward)
    elsewhere: GPUs, bf16, BLAS libraries not measured."""
    mkl = torch.backends.mkl.is_available()
    return "stream" if device.type == "cpu" and dtype == torch.float32 and mkl else "module"


_CALIBRATED: dict[tuple[Any, ...], str] = {}


@torch.no_grad()
def calibrate_linear_mode(weights: list[torch.Tensor], passes: int = 3) -> str:
    """"stream" or "module", whichever computes a 1-row decoding step over `weights` faster on this machine (the
    best of `passes` interleaved passes each); cached per process for the same shapes, dtype and thread count.

    Measured, not assumed: on an AMD EPYC host MKL's `weight @ x.T` streamed the weights 2x faster than
    `F.linear`; on an Intel Xeon host the opposite held (docs/benchmarks.md, "Streaming projections")."""
    if not weights:
        return "module"
    key = (tuple(tuple(w.shape) for w in weights), weights[0].dtype, torch.get_num_threads())
    if key not in _CALIBRATED:
        xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
        fns = {"module": F.linear, "stream": stream_linear}
        best = {m: float("inf") for m in fns}
        for i in range(passes + 1):  # pass 0 warms both paths up and is not counted
            for mode, fn in fns.items():
                t0 = time.perf_counter()
                for w in weights:
                    fn(xs[w.shape[1]], w)
                if i:
                    best[mode] = min(best[mode], time.perf_counter() - t0)
        _CALIBRATED[key] = min(best, key=lambda m: best[m])
    return _CALIBRATED[key]


PROJECTION_PATHS = ("module", "stream", "prepacked")
"""The projection paths a pass can run: the modules' own forward (`F.linear`), `stream_linear`, MKL-prepacked."""


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotary helper: (x1, x2) -> (-x2, x1) on the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by per-position angles cos/sin [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def block_attention_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[B, 1, T, kv_len] bool: query at absolute position p sees keys 0..p of its own row."""
    keys = torch.arange(kv_len, device=positions.device)
    return (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)


def additive_attention_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool attention mask as the additive float mask SDPA would convert it to (0 where allowed, -inf elsewhere):
    converted once per pass instead of once per layer; the attention output is bit-identical."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class CachedCausalLM:
    """Wraps a decoder-only HF causal LM (`model.model.layers`, rotary, tied or untied head) for cached decoding."""

    def __init__(self, model: Any, linear: str = "auto", batch_invariant: bool = False) -> None:
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
            raise InvalidArgumentError(
                f"{type(model).__name__} is not a supported decoder (need Llama/Qwen2-style `model.layers` "
                "and rotary embeddings)")
        cfg = model.config
        if getattr(cfg, "use_sliding_window", False):
            raise InvalidArgumentError("sliding-window attention is not supported by the speculative decoder")
        self.model = model.eval()
        self.config = cfg
        self.layers = list(inner.layers)
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.head = model.get_output_embeddings()
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.vocab_size = self.head.weight.shape[0]
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        if linear not in ("auto", "stream", "module"):
            raise InvalidArgumentError(f"linear must be 'auto', 'stream' or 'module', got {linear!r}")
        self.linear_mode = default_linear_mode(self.device, self.dtype) if linear == "auto" else linear
        if linear == "auto" and self.linear_mode == "stream":
            self.linear_mode = calibrate_linear_mode([m.weight for m in self._projections()])
        gated = ("gate_proj", "up_proj", "down_proj", "act_fn")  # per layer, decided once (not on every step)
        self._gated_mlp = [all(hasattr(layer.mlp, a) for a in gated) for layer in self.layers]
        self.batch_invariant = bool(batch_invariant)
        self.cache: StaticKVCache | None = None
        self.cost_table: Any = None  # the `cost_table.CostTable` applied, if any
        self._packs: dict[int, dict[int, torch.Tensor]] = {}  # rows -> id(weight) -> MKL-packed weight
        self._pad_to: dict[int, int] = {}  # rows -> the larger row count a pass of that many rows runs at
        self._row_paths: dict[int, str] = {}  # rows -> projection path (rows not listed: linear_mode)
        self._path = self.linear_mode  # the path of the pass in progress (set per pass by its row count)

    @property
    def supports_prepack(self) -> bool:
        """Whether `prepack` can work here (fp32 CPU, MKL's packed GEMM; not in batch-invariant mode)."""
        return not self.batch_invariant and prepack_available(self.device, self.dtype)

    def require_prepack(self) -> None:
        """Refuse, in one line, a `prepack` this runner cannot do (`supports_prepack` is False)."""
        if not self.supports_prepack:
            raise InvalidArgumentError(
                f"prepack needs float32 weights on a CPU with MKL's packed GEMM and batch_invariant off; this target "
                f"is {self.dtype} on {self.device.type}{' (batch-invariant)' if self.batch_invariant else ''}: "
                "turn prepack off")

    def _projections(self) -> list[torch.nn.Linear]:
        """The plain Linear projections of every layer."""
        return [m for layer in self.layers for m in layer.modules() if type(m) is torch.nn.Linear]

    def _packable(self) -> list[torch.nn.Linear]:
        """The projections, and the head when it is a plain Linear."""
        return self._projections() + ([self.head] if type(self.head) is torch.nn.Linear else [])

    def available_paths(self, rows: int = 1) -> list[str]:
        """The projection paths a pass of `rows` rows can run here (`PROJECTION_PATHS`; stream and prepacked only up
        to `STREAM_MAX_ROWS` rows, prepacked only where `supports_prepack`)."""
        if rows > STREAM_MAX_ROWS:
            return ["module"]
        return ["module", "stream"] + (["prepacked"] if self.supports_prepack else [])

    def path_for_rows(self, rows: int) -> str:
        """The projection path a pass of `rows` rows runs: the applied cost table's or `prepack`'s choice for that
        row count, else `linear_mode`."""
        return self._row_paths.get(rows, self.linear_mode)

    def _pack(self, rows: int) -> None:
        """Pack the projections and the head for passes of exactly `rows` rows (once)."""
        if rows not in self._packs:
            self._packs[rows] = {id(m.weight): torch.ops.mkl._mkl_reorder_linear_weight(m.weight.detach(), rows)
                                 for m in self._packable()}

    @torch.no_grad()
    def apply_cost_table(self, table: Any, min_gain: float = 0.05) -> dict[int, str]:
        """Run each row count the `cost_table.CostTable` covers through its fastest path available here, packing
        exactly the row counts where prepacking wins (every other packed copy is dropped), and pad a pass up to a
        larger covered row count where the table says that is more than `min_gain` cheaper. Returns the paths."""
        self.clear_prepack()
        top = max(table.rows) if table.rows else 0
        paths = {r: table.path_for(r, self.available_paths(r)) for r in range(1, top + 1)}
        for r, path in paths.items():
            if path == "prepacked":
                self._pack(r)
        self._row_paths = paths
        for r in range(2, top):
            best = min(range(r, top + 1), key=lambda c: (table.pass_ms(c, self.available_paths(c)), c))
            if best > r and table.pass_ms(best, self.available_paths(best)) < (1 - min_gain) * table.pass_ms(
                    r, self.available_paths(r)):
                self._pad_to[r] = best
        self.cost_table = table
        return dict(paths)

    @torch.no_grad()
    def prepack(self, rows: Any) -> list[int]:
        """Pack the projections and the head for passes of exactly each of `rows` rows (batch x block, >= 2); returns
        the row counts packed now or before. One copy of those weights per row count (see the module docstring)."""
        self.require_prepack()
        wanted = sorted({int(r) for r in rows})
        if any(r < 1 for r in wanted):
            raise InvalidArgumentError(f"prepack rows must be >= 1, got {wanted}")
        new = False
        for r in wanted:
            if r < PREPACK_MIN_ROWS or r > STREAM_MAX_ROWS or r in self._packs:
                continue
            self._pack(r)
            self._row_paths[r] = "prepacked"
            new = True
        if new:
            self._pad_to = self._calibrate_padding()
        return sorted(self._packs)

    def pass_rows(self, rows: int) -> int:
        """How many rows a pass of `rows` rows should compute: `rows`, or a larger prepacked count where padding up
        to it was measured faster (`prepack` times both on this machine's weights)."""
        return self._pad_to.get(rows, rows)

    @torch.no_grad()
    def _calibrate_padding(self, passes: int = 3) -> dict[int, int]:
        """For each unpacked row count below the largest packed one: the smallest packed count above it, when one
        pass over the packable weights at that count (best of `passes`) beats the unpacked pass at its own count."""
        mods = self._packable()
        xs: dict[tuple[int, int], torch.Tensor] = {}

        def one_pass(rows: int) -> float:
            self._path = self.path_for_rows(rows)
            t0 = time.perf_counter()
            for m in mods:
                key = (rows, m.weight.shape[1])
                if key not in xs:
                    xs[key] = torch.randn(rows, m.weight.shape[1], dtype=self.dtype, device=self.device)
                self._proj(m, xs[key])
            return time.perf_counter() - t0

        timed: dict[int, float] = {}

        def best(rows: int) -> float:  # each row count timed once, however many counts pad up to it
            if rows not in timed:
                one_pass(rows)  # warm-up, not counted
                timed[rows] = min(one_pass(rows) for _ in range(passes))
            return timed[rows]

        pad_to: dict[int, int] = {}
        packed = sorted(self._packs)
        for rows in range(PREPACK_MIN_ROWS, packed[-1]):
            if rows in self._packs:
                continue
            up = min(r for r in packed if r > rows)
            if best(up) < best(rows):
                pad_to[rows] = up
        return pad_to

    @property
    def packed_rows(self) -> list[int]:
        """Row counts with prepacked weights."""
        return sorted(self._packs)

    def prepacked_bytes(self) -> int:
        """Memory held by the prepacked copies (one copy of the packed weights per row count)."""
        per_copy = sum(m.weight.numel() * m.weight.element_size() for m in self._packable())
        return per_copy * len(self._packs)

    def clear_prepack(self) -> None:
        """Drop every prepacked copy, the padding, and the applied cost table (every row count: `linear_mode`)."""
        self._packs.clear()
        self._pad_to.clear()
        self._row_paths.clear()
        self.cost_table = None

    def with_batch_invariance(self) -> CachedCausalLM:
        """This runner, or a batch-invariant one over the same model (weights shared) whose passes, all one row,
        run the path this runner uses for one row (never prepacked: batch-invariant mode does not pack)."""
        if self.batch_invariant:
            return self
        one = self.path_for_rows(1)
        return CachedCausalLM(self.model, linear=one if one in ("stream", "module") else self.linear_mode,
                              batch_invariant=True)

    def _proj(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        """Apply a projection module through the current pass's path when it is a plain Linear: its prepacked weight
        (when one exists for this row count; else `linear_mode`), `stream_linear`, or its own forward."""
        if type(module) is torch.nn.Linear:
            path = self._path
            if path == "prepacked":
                rows = x.numel() // x.shape[-1]
                pack = self._packs.get(rows)
                if pack is not None:
                    return packed_linear(x, pack[id(module.weight)], module.weight, module.bias, rows)
                path = self.linear_mode
            if path == "stream":
                return stream_linear(x, module.weight, module.bias)
        return module(x)

    def _mlp(self, idx: int, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        """Gated MLP down(act(gate(x)) * up(x)) through `_proj` unless the pass runs the modules' own forward."""
        if self._path != "module" and self._gated_mlp[idx]:
            return self._proj(mlp.down_proj, mlp.act_fn(self._proj(mlp.gate_proj, x)) * self._proj(mlp.up_proj, x))
        return mlp(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """The output head over x [..., H], through the path of its own row count (fewer than the pass's where
        logits are taken at one position per row)."""
        self._path = self.path_for_rows(x.numel() // x.shape[-1])
        if isinstance(self.head, RestrictedLMHead):  # never packed: stream where the pass (or its fallback) streams
            if self._path == "stream" or (self._path == "prepacked" and self.linear_mode == "stream"):
                return self.head(x, linear=stream_linear)
            return self.head(x)
        return self._proj(self.head, x)

    def num_parameter_bytes(self) -> int:
        """Bytes of weights read per decoding step (each distinct parameter once)."""
        seen, total = set(), 0
        for p in self.model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total

    def start(self, batch: int, capacity: int) -> StaticKVCache:
        """(Re)use a cache for `batch` rows of up to `capacity` tokens, emptied."""
        if self.cache is None or not self.cache.fits(batch, capacity, self.dtype, self.device):
            self.cache = StaticKVCache.allocate(len(self.layers), batch, self.num_kv_heads, capacity,
                                                self.head_dim, self.dtype, self.device)
        self.cache.reset()
        return self.cache

    def _attention(self, layer: Any, idx: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   common_start: int | None, positions: torch.Tensor, mask: torch.Tensor | None,
                   kv_len: int, row: int | None) -> torch.Tensor:
        attn = layer.self_attn
        b, t, _ = h.shape
        q = self._proj(attn.q_proj, h).view(b, t, -1, self.head_dim)
        k = self._proj(attn.k_proj, h).view(b, t, -1, self.head_dim)
        v = self._proj(attn.v_proj, h).view(b, t, -1, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        key_buf, value_buf = self.cache.keys[idx], self.cache.values[idx]
        if row is not None:  # one row of the batch (a view: writes land in the cache)
            key_buf, value_buf = key_buf[row:row + 1], value_buf[row:row + 1]
        write_block(key_buf, k, common_start, positions)
        write_block(value_buf, v, common_start, positions)
        keys, values = key_buf[:, :, :kv_len], value_buf[:, :, :kv_len]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return self._proj(attn.o_proj, out.transpose(1, 2).reshape(b, t, -1))

    def forward(self, tokens: torch.Tensor, starts: torch.Tensor, logits_at: torch.Tensor | None = None,
                need_logits: bool = True, inputs_embeds: torch.Tensor | None = None,
                return_hidden: bool | str = False) -> Any:
        """Run `tokens` [B, T], row b occupying positions starts[b]..starts[b]+T-1, writing K/V into the cache.

        Returns fp32 logits [B, T, V], or [B, V] at per-row block index `logits_at` [B], or None when
        `need_logits` is False (prefilling a draft). The caller then moves the lengths with `cache.set_lengths`
        (tokens past a row's real length are padding: stale entries a later write overwrites).
        A block that would run past the cache is refused in one line.

        `inputs_embeds` [B, T, H] replaces `embed(tokens)` as the first layer's input (a feature draft's fc output;
        `tokens` still give the shape). `return_hidden=True` returns `(logits or None, hidden)` with hidden the
        post-norm last hidden state (what the head reads) where the logits are: [B, T, H], or [B, H] at `logits_at`;
        `return_hidden="all"` gives hidden [B, T, H] for every row even with `logits_at` (a prefill that needs all
        prompt features but logits only at the last token; in batch-invariant mode a prompt row's positions past
        `logits_at` are not computed and are zeros).
        """
        b, t = tokens.shape
        hi = int(starts.max())
        if self.cache is None:
            raise InvalidArgumentError("CachedCausalLM.forward before start(): allocate the cache first")
        if hi + t > self.cache.capacity:
            raise InvalidArgumentError(
                f"a block of {t} tokens at position {hi} needs {hi + t} cache slots but the cache holds "
                f"{self.cache.capacity}: verify fewer tokens or start() a larger cache")
        if return_hidden not in (False, True, "all"):
            raise InvalidArgumentError(f"return_hidden must be False, True or 'all', got {return_hidden!r}")
        if inputs_embeds is not None and tuple(inputs_embeds.shape) != (b, t, self.config.hidden_size):
            raise InvalidArgumentError(f"inputs_embeds must have shape {(b, t, self.config.hidden_size)} (tokens "
                                       f"[B, T] and the hidden size), got {tuple(inputs_embeds.shape)}")
        if self.batch_invariant and (b > 1 or (hi > 0 and t > 1)):
            logits, hidden = self._forward_rows(tokens, starts, logits_at, need_logits, inputs_embeds, return_hidden)
        else:
            logits, hidden = self._forward_block(tokens, starts, logits_at, need_logits, None, inputs_embeds,
                                                 return_hidden)
        return (logits, hidden) if return_hidden else logits

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of post-norm hidden states [..., H] through the (possibly restricted) head, as `forward`."""
        return self._head(hidden).float()

    def _forward_rows(self, tokens: torch.Tensor, starts: torch.Tensor, logits_at: torch.Tensor | None,
                      need_logits: bool, inputs_embeds: torch.Tensor | None = None, return_hidden: bool | str = False,
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`forward` through exactly the calls plain batch-1 decoding makes, so every logit is bit-identical to it:
        each row alone; a row at position 0 (a prompt) as one block over its own length (`logits_at[r] + 1` tokens),
        a row that continues its cache one token at a time, in order (each attends to keys just written)."""
        b, t = tokens.shape
        first = torch.zeros(1, dtype=torch.long, device=tokens.device)
        all_hidden = return_hidden == "all"
        rows, hiddens = [], []
        for r in range(b):
            if int(starts[r]) == 0:
                end = t if logits_at is None else int(logits_at[r]) + 1
                emb = None if inputs_embeds is None else inputs_embeds[r:r + 1, :end]
                out, hid = self._forward_block(tokens[r:r + 1, :end], starts[r:r + 1],
                                               None if logits_at is None else logits_at[r:r + 1], need_logits, r,
                                               emb, return_hidden)
                if out is not None:
                    rows.append(out[0])
                if hid is not None:
                    if all_hidden and end < t:  # positions past the prompt are padding: not computed
                        hid = torch.cat([hid, hid.new_zeros(1, t - end, hid.shape[-1])], dim=1)
                    hiddens.append(hid[0])
                continue
            row_logits, row_hidden = [], []
            for i in range(t):
                at = logits_at is None or int(logits_at[r]) == i
                want = need_logits and at
                emb = None if inputs_embeds is None else inputs_embeds[r:r + 1, i:i + 1]
                out, hid = self._forward_block(tokens[r:r + 1, i:i + 1], starts[r:r + 1] + i, first, want, r, emb,
                                               bool(return_hidden) and (at or all_hidden))
                if out is not None:
                    row_logits.append(out[0])
                if hid is not None:
                    row_hidden.append(hid[0])
            if need_logits:
                rows.append(torch.stack(row_logits) if logits_at is None else row_logits[0])
            if return_hidden:
                hiddens.append(torch.stack(row_hidden) if (logits_at is None or all_hidden) else row_hidden[0])
        return (torch.stack(rows) if need_logits else None), (torch.stack(hiddens) if return_hidden else None)

    def _forward_block(self, tokens: torch.Tensor, starts: torch.Tensor, logits_at: torch.Tensor | None,
                       need_logits: bool, row: int | None, inputs_embeds: torch.Tensor | None = None,
                       return_hidden: bool | str = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The batched forward of `forward` (over cache row `row` only, when given): (logits, hidden or None)."""
        b, t = tokens.shape
        lo, hi = int(starts.min()), int(starts.max())
        common_start = lo if lo == hi else None
        positions = starts[:, None] + torch.arange(t, device=tokens.device)[None, :]
        kv_len = hi + t
        mask = (None if (t == 1 and common_start is not None)
                else additive_attention_mask(block_attention_mask(positions, kv_len), self.dtype))
        self._path = self.path_for_rows(b * t)
        h = self.embed(tokens) if inputs_embeds is None else inputs_embeds.to(self.dtype)
        cos, sin = self.rotary(h, positions)
        for idx, layer in enumerate(self.layers):
            h = h + self._attention(layer, idx, layer.input_layernorm(h), cos, sin, common_start, positions,
                                    mask, kv_len, row)
            h = h + self._mlp(idx, layer.mlp, layer.post_attention_layernorm(h))
        if not need_logits and not return_hidden:
            return None, None
        # "all" with logits_at: every row's hidden state, while the logits rows are normed alone as without it
        every = self.norm(h) if (return_hidden == "all" and logits_at is not None) else None
        if logits_at is not None:
            h = h[torch.arange(b, device=h.device), logits_at]
        normed = self.norm(h) if (need_logits or every is None) else None
        hidden = (every if every is not None else normed) if return_hidden else None
        return (self._head(normed).float() if need_logits else None), hidden
