"""Serving hand-off: export a draft for vLLM beside the exact `vllm serve` command that pairs it with its target.

A layer draft becomes a plain HF directory with a *full* output head and the target's tokenizer files, which
`transformers.AutoModelForCausalLM` and vLLM's `draft_model` speculative method load as is. A draft trained with
a restricted head (`head_token_ids.json`) is written without that file: its head keeps every row as saved (the
kept tokens' rows are the trained ones, so their logits are unchanged), but tokens outside the kept set are no
longer -inf, so where one of them scores highest the exported draft proposes it and the restricted one does not.
Verification by the target keeps the output exact either way; only acceptance can differ.

A feature draft (`soaes_specdec.feature_draft`, EAGLE-style) is copied in its own format: vLLM's EAGLE-1 draft
(`EagleLlamaForCausalLM`, vllm/model_executor/models/llama_eagle.py) reads `fc.weight` without a bias, removes
layer 0's input norm and applies no final norm, while this feature draft has an fc bias, normalises layer 0's
input and applies a final norm: no renaming of weights computes the same function, so no vLLM command is
written for it.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soaes_core import atomic_write_json, load_tokenizer
from soaes_core.atomic import atomic_dir, atomic_write_text
from soaes_core.errors import InvalidArgumentError, ModelLoadError

from .draft import HEAD_IDS_FILE, check_draft_tokenizer, load_draft
from .vllm_bridge import VllmSpecSettings, build_speculative_config

DRAFT_SUBDIR = "draft"
SERVE_SCRIPT = "vllm_serve.sh"
README = "README.md"
RESULT_FILE = "export.json"
VLLM_REQUIREMENT = "vllm>=0.25"  # draft-model speculation; the `vllm` extra of soaes-specdec pins the same
FEATURE_DRAFT_NOTE = (
    "vLLM's EAGLE-1 draft (`method: eagle`, EagleLlamaForCausalLM in vllm/model_executor/models/llama_eagle.py) "
    "expects `fc.weight` (2H -> H, no bias) and `layers.N.*` with layer 0's input norm removed and no final norm; "
    "this feature draft has an fc bias, normalises layer 0's input and applies a final norm, so its weights cannot "
    "be mapped onto vLLM's EAGLE-1 layout without changing what it computes. It is exported in soaes's own "
    "feature-draft format (load it with `soaes_specdec.feature_draft.FeatureDraft.from_pretrained`); serving it "
    "in vLLM as is is untested. A draft trained with `layout: engine` has none of those parts: export it with "
    "`soaes-specdec export DRAFT --format vllm-eagle` (or `sglang-eagle`), which writes the engine's EAGLE folder.")


@dataclass(frozen=True)
class ExportResult:
    """What `export_for_vllm` wrote: the exported draft, the target it pairs with (absolute paths, as served), the
    speculative config (None when vLLM cannot load this draft kind) and the files under the serve folder."""

    serve_dir: Path
    draft_dir: Path
    target_dir: Path
    kind: str  # "layer" | "feature"
    num_speculative_tokens: int
    speculative_config: dict[str, Any] | None
    restricted_head_tokens: int = 0  # size of the kept set of a restricted head (now exported full); 0 = none
    note: str = ""
    files: list[str] = field(default_factory=list)

    def serve_command(self) -> str | None:
        """The exact `vllm serve TARGET --speculative-config '{...}'` command (None without a vLLM config)."""
        if self.speculative_config is None:
            return None
        return (f"vllm serve {shlex.quote(str(self.target_dir))} --speculative-config "
                f"{shlex.quote(json.dumps(self.speculative_config))}")

    def offline_snippet(self) -> str | None:
        """The equivalent offline `vllm.LLM(...)` Python code (None without a vLLM config)."""
        if self.speculative_config is None:
            return None
        return "\n".join([
            "from vllm import LLM, SamplingParams",
            "",
            f"llm = LLM(model={str(self.target_dir)!r},",
            f"          speculative_config={self.speculative_config!r})",
            "outputs = llm.generate([\"...\"], SamplingParams(temperature=0.0, max_tokens=128))",
            "print(outputs[0].outputs[0].text)",
        ])

    def to_dict(self) -> dict[str, Any]:
        return {"serve_dir": str(self.serve_dir), "draft": str(self.draft_dir), "target": str(self.target_dir),
                "kind": self.kind, "num_speculative_tokens": self.num_speculative_tokens,
                "speculative_config": self.speculative_config, "vllm_serve": self.serve_command(),
                "restricted_head_tokens": self.restricted_head_tokens, "note": self.note, "files": self.files}


def best_num_speculative_tokens(bench_report: dict[str, Any]) -> int | None:
    """The n of the fastest greedy speculative row of a `soaes-specdec bench` report (None when it has none)."""
    rows = [r for r in bench_report.get("results", []) if r.get("method") == "speculative"
            and r.get("mode") == "greedy" and isinstance(r.get("tokens_per_s"), (int, float))
            and isinstance(r.get("n"), int)]
    if not rows:
        return None
    return int(max(rows, key=lambda r: (r["tokens_per_s"], -r["n"]))["n"])


def _model_dir(role: str, path: str | os.PathLike[str]) -> Path:
    """`path` as an absolute HF model directory, or one `ModelLoadError` line saying why it is not one."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"{role} {p}: no such directory")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ModelLoadError(f"{role} {p}: not a model directory (no config.json)")
    return p.resolve()


