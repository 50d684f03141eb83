"""soaes-core: the shared foundation of soaes (model loading, configs, atomic I/O, manifests)."""

from typing import TYPE_CHECKING, Any

from .atomic import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text
from .cache import cache_root
from .config import dump_config, from_dict, load_config, load_yaml, to_dict
from .errors import (
    CacheError,
    ConfigError,
    DataError,
    IntegrityError,
    InvalidArgumentError,
    ModelLoadError,
    SoaesError,
)
from .hashing import sha256_bytes, sha256_file, sha256_tree, tokenizer_fingerprint, tokenizer_mismatch
from .jsonl import JsonlRecord, JsonlReject, iter_jsonl, read_jsonl, write_jsonl
from .manifest import Timer, build_manifest, read_manifest, verify_outputs, write_manifest
from .progress import progress, progress_bar
from .prompts import PromptRecord, encode_chat_prompt, read_prompt_records, read_prompts

__version__ = "0.2.0"

# Names whose modules import torch are loaded on first use, so `import soaes_core` stays light for processes that
# only read data (a curation worker on Ray or Slurm imports in well under a second instead of ~4 s).
_LAZY = {
    **dict.fromkeys(("DEFAULT_MODEL", "EMBEDDED_MODELS", "embedded_available", "embedded_gguf_path", "load_model",
                     "load_tokenizer", "parse_spec", "resolve_device", "resolve_dtype", "resolve_model_dir"),
                    "models"),
    "seed_everything": "seeding",
}

if TYPE_CHECKING:
    from .models import (
        DEFAULT_MODEL,
        EMBEDDED_MODELS,
        embedded_available,
        embedded_gguf_path,
        load_model,
        load_tokenizer,
        parse_spec,
        resolve_device,
        resolve_dtype,
        resolve_model_dir,
    )
    from .seeding import seed_everything


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'soaes_core' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_MODEL", "EMBEDDED_MODELS", "CacheError", "ConfigError", "DataError", "IntegrityError",
    "InvalidArgumentError", "JsonlRecord", "JsonlReject", "ModelLoadError", "SoaesError", "Timer",
    "atomic_dir", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "build_manifest",
    "cache_root", "dump_config", "embedded_available", "embedded_gguf_path", "from_dict", "iter_jsonl",
    "load_config", "load_model", "load_tokenizer", "load_yaml", "parse_spec", "progress", "progress_bar",
    "read_jsonl", "read_manifest", "resolve_device", "resolve_dtype", "resolve_model_dir", "seed_everything",
    "sha256_bytes", "sha256_file", "sha256_tree", "to_dict", "tokenizer_fingerprint", "tokenizer_mismatch",
    "verify_outputs", "write_jsonl", "write_manifest",
    "PromptRecord", "encode_chat_prompt", "read_prompt_records", "read_prompts",
]
