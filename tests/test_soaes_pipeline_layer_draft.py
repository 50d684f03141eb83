"""The layer-draft path of `soaes pipeline` (the demo uses a feature draft): teacher data → logit dump → KD of a
layer-truncated draft (soaes-train's trainer) → vLLM hand-off, as a slice on the embedded target."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from soaes.cli import main
from soaes.pipeline import stage_dirname

pytestmark = pytest.mark.slow


def test_layer_draft_slice_distils_and_exports_for_vllm(tmp_path: Path, embedded_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from soaes_core import encode_chat_prompt, load_tokenizer
    from soaes_specdec import autoregressive_generate
    from soaes_specdec.draft import load_draft

    recipe = tmp_path / "layer.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "layer", "trained_target": "embedded:smollm2-135m", "threads": 1,
        "stages": ["teacher_data", "dump_logits", "distill_draft", "export"],
        "teacher_data": {"max_prompts": 8, "max_new_tokens": 12, "max_length": 96},
        "dump_logits": {"top_k": 16},
        "distill_draft": {"kind": "layer", "draft_layers": 2, "train": {
            "max_steps": 2, "per_device_train_batch_size": 2, "save_steps": 1, "save_total_limit": 1}},
        "export": {"num_speculative_tokens": 2}}), encoding="utf-8")
    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["pipeline", "run", str(recipe), "-o", str(run)])
    assert res.exit_code == 0, res.output
    drafts = json.loads((run / "stages" / stage_dirname("distill_draft") / "drafts.json").read_text())
    assert set(drafts) == {"undistilled", "distilled"}
    assert 0.0 <= drafts["distilled"]["offline_acceptance"]["acceptance_greedy"] <= 1.0
    serve = (run / "stages" / stage_dirname("export") / "serve").resolve()
    line = next(x for x in (serve / "vllm_serve.sh").read_text().splitlines() if x.startswith("exec vllm serve"))
    argv = shlex.split(line)
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec == {"method": "draft_model", "model": str(serve / "draft"), "num_speculative_tokens": 2}
    assert line.removeprefix("exec ").removesuffix(' "$@"') in (serve / "README.md").read_text()
    # the exported draft loads with plain transformers and decodes greedily as the distilled draft does
    ids = torch.tensor([encode_chat_prompt(load_tokenizer("embedded:smollm2-135m"), "什么是增值税？")])
    exported = AutoModelForCausalLM.from_pretrained(serve / "draft", dtype=torch.float32).eval()
    distilled = load_draft(run / "stages" / stage_dirname("distill_draft") / "distilled" / "model",
                           dtype=torch.float32)
    assert torch.equal(autoregressive_generate(exported, ids, max_new_tokens=12).sequences,
                       autoregressive_generate(distilled, ids, max_new_tokens=12).sequences)
