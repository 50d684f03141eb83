"""soaes-core: the shared foundation of soaes (model loading, configs, atomic I/O, manifests)."""

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
from .hashing import sha256_bytes, sha256_file, sha256_tree
from .jsonl import JsonlRecord, JsonlReject, iter_jsonl, read_jsonl, write_jsonl
from .manifest import Timer, build_manifest, read_manifest, verify_outputs, write_manifest
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
from .progress import progress, progress_bar
from .seeding import seed_everything

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "EMBEDDED_MODELS", "CacheError", "ConfigError", "DataError", "IntegrityError",
    "InvalidArgumentError", "JsonlRecord", "JsonlReject", "ModelLoadError", "SoaesError", "Timer",
    "atomic_dir", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "build_manifest",
    "cache_root", "dump_config", "embedded_available", "embedded_gguf_path", "from_dict", "iter_jsonl",
    "load_config", "load_model", "load_tokenizer", "load_yaml", "parse_spec", "progress", "progress_bar",
    "read_jsonl", "read_manifest", "resolve_device", "resolve_dtype", "resolve_model_dir", "seed_everything",
    "sha256_bytes", "sha256_file", "sha256_tree", "to_dict", "verify_outputs", "write_jsonl", "write_manifest",
]
