"""DeepSpeed ZeRO-2/3 configuration, validation, memory pre-flight and process-group setup.

The config handed to `transformers.TrainingArguments(deepspeed=...)` is generated from the recipe (or read
from the user's JSON) with `"auto"` values that the Trainer fills from its own arguments. The optimizer is
DeepSpeed's AdamW (→ `DeepSpeedCPUAdam` when offloaded, a C++ extension compiled once into a fixed
`TORCH_EXTENSIONS_DIR`); the LR scheduler is left to the Trainer so the paper's schedules apply unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soaes_core import cache_root
from soaes_core.errors import ConfigError

from .config import DeepSpeedConfig, TrainConfig

log = logging.getLogger(__name__)

_OFFLOAD_DEVICES = ("cpu", "nvme", "none")


def configure_torch_extensions_dir() -> Path:
    """Pin `TORCH_EXTENSIONS_DIR` (default `$SOAES_CACHE/torch_extensions`) so DeepSpeed's CPU Adam is built
    once and reused: with two `ninja` binaries on PATH an unpinned dir triggers rebuilds (~50 s each)."""
    path = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cache_root() / "torch_extensions")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(path)
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_distributed() -> str:
    """Initialise the process group DeepSpeed needs: gloo on CPU (a single process gets RANK=0,
    WORLD_SIZE=1 and a free local port when no launcher set them), nccl on CUDA. Returns the backend."""
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if dist.is_available() and dist.is_initialized():
        return dist.get_backend()
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)
    return backend


def prepare_deepspeed(deepspeed: DeepSpeedConfig, train: TrainConfig, bf16: bool) -> dict[str, Any]:
    """Everything a DeepSpeed run needs before its TrainingArguments: the pinned extensions dir, the ZeRO config
    and the process group. Returns the config dict for `build_training_arguments`."""
    configure_torch_extensions_dir()
    config = build_deepspeed_config(deepspeed, train, bf16=bf16)
    ensure_distributed()
    return config


def validate_deepspeed_dict(cfg: Any, source: str) -> dict[str, Any]:
    """Check the ZeRO part of a DeepSpeed config; raise one-line `ConfigError`s naming `source` and the key."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: DeepSpeed config must be a JSON object, got {type(cfg).__name__}")
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{source}: zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    for key in ("offload_optimizer", "offload_param"):
        off = zero.get(key)
        if off is None:
            continue
        dev = off.get("device") if isinstance(off, dict) else None
        if dev not in _OFFLOAD_DEVICES:
            raise ConfigError(f"{source}: zero_optimization.{key}.device must be one of "
                              f"{', '.join(_OFFLOAD_DEVICES)}, got {dev!r}")
        if key == "offload_param" and dev != "none" and stage != 3:
            raise ConfigError(f"{source}: zero_optimization.offload_param needs stage 3, got stage {stage}")
        if key == "offload_optimizer" and dev != "none" and stage == 0:
            raise ConfigError(f"{source}: zero_optimization.offload_optimizer needs stage >= 1")
    for key in ("bf16", "fp16"):
        if cfg.get(key, {}).get("enabled") is True and not torch.cuda.is_available() and key == "fp16":
            raise ConfigError(f"{source}: fp16 needs a CUDA device")
    return cfg


def load_deepspeed_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a user-supplied DeepSpeed JSON."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed.config_file: no such file {p}")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{p}:{err.lineno}: invalid JSON: {err.msg}") from None
    return validate_deepspeed_dict(cfg, str(p))


def build_deepspeed_config(ds: DeepSpeedConfig, train: TrainConfig, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config for `ds` (ZeRO stage, CPU offload), with Trainer-filled `"auto"` values."""
    if ds.config_file:
        return load_deepspeed_json(ds.config_file)
    zero: dict[str, Any] = {"stage": ds.stage, "overlap_comm": ds.overlap_comm,
                            "contiguous_gradients": ds.contiguous_gradients}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.reduce_bucket_size is not None:
        zero["reduce_bucket_size"] = ds.reduce_bucket_size
    if ds.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = ds.stage3_gather_16bit_weights_on_model_save
    cfg = {
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto"}},
        "gradient_clipping": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return validate_deepspeed_dict(cfg, "deepspeed")


@dataclass
class MemoryEstimate:
    """ZeRO model-state memory needs (bytes) versus what this machine has."""

    total_params: int
    largest_layer_params: int
    stage: int
    cpu_bytes_needed: int
    gpu_bytes_needed: int
    cpu_bytes_available: int | None
    gpu_bytes_available: int | None
    warnings: list[str]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(total unique parameters, largest single module's own parameters) — the estimator's inputs.
    Works on meta-device models (unique by identity, not by data pointer)."""
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, largest


def host_memory_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def estimate_zero_memory(total_params: int, largest_layer_params: int, ds: DeepSpeedConfig,
                         cpu_available: int | None = None, gpu_available: int | None = None) -> MemoryEstimate:
    """DeepSpeed's own ZeRO-2/3 model-state estimators, plus warnings when host RAM or per-GPU memory is short.
    (Activations are extra; gradient checkpointing keeps them small.)"""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    gpus = ds.num_gpus_per_node or max(1, torch.cuda.device_count())
    if ds.stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params, largest_layer_params, num_gpus_per_node=gpus, num_nodes=ds.num_nodes,
            cpu_offload=ds.offload_optimizer, cpu_offload_params=ds.offload_param, zero_init=True)
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node=gpus,
                                                         num_nodes=ds.num_nodes, cpu_offload=ds.offload_optimizer)
    if cpu_available is None:
        cpu_available = host_memory_available()
    if gpu_available is None and torch.cuda.is_available():
        gpu_available = torch.cuda.get_device_properties(0).total_memory
    warnings = []
    gib = 2**30
    if cpu_available is not None and cpu > cpu_available:
        warnings.append(f"ZeRO-{ds.stage} model states need ~{cpu / gib:.1f} GiB host RAM per node, "
                        f"{cpu_available / gib:.1f} GiB available")
    if gpu_available is not None and gpu > gpu_available:
        warnings.append(f"ZeRO-{ds.stage} model states need ~{gpu / gib:.1f} GiB per GPU, "
                        f"{gpu_available / gib:.1f} GiB available (offload params/optimizer or add GPUs)")
    return MemoryEstimate(total_params, largest_layer_params, ds.stage, int(cpu), int(gpu), cpu_available,
                          gpu_available, warnings)
