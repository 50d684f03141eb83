"""A pipeline recipe at cluster scale, per stage: device layout, memory estimate, launcher command and expected time.

Arithmetic only, on the models' architecture configs (the paper's Qwen2.5-7B/72B ship with soaes-train, so nothing
downloads) and on the recipe's `scale:` section (the cluster, the data sizes and the rates). Memory counts bf16
weights, bf16 gradients and fp32 Adam states (master, m, v) split by the ZeRO stage or moved to host memory by
offload, activations under gradient checkpointing, and the KV cache of generating stages. A rate not measured is an
assumption (model-FLOPs utilisation of the GPUs' peak, a fraction of their memory bandwidth when decoding), and each
row says which.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from soaes_core.errors import ConfigError, ModelLoadError
from soaes_train.config import DeepSpeedConfig
from soaes_train.launch import LaunchConfig, format_command, launcher_argv

if TYPE_CHECKING:
    from .recipe import PipelineRecipe

GIB = 2**30
FP32_STATE_BYTES = 16  # per parameter: fp32 gradient, fp32 master weight, two fp32 Adam moments
HOST_BUFFER_FACTOR = 1.5  # DeepSpeed's estimator: pinned host buffers on top of the offloaded states
# a device_map runs its GPUs one after another (layer by layer), so a step goes at one GPU's speed; tensor
# parallelism (vLLM) would use them all at once
SEQUENTIAL = 1
INFERENCE_HEADROOM = 0.9  # share of a GPU's memory a plan may fill (the rest: allocator, CUDA context, kernels)
CPU_STAGES = ("curate", "decontaminate", "pack", "export", "report")
TRAIN_STAGES = ("cpt", "sft_stage1", "sft_stage2", "sft_stage2_only")


@dataclass
class ClusterSettings:
    """The machines (defaults: the paper's one node of 8 × A800 80 GB) and their peak rates from the data sheet."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu: str = "A800 80GB"
    gpu_memory_gib: float = 80.0
    host_memory_gib: float = 1024.0  # per node
    peak_tflops: float = 312.0  # dense bf16 per GPU (A800/A100)
    memory_tb_per_s: float = 2.0  # HBM bandwidth per GPU (A800 80GB: 2.0 TB/s)
    hostfile: str = "hostfile"  # deepspeed's, for nodes > 1 ("node-i slots=8" lines)

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gpu_memory_gib", "host_memory_gib", "peak_tflops", "memory_tb_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class ScaleData:
    """How much each stage processes. `cpt_tokens` is the paper's corpus; the others are assumptions to replace
    with your counts (the pack stage's manifest has them)."""

    cpt_tokens: int = 17_000_000_000
    sft_stage1_tokens: int = 2_000_000_000
    sft_stage2_tokens: int = 200_000_000
    teacher_prompts: int = 100_000
    prompt_tokens: int = 256  # mean prompt length of teacher data, bench and eval requests
    eval_requests: int = 20_000

    def __post_init__(self) -> None:
        for name in ("cpt_tokens", "sft_stage1_tokens", "sft_stage2_tokens", "teacher_prompts", "prompt_tokens",
                     "eval_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class RateSettings:
    """Throughput. Unset rates are assumed from the peaks: training and prefill at `mfu` of the peak FLOP/s, decoding
    at `decode_bandwidth_efficiency` of the memory bandwidth. Measured rates (tokens/s per GPU) replace them."""

    mfu: float = 0.4
    decode_bandwidth_efficiency: float = 0.5
    target_train_tokens_per_gpu_s: float | None = None
    draft_train_tokens_per_gpu_s: float | None = None
    generate_tokens_per_s: float | None = None  # the teacher-data engine's total output rate

    def __post_init__(self) -> None:
        if not 0 < self.mfu <= 1 or not 0 < self.decode_bandwidth_efficiency <= 1:
            raise ValueError(f"need 0 < mfu <= 1 and 0 < decode_bandwidth_efficiency <= 1, got {self.mfu} and "
                             f"{self.decode_bandwidth_efficiency}")
        for name in ("target_train_tokens_per_gpu_s", "draft_train_tokens_per_gpu_s", "generate_tokens_per_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 (or unset: assumed), got {value}")


def _paper_zero3() -> DeepSpeedConfig:
    return DeepSpeedConfig(enabled=True, stage=3, offload_optimizer=True, offload_param=False)


@dataclass
class ScaleSettings:
    """How the recipe runs at scale: architectures (shipped short names such as qwen2.5-72b, a model dir or a
    config.json; unset = the recipe's target / distill_draft.draft), the cluster, ZeRO for the training stages
    (soaes-train's `DeepSpeedConfig`), the launcher and the soaes-train recipe it starts, data sizes and rates."""

    target_arch: str | None = None
    draft_arch: str | None = None
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    deepspeed: DeepSpeedConfig = field(default_factory=_paper_zero3)
    launcher: Literal["deepspeed", "torchrun"] = "deepspeed"
    train_recipe: str | None = None  # the soaes-train recipe with the same stages (e.g. qwen2.5-72b-paper)
    data: ScaleData = field(default_factory=ScaleData)
    rates: RateSettings = field(default_factory=RateSettings)


# ------------------------------------------------------------------------------------------------- model sizes


@dataclass(frozen=True)
class ArchSize:
    """What the memory and time arithmetic needs from a decoder-only transformer's config.json."""

    name: str
    params: int
    largest_layer_params: int  # the biggest single module (the embedding or the LM head)
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V cache one token adds across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def arch_size(config: dict[str, Any], name: str = "model", num_layers: int | None = None) -> ArchSize:
    """Parameter count of a Llama/Qwen2-style config (q/k/v biases for qwen2 or `attention_bias`), optionally cut to
    `num_layers` decoder layers (a layer-truncated draft)."""
    try:
        h, inter, vocab = int(config["hidden_size"]), int(config["intermediate_size"]), int(config["vocab_size"])
        layers = int(config["num_hidden_layers"]) if num_layers is None else num_layers
        heads = int(config["num_attention_heads"])
        kv = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or h // heads)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{name}: config.json lacks a usable {err} for a decoder-only transformer") from None
    bias = bool(config.get("attention_bias", config.get("model_type") == "qwen2"))
    q, k = heads * head_dim, kv * head_dim
    attention = h * q + 2 * h * k + q * h + ((q + 2 * k) if bias else 0)
    per_layer = attention + 3 * h * inter + 2 * h  # + gate/up/down projections and two RMSNorms
    embed = vocab * h
    head = 0 if config.get("tie_word_embeddings", False) else vocab * h
    return ArchSize(name, embed + layers * per_layer + h + head, embed, layers, h, kv, head_dim, vocab)


def read_arch_config(spec: str) -> dict[str, Any]:
    """The config.json of `spec`: a shipped architecture (qwen2.5-7b, qwen2.5-72b or their hub ids), a model
    directory or a config.json file, read offline."""
    from soaes_train.recipes import SHIPPED_ARCHITECTURES, architecture_source

    key = spec.removeprefix("hf:")
    shipped = any(key.lower() == n or key in ids for n, ids in SHIPPED_ARCHITECTURES.items())
    path = Path(spec).expanduser()
    if not shipped and spec.startswith("hf:"):
        raise ConfigError(f"{spec}: no shipped architecture for this hub id; set scale.target_arch / draft_arch to a "
                          f"local model dir or config.json (shipped: {', '.join(SHIPPED_ARCHITECTURES)})")
    if path.is_file():
        config_path = path
    else:
        try:
            config_path = Path(architecture_source(spec)) / "config.json"
        except (ModelLoadError, ConfigError) as err:
            raise ConfigError(f"{spec}: no architecture to plan with ({err})") from None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{config_path}: cannot read the architecture config ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: not a model config (a JSON object)")
    return config


def draft_size(recipe: PipelineRecipe, scale: ScaleSettings, target_config: dict[str, Any],
               target: ArchSize) -> ArchSize:
    """The draft distill_draft trains: an explicit draft model, a layer-truncated target, or a feature head (one
    decoder layer and an LM head on the target's hidden states)."""
    d = recipe.distill_draft
    if scale.draft_arch or d.draft:
        spec = scale.draft_arch or str(d.draft)
        return arch_size(read_arch_config(spec), name=spec)
    if d.kind == "layer":
        return arch_size(target_config, name=f"{target.name} cut to {d.draft_layers} layers", num_layers=d.draft_layers)
    layer = arch_size(target_config, num_layers=1).params - arch_size(target_config, num_layers=0).params
    return ArchSize(f"{target.name} feature head", layer + target.largest_layer_params, target.largest_layer_params, 1,
                    target.hidden_size, target.num_kv_heads, target.head_dim, target.vocab_size)


# ------------------------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class TrainMemory:
    """Bytes per GPU (`gpu_*`) and host bytes per node of one ZeRO training step."""

    gpu_weights: float
    gpu_grads: float
    gpu_optimizer: float
    gpu_gathered: float
    gpu_activations: float
    host: float

    @property
    def gpu_total(self) -> float:
        return self.gpu_weights + self.gpu_grads + self.gpu_optimizer + self.gpu_gathered + self.gpu_activations


def activation_bytes(arch: ArchSize, micro_batch: int, seq_len: int, checkpointing: bool = True) -> float:
    """Peak activation memory of one micro-batch in bf16 with flash attention (no seq² term): the layer inputs kept
    by gradient checkpointing plus one layer recomputed (34·s·b·h bytes, Korthikanti et al. 2022), or every layer
    without it, plus the logits (bf16, their fp32 copy for the loss, and its gradient)."""
    tokens = micro_batch * seq_len
    per_layer = 34 * tokens * arch.hidden_size
    layers = (arch.num_layers * tokens * arch.hidden_size * 2 + per_layer) if checkpointing \
        else arch.num_layers * per_layer
    return layers + tokens * arch.vocab_size * (2 + 4 + 4)


def zero_train_memory(arch: ArchSize, ds: DeepSpeedConfig, cluster: ClusterSettings, micro_batch: int,
                      seq_len: int, checkpointing: bool = True) -> TrainMemory:
    """bf16 mixed-precision Adam under ZeRO, in bytes per parameter as DeepSpeed's estimators count them: bf16
    weights (2; split over all GPUs at stage 3), bf16 gradients (2; split from stage 2), fp32 gradients, master
    weights and Adam moments (16; split from stage 1), one gathered layer at stage 3 (4 × the largest layer).
    Offload moves the gradients and optimizer states, and at stage 3 the weights, to host memory (with DeepSpeed's
    1.5× pinned buffers)."""
    p, n = float(arch.params), cluster.gpus
    stage = ds.stage if ds.enabled else 0
    offload_opt = ds.offload_optimizer and stage >= 1
    offload_param = ds.offload_param and stage == 3
    weights = 0.0 if offload_param else 2 * p / (n if stage == 3 else 1)
    grads = 0.0 if offload_opt else 2 * p / (n if stage >= 2 else 1)
    optimizer = 0.0 if offload_opt else FP32_STATE_BYTES * p / (n if stage >= 1 else 1)
    host = ((FP32_STATE_BYTES * p if offload_opt else 0.0) + (2 * p if offload_param else 0.0)) \
        * HOST_BUFFER_FACTOR / cluster.nodes
    gathered = 4.0 * arch.largest_layer_params if stage == 3 else 0.0
    acts = activation_bytes(arch, micro_batch, seq_len, checkpointing)
    return TrainMemory(weights, grads, optimizer, gathered, acts, host)


def inference_gpus(weight_bytes: float, kv_bytes: float, cluster: ClusterSettings) -> int | None:
    """Fewest GPUs of one node (a power of two, for tensor parallelism) that hold the weights and the KV cache; None
    when a whole node cannot."""
    g = 1
    while g <= cluster.gpus_per_node:
        if (weight_bytes + kv_bytes) / g <= INFERENCE_HEADROOM * cluster.gpu_memory_gib * GIB:
            return g
        g *= 2
    return None


# ------------------------------------------------------------------------------------------------- rates


def train_flops_per_token(arch: ArchSize, seq_len: int, checkpointing: bool = True) -> float:
    """Forward + backward FLOPs per token: 6·P plus causal attention 6·L·h·s; checkpointing recomputes the forward
    (× 4/3)."""
    flops = 6 * arch.params + 6 * arch.num_layers * arch.hidden_size * seq_len
    return flops * (4 / 3 if checkpointing else 1)


@dataclass(frozen=True)
class Rate:
    """A throughput in tokens/s and where it came from ('measured: …' or 'assumed: …')."""

    tokens_per_s: float
    basis: str


def train_rate(arch: ArchSize, seq_len: int, checkpointing: bool, scale: ScaleSettings,
               measured: float | None) -> Rate:
    """Cluster-wide training tokens/s: a measured per-GPU rate, else MFU × peak / FLOPs per token."""
    gpus = scale.cluster.gpus
    if measured is not None:
        return Rate(measured * gpus, f"measured: {measured:,.0f} tok/s/GPU")
    per_gpu = scale.rates.mfu * scale.cluster.peak_tflops * 1e12 / train_flops_per_token(arch, seq_len, checkpointing)
    return Rate(per_gpu * gpus, f"assumed: MFU {scale.rates.mfu:.0%} of {scale.cluster.peak_tflops:g} TFLOP/s = "
                                f"{per_gpu:,.0f} tok/s/GPU")


def decode_rate(weight_bytes: float, gpus: int, batch: int, scale: ScaleSettings, flops_per_token: float) -> float:
    """Decoding tokens/s of `batch` sequences on `gpus`: each step reads the weights once (memory bound), unless the
    batch makes it compute bound."""
    c = scale.cluster
    step_s = weight_bytes / (gpus * c.memory_tb_per_s * 1e12 * scale.rates.decode_bandwidth_efficiency)
    compute_s = batch * flops_per_token / (gpus * c.peak_tflops * 1e12 * scale.rates.mfu)
    return batch / max(step_s, compute_s)


def prefill_seconds(tokens: float, flops_per_token: float, gpus: int, scale: ScaleSettings) -> float:
    return tokens * flops_per_token / (gpus * scale.cluster.peak_tflops * 1e12 * scale.rates.mfu)


# ------------------------------------------------------------------------------------------------- the plan


@dataclass
class ScaleRow:
    """One stage of the plan. Memory in GiB: per GPU and host per node (None where the stage uses no GPU)."""

    stage: str
    layout: str
    gpu_gib: float | None
    host_gib: float | None
    fits: bool
    memory_detail: str
    launcher: str
    seconds: float | None
    time_basis: str


def scale_launch(scale: ScaleSettings) -> LaunchConfig:
    """The launch settings that start a training stage on every GPU of the cluster (soaes-train's `LaunchConfig`)."""
    c = scale.cluster
    return LaunchConfig(launcher=scale.launcher, nproc_per_node=c.gpus_per_node, nnodes=c.nodes,
                        hostfile=c.hostfile if scale.launcher == "deepspeed" and c.nodes > 1 else None)


def launcher_prefix(scale: ScaleSettings) -> str:
    """`deepspeed …` / `torchrun …` for every GPU of the cluster, ready for `--module`/`-m` and the CLI: soaes-train's
    command builder (`soaes_train.launch`), with what each node decides left to its shell."""
    return format_command(launcher_argv(scale_launch(scale), placeholders=True))


def _zero_text(ds: DeepSpeedConfig) -> str:
    if not ds.enabled:
        return "DDP (no ZeRO)"
    off = [w for w, on in (("optimizer", ds.offload_optimizer), ("params", ds.offload_param and ds.stage == 3)) if on]
    return f"ZeRO-{ds.stage}" + (f" + CPU offload ({', '.join(off)})" if off else "")


def _gib(x: float) -> float:
    return round(x / GIB, 1)


def _train_row(recipe: PipelineRecipe, scale: ScaleSettings, stage: str, arch: ArchSize, tokens: int,
               module_cmd: str) -> ScaleRow:
    s = getattr(recipe, stage)
    train = s.train
    micro = int(train.per_device_train_batch_size)
    accum = int(train.gradient_accumulation_steps)
    epochs = float(train.num_train_epochs)
    ckpt = bool(getattr(train, "gradient_checkpointing", False))
    c = scale.cluster
    mem = zero_train_memory(arch, scale.deepspeed, c, micro, s.max_length, ckpt)
    rate = train_rate(arch, s.max_length, ckpt, scale, scale.rates.target_train_tokens_per_gpu_s)
    global_batch = micro * accum * c.gpus
    steps = tokens * epochs / (global_batch * s.max_length)
    fits = mem.gpu_total <= c.gpu_memory_gib * GIB and mem.host <= c.host_memory_gib * GIB
    detail = (f"weights {_gib(mem.gpu_weights)} + bf16 grads {_gib(mem.gpu_grads)} + fp32 grads/Adam "
              f"{_gib(mem.gpu_optimizer)} "
              f"+ gathered layer {_gib(mem.gpu_gathered)} + activations {_gib(mem.gpu_activations)} "
              f"(micro-batch {micro} × {s.max_length}, checkpointing {'on' if ckpt else 'off'}); host: offloaded "
              f"states {_gib(mem.host)}")
    return ScaleRow(
        stage, f"{c.nodes}×{c.gpus_per_node} {c.gpu}, {_zero_text(scale.deepspeed)}, global batch {global_batch} "
               f"(≈{global_batch * s.max_length / 1e6:.1f}M tokens), {steps:,.0f} steps",
        _gib(mem.gpu_total), _gib(mem.host), fits, detail, f"{launcher_prefix(scale)} {module_cmd}",
        tokens * epochs / rate.tokens_per_s, f"{tokens * epochs / 1e9:g}B tokens; {rate.basis}")


def _inference_layout(weights: float, kv: float, cluster: ClusterSettings, what: str) -> tuple[str, int, float, bool]:
    g = inference_gpus(weights, kv, cluster)
    if g is None:
        g = cluster.gpus_per_node
        return (f"{what}: device_map over {g} GPUs + host offload (does not fit one node's GPUs)", g,
                (weights + kv) / g, False)
    return (f"{what}: device_map over {g} GPU{'s' if g > 1 else ''} (bf16; layers run in turn)", g, (weights + kv) / g,
            True)


@dataclass(frozen=True)
class _Models:
    """The two models a plan sizes, and the command that runs one stage through the pipeline."""

    target: ArchSize
    draft: ArchSize
    run: str

    @property
    def target_weights(self) -> float:
        return 2.0 * self.target.params  # bf16

    @property
    def target_flops(self) -> float:
        return 2.0 * self.target.params  # forward FLOPs per token


def _cpu_row(stage: str, m: _Models) -> ScaleRow:
    curate = stage == "curate"
    return ScaleRow(stage, "CPU (datatrove executors: local, Slurm or Ray)" if curate else "CPU", None, None, True,
                    "no GPU", f"{m.run} --from {stage} --until {stage}", None,
                    "CPU stage: see the curation estimate in docs/scale-up.md" if curate else "CPU stage")


def _teacher_row(recipe: PipelineRecipe, scale: ScaleSettings, m: _Models) -> ScaleRow:
    s, data, c = recipe.teacher_data, scale.data, scale.cluster
    answers = data.teacher_prompts * (1 + s.samples_per_prompt)
    kv = s.batch_size * (data.prompt_tokens + s.max_new_tokens) * m.target.kv_bytes_per_token()
    layout, g, per_gpu, fits = _inference_layout(m.target_weights, kv, c, f"target {m.target.name}")
    if scale.rates.generate_tokens_per_s is not None:
        seconds = answers * s.max_new_tokens / scale.rates.generate_tokens_per_s
        basis = f"measured: {scale.rates.generate_tokens_per_s:,.0f} tok/s"
    else:
        rate = decode_rate(m.target_weights, SEQUENTIAL, s.batch_size, scale, m.target_flops)
        seconds = (answers * s.max_new_tokens / rate
                   + prefill_seconds(answers * data.prompt_tokens, m.target_flops, SEQUENTIAL, scale))
        basis = (f"assumed: decoding at {scale.rates.decode_bandwidth_efficiency:.0%} of {c.memory_tb_per_s:g} TB/s "
                 f"per GPU, batch {s.batch_size} = {rate:,.0f} tok/s")
    return ScaleRow("teacher_data", f"{layout}, batch {s.batch_size}", _gib(per_gpu), None, fits,
                    f"weights {_gib(m.target_weights / g)} + KV cache {_gib(kv / g)} per GPU "
                    f"({m.target.kv_bytes_per_token() / 1024:.0f} KiB/token)",
                    f"{m.run} --from teacher_data --until teacher_data", seconds,
                    f"{answers:,} answers × {s.max_new_tokens} new tokens; {basis}")


def _dump_row(recipe: PipelineRecipe, scale: ScaleSettings, m: _Models) -> ScaleRow:
    s, data = recipe.dump_logits, scale.data
    seq = data.prompt_tokens + recipe.teacher_data.max_new_tokens
    tokens = data.teacher_prompts * (1 + recipe.teacher_data.samples_per_prompt) * seq
    logits = s.batch_size * seq * m.target.vocab_size * 4.0  # one batch's fp32 logits before the top-k
    layout, g, per_gpu, fits = _inference_layout(m.target_weights, logits, scale.cluster, f"target {m.target.name}")
    entry = 2 + math.ceil(math.log2(m.target.vocab_size)) / 8  # fp16 value + bit-packed token id
    store = tokens * s.top_k * entry
    return ScaleRow("dump_logits", f"{layout}, batch {s.batch_size}", _gib(per_gpu), None, fits,
                    f"weights {_gib(m.target_weights / g)} + fp32 logits of a batch {_gib(logits / g)}; "
                    f"top-{s.top_k} store on disk ≈ {_gib(store):,.0f} GiB",
                    f"{m.run} --from dump_logits --until dump_logits",
                    prefill_seconds(tokens, m.target_flops, SEQUENTIAL, scale),
                    f"{tokens / 1e6:,.0f}M tokens forward; assumed: MFU {scale.rates.mfu:.0%} of "
                    f"{scale.cluster.peak_tflops:g} TFLOP/s")


def _distill_row(recipe: PipelineRecipe, scale: ScaleSettings, m: _Models) -> ScaleRow:
    d, data, c = recipe.distill_draft, scale.data, scale.cluster
    seq = data.prompt_tokens + recipe.teacher_data.max_new_tokens
    tokens = data.teacher_prompts * (1 + recipe.teacher_data.samples_per_prompt) * seq
    ckpt = bool(getattr(d.train, "gradient_checkpointing", False))
    micro = int(d.train.per_device_train_batch_size)
    if d.kind == "feature":
        micro, ckpt = d.feature.batch_size, False
    mem = zero_train_memory(m.draft, scale.deepspeed, c, micro, seq, ckpt)
    frozen = m.target_weights / c.gpus_per_node if d.kind == "feature" else 0.0  # the target, sharded, frozen
    rate = train_rate(m.draft, seq, ckpt, scale, scale.rates.draft_train_tokens_per_gpu_s)
    epochs = float(d.train.num_train_epochs)
    gpu = mem.gpu_total + frozen
    cmd = ("soaes_distill.cli train DISTILL.yaml --set deepspeed.enabled=true" if d.kind == "layer"
           else "soaes_distill.cli feature-draft FEATURE.yaml")
    states = mem.gpu_weights + mem.gpu_grads + mem.gpu_optimizer + mem.gpu_gathered
    return ScaleRow(
        "distill_draft", f"draft {m.draft.name} ({m.draft.params / 1e9:.2f}B): {c.nodes}×{c.gpus_per_node} {c.gpu}, "
                         f"{_zero_text(scale.deepspeed)}", _gib(gpu), _gib(mem.host),
        gpu <= c.gpu_memory_gib * GIB and mem.host <= c.host_memory_gib * GIB,
        f"draft states {_gib(states)} + activations {_gib(mem.gpu_activations)}"
        + (f" + frozen target {_gib(frozen)}" if frozen else "") + f"; host: offloaded states {_gib(mem.host)}",
        f"{launcher_prefix(scale)} {cmd}", tokens * epochs / rate.tokens_per_s,
        f"{tokens / 1e6:,.0f}M tokens × {epochs:g} epoch(s); {rate.basis}")


def _decode_row(stage: str, recipe: PipelineRecipe, scale: ScaleSettings, m: _Models) -> ScaleRow:
    """specdec_bench (target + draft, one sequence at a time) or eval (the target, lm-eval's batches)."""
    bench, data = stage == "specdec_bench", scale.data
    weights = m.target_weights + (2.0 * m.draft.params if bench else 0.0)
    batch = 1 if bench else recipe.eval.batch_size
    new = recipe.specdec_bench.max_new_tokens if bench else recipe.eval.max_gen_toks
    kv = batch * (data.prompt_tokens + new) * m.target.kv_bytes_per_token()
    what = f"target {m.target.name}" + (f" + draft {m.draft.name}" if bench else "")
    layout, g, per_gpu, fits = _inference_layout(weights, kv, scale.cluster, what)
    rate = decode_rate(m.target_weights, SEQUENTIAL, batch, scale, m.target_flops)
    if bench:
        b = recipe.specdec_bench
        runs = b.max_prompts * b.repeats * len(b.modes) * (2 + len(b.num_speculative_tokens))
        seconds, basis = runs * new / rate, f"{runs} decodes × {new} tokens at the plain-decoding rate (upper bound)"
    else:
        reqs = data.eval_requests
        seconds = reqs * new / rate + prefill_seconds(reqs * data.prompt_tokens, m.target_flops, SEQUENTIAL, scale)
        basis = f"{reqs:,} requests × ≤{new} tokens at batch {batch}"
    return ScaleRow(stage, layout, _gib(per_gpu), None, fits,
                    f"weights {_gib(weights / g)} + KV cache {_gib(kv / g)} per GPU",
                    f"{m.run} --from {stage} --until {stage}", seconds,
                    f"{basis}; assumed: {scale.rates.decode_bandwidth_efficiency:.0%} of HBM bandwidth")


def plan_at_scale(recipe: PipelineRecipe, scale: ScaleSettings | None = None,
                  recipe_ref: str | None = None) -> list[ScaleRow]:
    """A row per stage of `recipe`: layout, memory (GiB per GPU / host per node), launcher command, expected time.
    `scale` defaults to the recipe's `scale:` section; `recipe_ref` is how commands name the recipe."""
    scale = scale or recipe.scale or ScaleSettings()
    target_spec = scale.target_arch or recipe.target
    target_config = read_arch_config(target_spec)
    target = arch_size(target_config, name=target_spec)
    m = _Models(target, draft_size(recipe, scale, target_config, target),
                f"soaes pipeline run {recipe_ref or recipe.source}")
    tokens = {"cpt": scale.data.cpt_tokens, "sft_stage1": scale.data.sft_stage1_tokens,
              "sft_stage2": scale.data.sft_stage2_tokens, "sft_stage2_only": scale.data.sft_stage2_tokens}
    rows: list[ScaleRow] = []
    for stage in recipe.stages:
        if stage in CPU_STAGES:
            rows.append(_cpu_row(stage, m))
        elif stage in TRAIN_STAGES:
            cmd = f"soaes_train.cli run {scale.train_recipe or 'TRAIN_RECIPE.yaml'} --stage {stage}"
            rows.append(_train_row(recipe, scale, stage, target, tokens[stage], cmd))
        elif stage == "teacher_data":
            rows.append(_teacher_row(recipe, scale, m))
        elif stage == "dump_logits":
            rows.append(_dump_row(recipe, scale, m))
        elif stage == "distill_draft":
            rows.append(_distill_row(recipe, scale, m))
        else:  # specdec_bench, eval
            rows.append(_decode_row(stage, recipe, scale, m))
    return rows


def format_duration(seconds: float | None) -> str:
    """'3.2 d', '5.1 h', '12 min', '40 s' or '-'."""
    if seconds is None:
        return "-"
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def render_plan(rows: list[ScaleRow], target: str, scale: ScaleSettings) -> str:
    """The plan as text: a header, then per stage its layout, memory, launcher command and time."""
    c = scale.cluster
    lines = [f"scale plan for {target} on {c.nodes} node(s) × {c.gpus_per_node} {c.gpu} "
             f"({c.gpu_memory_gib:g} GiB each, {c.host_memory_gib:g} GiB host per node)",
             f"{'stage':15s} {'GiB/GPU':>8s} {'host GiB':>9s} {'fits':5s} {'time':>8s}  layout"]
    for r in rows:
        gpu = "-" if r.gpu_gib is None else f"{r.gpu_gib:.1f}"
        host = "-" if r.host_gib is None else f"{r.host_gib:.1f}"
        lines.append(f"{r.stage:15s} {gpu:>8s} {host:>9s} {'yes' if r.fits else 'NO':5s} "
                     f"{format_duration(r.seconds):>8s}  {r.layout}")
        lines.append(f"{'':15s} memory: {r.memory_detail}")
        lines.append(f"{'':15s} time:   {r.time_basis}")
        lines.append(f"{'':15s} run:    {r.launcher}")
    total = sum(r.seconds for r in rows if r.seconds is not None)
    lines.append(f"total GPU-stage time ≈ {format_duration(total)} (assumed rates are marked; measure and set "
                 "scale.rates)")
    return "\n".join(lines)
