"""Shipped recipes (YAML files in `soaes_train/recipe_files/`) and model specs only recipes use.

`soaes-train recipes` lists them; `soaes-train run NAME` runs one by name. Besides soaes_core model specs a
recipe may name `testing:tiny-qwen2`: the seeded tiny random Qwen2 of `soaes_core.testing`, built once
into the soaes cache (for CPU smoke runs).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from soaes_core import cache_root, load_yaml, parse_spec, resolve_model_dir
from soaes_core.cache import file_lock
from soaes_core.errors import ConfigError

TINY_QWEN2_SPEC = "testing:tiny-qwen2"

# Architecture-only configs (public config.json values) of the paper's models, so `soaes-train estimate` sizes
# them offline; the hub ids and short names that map to each.
SHIPPED_ARCHITECTURES = {
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"),
    "qwen2.5-72b": ("Qwen/Qwen2.5-72B", "Qwen/Qwen2.5-72B-Instruct"),
}


def architecture_source(spec: str) -> str:
    """A directory with the config.json of `spec`: the shipped architecture for the paper's models (by short name,
    `hf:ORG/NAME` or hub id; no download), otherwise `resolve_training_model(spec)`."""
    key = spec.removeprefix("hf:")
    for name, hub_ids in SHIPPED_ARCHITECTURES.items():
        if key.lower() == name or key in hub_ids:
            return str(recipe_dir() / "model_configs" / name)
    return resolve_training_model(spec)


def recipe_dir() -> Path:
    """Directory of the shipped recipe YAML files."""
    return Path(str(resources.files("soaes_train") / "recipe_files"))


def list_recipes() -> dict[str, str]:
    """Shipped recipe name → one-line description."""
    out = {}
    for p in sorted(recipe_dir().glob("*.yaml")):
        data = load_yaml(p) or {}
        out[p.stem] = str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""
    return out


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe file path, or a shipped recipe's name (with or without `.yaml`)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    shipped = recipe_dir() / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if shipped.is_file():
        return shipped
    raise ConfigError(f"{name_or_path}: no such recipe file or shipped recipe "
                      f"(shipped: {', '.join(list_recipes())})")


def resolve_training_model(spec: str) -> str:
    """A `from_pretrained`-able source for `spec`: a local directory, or a hub id for `hf:ORG/NAME`."""
    if spec == TINY_QWEN2_SPEC:
        from soaes_core.testing import make_tiny_qwen2

        out = cache_root() / "models" / "tiny-qwen2-seed0"
        with file_lock(cache_root() / "models" / ".tiny-qwen2.lock"):
            if not (out / "config.json").is_file():
                make_tiny_qwen2(out, seed=0)
        return str(out)
    resolved = parse_spec(spec)
    if resolved.kind == "hub":
        return resolved.hub_id or spec
    return str(resolve_model_dir(spec))
