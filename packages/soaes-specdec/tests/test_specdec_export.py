"""Serving hand-off (`export_for_vllm`, `soaes-specdec export-vllm`): the exported layer draft is a plain HF directory
that transformers loads back with the same greedy output, a restricted head is exported full with the kept tokens'
logits unchanged, the serve command carries vLLM's JSON config, and bad input is one clear line."""

from __future__ import annotations

import ast
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from soaes_core import load_tokenizer
from soaes_core.errors import InvalidArgumentError, ModelLoadError
from soaes_specdec import autoregressive_generate
from soaes_specdec.cli import main
from soaes_specdec.draft import HEAD_IDS_FILE, load_draft, make_layer_draft, restrict_output_head, unrestricted_copy
from soaes_specdec.export import (
    README,
    RESULT_FILE,
    SERVE_SCRIPT,
    best_num_speculative_tokens,
    export_for_vllm,
)
from soaes_specdec.vllm_bridge import VllmSpecSettings, build_speculative_config

PROMPT = torch.tensor([[1, 17, 300, 4021, 88, 9]])


@pytest.fixture
def layer_draft(tiny_qwen2: Any, tiny_qwen2_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "draft"
    make_layer_draft(tiny_qwen2, 1).save_pretrained(out, safe_serialization=True)
    load_tokenizer(str(tiny_qwen2_dir)).save_pretrained(out)
    return out


def _restricted_draft(tiny_qwen2: Any, tiny_qwen2_dir: Path, out: Path, kept: list[int]) -> Path:
    """A draft trained after restricting its head: its kept rows differ from the embeddings (as after KD)."""
    model = restrict_output_head(make_layer_draft(tiny_qwen2, 1), kept)
    with torch.no_grad():
        head = model.get_output_embeddings()
        noise = torch.randn(head.sub_weight.shape, generator=torch.Generator().manual_seed(1))
        head.sub_weight.add_(0.05 * noise)  # about the rows' own scale: some positions favour a kept token, some not
    unrestricted_copy(model).save_pretrained(out, safe_serialization=True)
    load_tokenizer(str(tiny_qwen2_dir)).save_pretrained(out)
    (out / HEAD_IDS_FILE).write_text(json.dumps({"token_ids": kept}), encoding="utf-8")
    return out


def _greedy(model: Any, new: int = 12) -> list[int]:
    return autoregressive_generate(model, PROMPT, max_new_tokens=new).sequences[0].tolist()


def _serve_config(script: Path) -> tuple[str, dict[str, Any]]:
    """The target and the JSON speculative config of the `vllm serve` line of `vllm_serve.sh`."""
    line = next(x for x in script.read_text(encoding="utf-8").splitlines() if x.startswith("exec vllm serve"))
    argv = shlex.split(line)
    assert argv[:3] == ["exec", "vllm", "serve"] and argv[-1] == "$@"
    return argv[3], json.loads(argv[argv.index("--speculative-config") + 1])


def test_layer_draft_exports_to_a_plain_hf_dir_with_the_same_greedy_output(layer_draft: Path, tiny_qwen2_dir: Path,
                                                                          tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    res = export_for_vllm(layer_draft, tmp_path / "serve", tiny_qwen2_dir, 4)
    exported = tmp_path / "serve" / "draft"
    assert res.kind == "layer" and res.draft_dir == exported.resolve() and res.restricted_head_tokens == 0
    loaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    assert _greedy(loaded) == _greedy(load_draft(layer_draft, dtype=torch.float32))
    # the target's tokenizer travels with the draft
    tok, ref = load_tokenizer(str(exported)), load_tokenizer(str(tiny_qwen2_dir))
    assert tok.get_vocab() == ref.get_vocab() and tok.eos_token_id == ref.eos_token_id
    target, spec = _serve_config(tmp_path / "serve" / SERVE_SCRIPT)
    assert target == str(tiny_qwen2_dir.resolve())
    assert spec == build_speculative_config(VllmSpecSettings(target, str(exported.resolve()), 4))
    assert spec["method"] == "draft_model" and spec["num_speculative_tokens"] == 4
    assert (tmp_path / "serve" / SERVE_SCRIPT).stat().st_mode & 0o111
    readme = (tmp_path / "serve" / README).read_text(encoding="utf-8")
    assert res.serve_command() in readme and "own environment" in readme
    # the offline snippet is valid Python naming the same model and config
    call = next(n for n in ast.walk(ast.parse(res.offline_snippet() or "")) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "LLM")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    assert kwargs == {"model": target, "speculative_config": spec}
    assert json.loads((tmp_path / "serve" / RESULT_FILE).read_text())["vllm_serve"] == res.serve_command()


def test_restricted_head_is_exported_full_with_the_kept_logits_unchanged(tiny_qwen2: Any, tiny_qwen2_dir: Path,
                                                                         tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    kept = list(range(0, 2000, 3))
    draft = _restricted_draft(tiny_qwen2, tiny_qwen2_dir, tmp_path / "draft", kept)
    res = export_for_vllm(draft, tmp_path / "serve", tiny_qwen2_dir, 3)
    exported = tmp_path / "serve" / "draft"
    assert res.restricted_head_tokens == len(kept) and "restricted output head" in res.note
    assert not (exported / HEAD_IDS_FILE).exists()
    assert res.note in (tmp_path / "serve" / README).read_text(encoding="utf-8")
    full = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    restricted = load_draft(draft, dtype=torch.float32)
    assert full.get_output_embeddings().weight.shape[0] == full.config.vocab_size  # a real full head
    with torch.no_grad():
        a, b = full(PROMPT).logits[0], restricted(PROMPT).logits[0]
    assert torch.allclose(a[:, kept], b[:, kept], atol=1e-5, rtol=0)  # the trained rows are kept as trained
    assert torch.isinf(b).any() and torch.isfinite(a).all()  # the restricted head's -inf is gone
    # greedy agrees wherever the full head's best token is a kept one, and differs where an unkept one wins (README)
    best = a.argmax(-1)
    inside = torch.tensor([int(t) in set(kept) for t in best])
    assert inside.any() and not inside.all()  # both cases occur on this prompt
    assert torch.equal(best[inside], b.argmax(-1)[inside])
    assert not torch.equal(best[~inside], b.argmax(-1)[~inside])


def test_feature_draft_is_exported_as_is_without_a_vllm_command(tiny_qwen2: Any, tiny_qwen2_dir: Path,
                                                                tmp_path: Path) -> None:
    from soaes_specdec.feature_draft import FeatureDraft, is_feature_draft_dir

    src = FeatureDraft.from_target(tiny_qwen2).save_pretrained(tmp_path / "fd")
    load_tokenizer(str(tiny_qwen2_dir)).save_pretrained(src)
    serve = tmp_path / "serve"
    serve.mkdir()
    (serve / SERVE_SCRIPT).write_text("stale\n")
    res = export_for_vllm(src, serve, tiny_qwen2_dir, 3)
    assert res.kind == "feature" and res.speculative_config is None and res.serve_command() is None
    assert not (serve / SERVE_SCRIPT).exists()  # no command that would serve the wrong thing
    assert "untested" in (serve / README).read_text(encoding="utf-8") and "fc.weight" in res.note
    assert is_feature_draft_dir(serve / "draft")
    a, b = FeatureDraft.from_pretrained(src), FeatureDraft.from_pretrained(serve / "draft")
    feats, ids = torch.randn(1, 5, a.hidden_size, generator=torch.Generator().manual_seed(0)), PROMPT[:, :5]
    with torch.no_grad():
        assert torch.equal(a.logits(a(feats, ids)), b.logits(b(feats, ids)))


def test_best_n_is_the_fastest_greedy_speculative_row() -> None:
    rows = [{"method": "plain", "mode": "greedy", "n": None, "tokens_per_s": 99.0},
            {"method": "speculative", "mode": "greedy", "n": 3, "tokens_per_s": 20.0},
            {"method": "speculative", "mode": "greedy", "n": 5, "tokens_per_s": 25.0},
            {"method": "speculative", "mode": "top_p", "n": 1, "tokens_per_s": 50.0}]
    assert best_num_speculative_tokens({"results": rows}) == 5
    assert best_num_speculative_tokens({"results": rows[:1]}) is None


def test_bad_input_is_one_clear_error(layer_draft: Path, tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"^draft .*missing: no such directory$"):
        export_for_vllm(tmp_path / "missing", tmp_path / "o", tiny_qwen2_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a model directory"):
        export_for_vllm(tmp_path / "empty", tmp_path / "o", tiny_qwen2_dir)
    with pytest.raises(ModelLoadError, match=r"^target "):
        export_for_vllm(layer_draft, tmp_path / "o", tmp_path / "empty")
    with pytest.raises(InvalidArgumentError, match="num_speculative_tokens"):
        export_for_vllm(layer_draft, tmp_path / "o", tiny_qwen2_dir, 0)
    assert not (tmp_path / "o").exists()


def test_cli_export_vllm(layer_draft: Path, tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve"
    res = CliRunner().invoke(main, ["export-vllm", str(layer_draft), "--target", str(tiny_qwen2_dir), "-o", str(out),
                                    "-n", "2"])
    assert res.exit_code == 0, res.output
    assert "vllm serve" in res.output and '"num_speculative_tokens": 2' in res.output
    assert _serve_config(out / SERVE_SCRIPT)[1]["num_speculative_tokens"] == 2
    bad = CliRunner().invoke(main, ["export-vllm", str(tmp_path / "nope"), "--target", str(tiny_qwen2_dir)])
    assert bad.exit_code == 2
    lines = [x for x in bad.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: draft ") and "no such directory" in lines[0]
