"""Where a model runs: device, dtype, and (when one device cannot hold it) an accelerate `device_map`.

`Placement` is the config section (YAML → dataclass, validated: one `ConfigError` per bad value); `resolve()`
turns its `auto` values into what this machine has (`ResolvedPlacement`), whose `load_kwargs()` go to
`soaes_core.load_model`. `auto` means a CUDA GPU in bfloat16 (float16 where the GPU has no bf16) when one is
present, else the CPU in float32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_MAP_TARGET = re.compile(r"^(cpu|disk|mps|meta|cuda(:\d+)?)$")
_MEMORY_KEY = re.compile(r"^(cpu|mps|\d+|cuda:\d+)$")


def canonical_dtype(value: str) -> str:
    """'bf16' → 'bfloat16' and so on; 'auto' stays; anything else raises `ConfigError`."""
    name = DTYPE_ALIASES.get(value, value)
    if name != "auto" and name not in DTYPE_NAMES:
        raise ConfigError(f"dtype: expected auto, {', '.join(DTYPE_NAMES)} (or bf16, fp16, fp32), got {value!r}")
    return name


def memory_bytes(value: str | int, where: str) -> int:
    """'70GiB', '500MB', '1.5GB' or an int of bytes → bytes (accelerate's parser); `ConfigError` naming `where`."""
    if isinstance(value, bool) or (isinstance(value, int) and value <= 0):
        raise ConfigError(f"{where}: expected a positive size such as '70GiB' or '500MB', got {value!r}")
    if isinstance(value, int):
        return value
    from accelerate.utils import convert_file_size_to_int

    try:
        size = int(convert_file_size_to_int(value.strip()))
    except (ValueError, TypeError, AttributeError):
        size = -1
    if size <= 0:
        raise ConfigError(f"{where}: expected a positive size such as '70GiB' or '500MB', got {value!r}")
    return size


def _memory_key(key: str | int) -> str | int:
    """accelerate's key for a max_memory entry: GPU ordinals as ints ('0', 'cuda:0' → 0), 'cpu'/'mps' as they are."""
    text = str(key)
    if text.isdigit():
        return int(text)
    if text.startswith("cuda:"):
        return int(text.removeprefix("cuda:"))
    return text


@dataclass
class Placement:
    """Device and dtype of a model (`auto`: a GPU in bf16 if present, else the CPU in float32), and optional sharding:
    `device_map` (an accelerate strategy such as `auto`, or module → device) with `max_memory` per device
    (`{0: 70GiB, cpu: 200GiB}`) and `offload_folder` for what fits nowhere (disk offload)."""

    device: str = "auto"
    dtype: str = "auto"
    device_map: str | dict[str, str | int] | None = None
    max_memory: dict[str | int, str | int] | None = None
    offload_folder: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise ConfigError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        self.dtype = canonical_dtype(self.dtype)
        self._check_device_map()
        if self.max_memory is not None:
            if self.device_map is None:
                raise ConfigError("max_memory: needs a device_map (e.g. device_map: auto) to shard by")
            if not self.max_memory:
                raise ConfigError("max_memory: give one or more devices, e.g. {0: 70GiB, cpu: 200GiB}")
            for key, value in self.max_memory.items():
                if not _MEMORY_KEY.match(str(key)):
                    raise ConfigError(f"max_memory.{key}: unknown device (use a GPU number such as 0, cuda:N, cpu "
                                      "or mps)")
                memory_bytes(value, f"max_memory.{key}")
                if self.device == "cpu" and isinstance(_memory_key(key), int):
                    raise ConfigError(f"max_memory.{key}: a GPU budget, but device is cpu")
        if self.offload_folder is not None:
            if self.device_map is None:
                raise ConfigError("offload_folder: needs a device_map (disk offload is part of sharding)")
            if not self.offload_folder.strip():
                raise ConfigError("offload_folder: empty path")

    def _check_device_map(self) -> None:
        dm = self.device_map
        if dm is None:
            return
        if isinstance(dm, str):
            if dm not in DEVICE_MAP_STRATEGIES:
                raise ConfigError(f"device_map: expected one of {', '.join(DEVICE_MAP_STRATEGIES)} or a mapping of "
                                  f"module → device, got {dm!r}")
            return
        if not dm:
            raise ConfigError("device_map: an empty mapping places nothing (give module → device, or auto)")
        for module, target in dm.items():
            ok = (isinstance(target, int) and not isinstance(target, bool) and target >= 0) or (
                isinstance(target, str) and _MAP_TARGET.match(target))
            if not ok:
                raise ConfigError(f"device_map.{module}: expected a GPU number, cuda:N, cpu, mps or disk, "
                                  f"got {target!r}")
            if self.device == "cpu" and target not in ("cpu", "disk"):
                raise ConfigError(f"device_map.{module}: {target!r} is not on the CPU, but device is cpu")
        if "disk" in dm.values() and self.offload_folder is None:
            raise ConfigError("offload_folder: device_map puts modules on disk; give a folder for them")

    @property
    def sharded(self) -> bool:
        """True when a device_map spreads the model (over devices and/or disk)."""
        return self.device_map is not None

    def resolve(self, cuda_available: bool | None = None, bf16_supported: bool | None = None) -> ResolvedPlacement:
        """The concrete device and dtype `auto` stands for on this machine (arguments override the probe, for
        plans made for another machine). An explicit `cuda` without a GPU raises `ConfigError`."""
        if cuda_available is None or bf16_supported is None:
            import torch

            if cuda_available is None:
                cuda_available = torch.cuda.is_available()
            if bf16_supported is None:
                bf16_supported = bool(cuda_available and torch.cuda.is_bf16_supported())
        device = self.device
        if device == "auto":
            device = "cuda" if cuda_available else "cpu"
        elif device.startswith("cuda") and not cuda_available:
            raise ConfigError(f"device: {device} asked for, but no CUDA GPU is available (use auto or cpu)")
        dtype = self.dtype
        if dtype == "auto":
            dtype = ("bfloat16" if bf16_supported else "float16") if device.startswith("cuda") else "float32"
        device_map: str | dict[str, str | int] | None = self.device_map
        max_memory = ({_memory_key(k): v for k, v in self.max_memory.items()} if self.max_memory is not None
                      else None)
        return ResolvedPlacement(device=device, dtype=dtype, device_map=device_map, max_memory=max_memory,
                                 offload_folder=self.offload_folder)


@dataclass(frozen=True)
class ResolvedPlacement:
    """A placement with nothing left `auto` on the device or dtype: what a load will do on this machine."""

    device: str
    dtype: str
    device_map: str | dict[str, str | int] | None = None
    max_memory: dict[str | int, str | int] | None = field(default=None, hash=False)
    offload_folder: str | None = None

    @property
    def device_type(self) -> str:
        """'cuda', 'cpu' or 'mps' (the ordinal dropped: it does not change results)."""
        return self.device.split(":", 1)[0]

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `soaes_core.load_model` for this placement."""
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        if self.device_map is not None:
            kw.update(device_map=self.device_map, max_memory=self.max_memory, offload_folder=self.offload_folder)
        return kw

    def fingerprint(self, legacy: tuple[str, str] | None = ("cpu", "float32")) -> dict[str, str]:
        """What changes a stage's outputs: the device type and dtype. Empty when they equal `legacy` (what stages ran
        with before placements existed), so runs made then stay up to date. Sharding is left out: it moves
        weights, not results."""
        key = (self.device_type, self.dtype)
        return {} if key == legacy else {"device": key[0], "dtype": key[1]}

    def describe(self) -> str:
        """One line for plans and logs, e.g. 'cuda bfloat16' or 'cpu float32, device_map auto (+ disk)'."""
        text = f"{self.device} {self.dtype}"
        if self.device_map is not None:
            dm = self.device_map if isinstance(self.device_map, str) else f"{len(self.device_map)} modules"
            text += f", device_map {dm}" + (" (+ disk)" if self.offload_folder else "")
        return text


def input_device(model: Any) -> Any:
    """The device a model's input ids belong on: its embedding's device (a sharded model's first module; the CPU
    when that module sits on disk or meta, where accelerate's hooks move inputs themselves)."""
    import torch

    try:
        device = model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device
