"""Online distillation: the stream is served by soaes_specdec, rejected positions are buffered and the draft is
updated from them alone once the buffer passes its threshold; `soaes-distill online` saves and resumes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from soaes_core import load_model
from soaes_core.testing import make_tiny_qwen2
from soaes_distill import online as online_mod
from soaes_distill.cli import main
from soaes_distill.draft_init import make_small_draft
from soaes_distill.online import OnlineConfig, _update, online_distill, rejected_loss, rejected_positions
from soaes_distill.trainer import KDConfig

TEXTS = ["state assets", "the board of", "国有企业", "dividend policy", "audit report", "mixed ownership"]


def _half_wrong_draft(target, first: int, seq: torch.Tensor):
    """A copy of `target` whose head row of one token the target predicts is negated (untied): the copy disagrees
    with the target wherever the target's argmax is that token, and agrees elsewhere."""
    draft = copy.deepcopy(target).requires_grad_(True)
    with torch.no_grad():
        t_top = target(input_ids=seq[None]).logits[0, first - 1:-1].argmax(-1)
        draft.lm_head.weight = torch.nn.Parameter(draft.lm_head.weight.detach().clone())
        draft.config.tie_word_embeddings = False
        draft.lm_head.weight[int(t_top[0])] *= -1
    return draft


def test_rejected_positions_are_where_the_argmax_differs(tiny_qwen2, embedded_tokenizer) -> None:
    prompt = embedded_tokenizer(TEXTS[0])["input_ids"]
    seq = torch.tensor([*prompt, 5, 6, 7, 8, 9, 10, 11, 12])
    first = len(prompt)
    draft = make_small_draft(tiny_qwen2, num_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                             num_key_value_heads=1, seed=5)
    pos, logits = rejected_positions(tiny_qwen2, draft, seq, first)
    with torch.no_grad():
        t = tiny_qwen2(input_ids=seq[None]).logits[0]
        d = draft(input_ids=seq[None]).logits[0]
    expect = [p for p in range(first - 1, len(seq) - 1) if int(t[p].argmax()) != int(d[p].argmax())]
    assert pos.tolist() == expect and logits.shape == (len(expect), 49152)
    assert torch.allclose(logits, t[pos], atol=1e-5)


def test_updates_reach_only_rejected_positions(tiny_qwen2, embedded_tokenizer, distill_texts) -> None:
    """The gradient of an update reaches the draft's logits at the rejected positions and nowhere else: a loss that
    also counted accepted (or prompt) positions fails this."""
    seq = torch.tensor(embedded_tokenizer(distill_texts[0])["input_ids"])  # a served sequence: 4 prompt tokens
    first = 4
    draft = _half_wrong_draft(tiny_qwen2, first, seq)
    pos, t_logits = rejected_positions(tiny_qwen2, draft, seq, first)
    generated = set(range(first - 1, len(seq) - 1))
    accepted = generated - set(pos.tolist())
    assert pos.numel() and accepted, "the test needs both rejected and accepted positions"
    grads: list[torch.Tensor] = []

    def keep_grad(module, inputs, out) -> None:
        out.register_hook(grads.append)

    draft.lm_head.register_forward_hook(keep_grad)
    cfg = OnlineConfig(update_steps=1, learning_rate=1e-3, kd=KDConfig(alpha=0.5, temperature=1.0))
    before = draft.lm_head.weight.detach().clone()
    _update(draft, torch.optim.AdamW(draft.parameters(), lr=1e-3), [(seq, pos, t_logits)], cfg)
    assert len(grads) == 1
    touched = set((grads[0][0].abs().sum(-1) > 0).nonzero().squeeze(-1).tolist())
    assert touched == set(pos.tolist())
    assert not torch.equal(before, draft.lm_head.weight)
    # the pure loss agrees: its gradient rows are the rejected positions
    logits = draft(input_ids=seq[None]).logits[0].detach().requires_grad_(True)
    rejected_loss(logits, seq, pos, t_logits, cfg.kd).backward()
    assert set((logits.grad.abs().sum(-1) > 0).nonzero().squeeze(-1).tolist()) == set(pos.tolist())


