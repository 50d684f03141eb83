"""Environment report for `soaes info`: package versions, torch device, embedded model, optional extras."""

from __future__ import annotations

import platform
from typing import Any

from soaes_core.models import EMBEDDED_MODELS, embedded_available, embedded_gguf_path
from soaes_core.versions import KEY_DEPENDENCIES, SOAES_PACKAGES, module_available, package_versions

OPTIONAL_EXTRAS = {"deepspeed": "deepspeed", "flash-attn": "flash_attn", "vllm": "vllm", "triton": "triton",
                   "lm-eval": "lm_eval"}


def collect_info() -> dict[str, Any]:
    """Everything `soaes info` reports, as a plain dict (also used by `soaes info --json`)."""
    import torch

    versions = package_versions(SOAES_PACKAGES + KEY_DEPENDENCIES)
    cuda = torch.cuda.is_available()
    device = {"torch": torch.__version__, "cuda_available": cuda,
              "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "cuda_version": torch.version.cuda, "threads": torch.get_num_threads()}
    embedded = {}
    for name in EMBEDDED_MODELS:
        ok = embedded_available(name)
        embedded[name] = {"available": ok, "path": str(embedded_gguf_path(name)) if ok else None}
    extras = {name: module_available(mod) for name, mod in OPTIONAL_EXTRAS.items()}
    return {"python": platform.python_version(), "platform": platform.platform(),
            "packages": {k: versions[k] for k in SOAES_PACKAGES},
            "dependencies": {k: versions[k] for k in KEY_DEPENDENCIES},
            "torch": device, "embedded_models": embedded, "optional_extras": extras}


def format_info(info: dict[str, Any]) -> str:
    """Human-readable rendering of `collect_info()`."""
    lines = [f"python       {info['python']} ({info['platform']})", "", "soaes packages:"]
    for k, v in info["packages"].items():
        lines.append(f"  {k:<16} {v or 'not installed'}")
    lines += ["", "dependencies:"]
    for k, v in info["dependencies"].items():
        lines.append(f"  {k:<16} {v or '-'}")
    t = info["torch"]
    lines += ["", f"torch device: {t['device']} (cuda available: {t['cuda_available']}, threads: {t['threads']})",
              "", "embedded models:"]
    for k, v in info["embedded_models"].items():
        lines.append(f"  embedded:{k:<12} {'available at ' + v['path'] if v['available'] else 'missing'}")
    lines += ["", "optional extras:"]
    for k, v in info["optional_extras"].items():
        lines.append(f"  {k:<16} {'yes' if v else 'no'}")
    return "\n".join(lines)