def _target_dir(target: str | os.PathLike[str]) -> Path:
    """The target as a local HF directory vLLM can load (`embedded:`/`gguf:` specs resolve to their cache dir)."""
    spec = str(target)
    if spec.startswith(("embedded:", "gguf:")):
        from soaes_core.models import resolve_model_dir

        return resolve_model_dir(spec).resolve()
    if spec.startswith("hf:"):
        raise ModelLoadError(f"target {spec}: give a local model directory (vLLM and the exported files need one)")
    return _model_dir("target", spec)


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


def _vocab_size(path: Path, role: str) -> int | None:
    try:
        value = json.loads((path / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{role} {path / 'config.json'}: unreadable ({err})") from None
    return value if isinstance(value, int) else None


def _head_tokens(draft: Path) -> int:
    ids_file = draft / HEAD_IDS_FILE
    if not ids_file.is_file():
        return 0
    try:
        return len(json.loads(ids_file.read_text(encoding="utf-8"))["token_ids"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{ids_file}: unreadable restricted-head token ids ({err})") from None


def export_for_vllm(draft_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                    target_dir: str | os.PathLike[str], num_speculative_tokens: int = 3,
                    final_dir: str | os.PathLike[str] | None = None) -> ExportResult:
    """Write `out_dir/draft/` (the draft, see the module docstring), `vllm_serve.sh`, `README.md` and `export.json`.

    `final_dir`: where `out_dir` will live when served (a pipeline builds it in a partial folder and renames it);
    the command and README name absolute paths under it. The draft must share the target's tokenizer and
    vocabulary size (vLLM's draft_model method checks the latter).
    """
    from .feature_draft import is_feature_draft_dir

    n = num_speculative_tokens
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidArgumentError(f"num_speculative_tokens must be an int >= 1, got {n!r}")

    draft = _model_dir("draft", draft_dir)
    target = _target_dir(target_dir)
    d_vocab, t_vocab = _vocab_size(draft, "draft"), _vocab_size(target, "target")
    if d_vocab != t_vocab:
        raise InvalidArgumentError(f"draft {draft} has vocab_size {d_vocab} but target {target} has {t_vocab}: "
                                   "vLLM's draft_model speculative decoding needs equal vocabularies")
    tokenizer = load_tokenizer(str(target))
    if _has_tokenizer(draft):
        check_draft_tokenizer(target, draft, target_tokenizer=tokenizer)
    out = Path(out_dir)
    served = Path(final_dir if final_dir is not None else out).resolve()
    feature = is_feature_draft_dir(draft)
    head_tokens = _head_tokens(draft)
    with atomic_dir(out / DRAFT_SUBDIR) as tmp:
        if feature:
            from .feature_draft import FeatureDraft

            FeatureDraft.from_pretrained(draft, device="cpu").save_pretrained(tmp)
        else:
            # The directory already holds the full head (a restricted draft is saved through `unrestricted_copy`):
            # loading without the restriction keeps every row as saved, the kept rows being the trained ones.
            load_draft(draft, device="cpu", restrict_head=False).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    exported = served / DRAFT_SUBDIR
    if feature:
        spec, note = None, FEATURE_DRAFT_NOTE
    else:
        spec = build_speculative_config(VllmSpecSettings(str(target), str(exported), n))
        note = ""
        if head_tokens:
            note = (f"The draft was trained with a restricted output head ({head_tokens} kept tokens); the export has "
                    "the full head: logits of the kept tokens are unchanged, the other tokens are no longer -inf, so "
                    "greedy proposals can differ from the benchmarked restricted draft where an unkept token scores "
                    "highest. Output stays exact (the target verifies); acceptance can differ.")
    files = [DRAFT_SUBDIR + "/", *([SERVE_SCRIPT] if spec is not None else []), README, RESULT_FILE]
    result = ExportResult(served, exported, target, "feature" if feature else "layer", n, spec, head_tokens, note,
                          files)
    if spec is not None:
        atomic_write_text(out / SERVE_SCRIPT, serve_script(result))
        os.chmod(out / SERVE_SCRIPT, 0o755)
    else:
        (out / SERVE_SCRIPT).unlink(missing_ok=True)  # a script left by an earlier export would serve a stale draft
    atomic_write_text(out / README, serve_readme(result))
    atomic_write_json(out / RESULT_FILE, result.to_dict())
    return result


def serve_script(result: ExportResult) -> str:
    """`vllm_serve.sh`: the serve command; extra arguments (port, memory, ...) are passed on to `vllm serve`."""
    command = result.serve_command()
    if command is None:
        raise InvalidArgumentError(f"no vLLM command for a {result.kind} draft: {result.note}")
    return "\n".join([
        "#!/usr/bin/env bash",
        f"# Serve the target with its distilled draft through vLLM speculative decoding (n = "
        f"{result.num_speculative_tokens}).",
        f"# Run it in vLLM's own environment (pip install '{VLLM_REQUIREMENT}'; vLLM pins its own torch).",
        "# Extra arguments go to `vllm serve`, e.g. ./vllm_serve.sh --port 8000 --gpu-memory-utilization 0.8",
        "set -euo pipefail",
        f'exec {command} "$@"',
        "",
    ])


def serve_readme(result: ExportResult) -> str:
    """README.md of the serve folder: what is where, the command, the offline snippet, and any caveat."""
    lines = ["# Serving hand-off", "",
             f"- target (the trained model, an HF directory): `{result.target_dir}`",
             f"- draft ({result.kind} draft, exported for serving): `{result.draft_dir}`",
             f"- speculative tokens per step: {result.num_speculative_tokens}", ""]
    command = result.serve_command()
    if command is not None:
        lines += ["vLLM needs its own environment (it pins its own torch): `python -m venv vllm-env && "
                  f"vllm-env/bin/pip install '{VLLM_REQUIREMENT}'` (soaes-specdec's `vllm` extra). Then serve (or run "
                  f"`./{SERVE_SCRIPT}`):", "",
                  "```bash", command, "```", "", "Offline, in Python:", "", "```python",
                  str(result.offline_snippet()), "```", "",
                  "The draft is a plain Hugging Face directory with a full output head and the target's tokenizer: "
                  "`transformers.AutoModelForCausalLM.from_pretrained` loads it too. Paths are absolute: after moving "
                  "the run folder, export again (`soaes-specdec export-vllm`)."]
    else:
        lines += ["No vLLM command is written for this draft (see below). soaes's own decoder serves it, exactly "
                  "(greedy output equals plain decoding; sampling follows the target's distribution):", "",
                  "```bash",
                  f"soaes-specdec generate --target {shlex.quote(str(result.target_dir))} "
                  f"--draft {shlex.quote(str(result.draft_dir))} -n {result.num_speculative_tokens} "
                  "'什么是国有资本投资公司？'",
                  "```", ""]
    if result.note:
        lines += ["", result.note]
    return "\n".join(lines) + "\n"