def test_a_draft_that_is_never_rejected_is_never_updated(tiny_qwen2, embedded_tokenizer) -> None:
    draft = copy.deepcopy(tiny_qwen2).requires_grad_(True)
    before = [p.detach().clone() for p in draft.parameters()]
    prompts = [embedded_tokenizer(t)["input_ids"] for t in TEXTS[:3]]
    res = online_distill(tiny_qwen2, draft, prompts, OnlineConfig(max_new_tokens=6, buffer_threshold=1,
                                                                   learning_rate=1e-2))
    assert res.updates == 0 and res.buffered_positions == 0 and res.window_acceptance(0) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, draft.parameters(), strict=True))


def test_online_distillation_updates_draft(tiny_qwen2, embedded_tokenizer) -> None:
    draft = make_small_draft(tiny_qwen2, num_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                             num_key_value_heads=1, seed=5)  # a random draft: disagrees often
    before = [p.detach().clone() for p in draft.parameters()]
    prompts = [embedded_tokenizer(t)["input_ids"] for t in TEXTS]
    res = online_distill(tiny_qwen2, draft, prompts,
                         OnlineConfig(max_new_tokens=8, buffer_threshold=2, update_steps=2, learning_rate=1e-3))
    assert len(res.acceptance) == 6 and all(0.0 <= a <= 1.0 for a in res.acceptance)
    assert res.updates >= 1 and res.buffered_positions >= 2 and res.trained_positions == res.buffered_positions
    assert any(not torch.equal(a, b) for a, b in zip(before, draft.parameters(), strict=False))
    assert 0.0 <= res.window_acceptance(0, 3) <= 1.0


def test_paper_defaults() -> None:
    cfg = OnlineConfig()
    assert cfg.learning_rate == 1e-6 and cfg.epochs == 1 and (cfg.kd.alpha, cfg.kd.divergence) == (1.0, "forward_kl")


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A random draft with its own (untied) head: it disagrees with the tiny target (whose tied head mostly repeats
    the input token) at most positions."""
    return make_tiny_qwen2(tmp_path_factory.mktemp("online-draft"), seed=4, num_hidden_layers=1,
                           tie_word_embeddings=False)


def test_online_command_saves_and_resumes(tmp_path, tiny_qwen2_dir, draft_dir, monkeypatch) -> None:
    monkeypatch.setenv("SOAES_PROGRESS", "0")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(TEXTS[:4])))
    args = ["online", "--target", str(tiny_qwen2_dir), "--draft", str(draft_dir), "--prompts", str(prompts),
            "--max-new-tokens", "6", "--buffer-threshold", "4", "--update-steps", "1", "--learning-rate", "1e-3",
            "--device", "cpu", "--no-chat"]
    runner = CliRunner()
    res = runner.invoke(main, [*args, "--out", str(tmp_path / "full")])
    assert res.exit_code == 0, res.output
    full = tmp_path / "full"
    manifest = json.loads((full / "manifest.json").read_text())
    assert manifest["method"] == "online_kd" and manifest["counts"]["requests"] == 4
    assert manifest["counts"]["updates"] >= 2  # the test below needs a checkpoint before the last one
    history = [json.loads(line) for line in (full / "online_history.jsonl").read_text().splitlines()]
    assert [h["prompt_id"] for h in history] == ["p0", "p1", "p2", "p3"]
    trained = load_model(full / "model", dtype=torch.float32, device="cpu")
    original = load_model(draft_dir, dtype=torch.float32, device="cpu")
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), original.parameters(), strict=True))

    real_save, calls = online_mod._save_checkpoint, []

    def killed_after_first_checkpoint(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_save(*a, **k)

    monkeypatch.setattr(online_mod, "_save_checkpoint", killed_after_first_checkpoint)
    res = runner.invoke(main, [*args, "--out", str(tmp_path / "resumed")])
    assert res.exit_code != 0 and not (tmp_path / "resumed" / "model").exists()
    monkeypatch.undo()
    monkeypatch.setenv("SOAES_PROGRESS", "0")
    res = runner.invoke(main, [*args, "--out", str(tmp_path / "resumed")])
    assert res.exit_code == 0, res.output
    resumed = load_model(tmp_path / "resumed" / "model", dtype=torch.float32, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), resumed.parameters(), strict=True))
    again = [json.loads(line) for line in (tmp_path / "resumed" / "online_history.jsonl").read_text().splitlines()]
    assert again == history
    # a changed setting does not resume someone else's checkpoint
    res = runner.invoke(main, [*args, "--out", str(tmp_path / "resumed"), "--learning-rate", "1e-4"])
    assert res.exit_code == 2 and "checkpoint was made with other settings" in res.output
