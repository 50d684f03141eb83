"""Feature-conditioned draft training (`soaes_distill.feature_kd`): loss goes down, the teacher-forced
estimator equals a direct computation, resume equals an uninterrupted run, bad input fails with one clear error."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from soaes_core.errors import ConfigError, DataError, ModelLoadError
from soaes_distill.acceptance import acceptance_probabilities
from soaes_distill.cli import main
from soaes_distill.feature_kd import (
    CHECKPOINT_FILE,
    FeatureKDConfig,
    _batch,
    autocast_dtype,
    build_draft,
    cached_features,
    estimate_feature_acceptance,
    extract_features,
    feature_kd_loss,
    head_weight,
    sampled_acceptance,
    train_feature_draft,
    two_step_hidden,
)
from soaes_distill.token_data import TokenExample, write_token_jsonl
from soaes_specdec.feature_draft import FeatureDraft

FAST = {"batch_size": 4, "warmup_steps": 2, "checkpoint_every": 5, "head_tokens": 256, "threads": 0,
        "examples_per_shard": 5, "dev_fraction": 0.1, "top_p": 1.0}  # top-p < 1 on a flat random model sorts 49k


@pytest.fixture(scope="module")
def examples(embedded_tokenizer, distill_texts: list[str]) -> list[TokenExample]:
    """Real text (the first 10 shared sentences); the first 4 tokens play the prompt (labels -100), the rest the
    answer."""
    out = []
    for i, text in enumerate(distill_texts[:10]):
        ids = embedded_tokenizer(text)["input_ids"]
        out.append(TokenExample(i, ids, [-100] * 4 + ids[4:]))
    return out


def _data_loss(draft, target, examples) -> float:
    """The training objective (no noise) of `draft` over all counted positions of `examples`."""
    f_in, ids, f_next, mask = _batch(examples, extract_features(target, examples))
    with torch.no_grad():
        return float(feature_kd_loss(draft(f_in, ids), f_next, mask, head_weight(draft)[0], 1.0, 1.0)[0])


@pytest.mark.parametrize("layout", ["soaes", "engine"])
def test_loss_decreases_and_draft_saves(tiny_qwen2, examples, tmp_path, embedded_tokenizer, layout):
    cfg = FeatureKDConfig(steps=20, learning_rate=1e-2, layout=layout, **{**FAST, "checkpoint_every": 10})
    res = train_feature_draft(tiny_qwen2, examples, None, cfg, tmp_path, heldout_examples=examples[:2],
                              tokenizer=embedded_tokenizer)
    assert res.steps == 20 and res.counts["dev_examples"] == 1 and 0 < res.head_tokens < 300
    loaded = FeatureDraft.from_pretrained(res.draft_dir)
    assert loaded.layout == layout and (loaded.fc.bias is None) == (layout == "engine")
    before = _data_loss(build_draft(tiny_qwen2, examples, cfg), tiny_qwen2, examples)
    after = _data_loss(loaded, tiny_qwen2, examples)
    assert after < 0.85 * before
    assert (res.draft_dir / "tokenizer_config.json").is_file()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["heldout_metrics"]["acceptance_greedy"] == res.heldout_metrics["acceptance_greedy"]
    best = load_file(str(tmp_path / "best.safetensors"))  # the saved draft is the best checkpoint
    assert torch.equal(loaded.fc.weight, best["fc.weight"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_mixed_precision_training_learns_on_each_device(tiny_qwen2, examples, tmp_path, device):
    """bfloat16 autocast (forced on the CPU; `auto` on a GPU) trains the fp32 weights as the fp32 loop does: the
    objective falls, the draft saves in fp32, and held-out acceptance is measured on the same device."""
    target = copy.deepcopy(tiny_qwen2).to(device)
    setting = "bfloat16" if device == "cpu" else "auto"
    cfg = FeatureKDConfig(steps=20, learning_rate=1e-2, autocast=setting, **{**FAST, "checkpoint_every": 10})
    res = train_feature_draft(target, examples, None, cfg, tmp_path, heldout_examples=examples[:2])
    loaded = FeatureDraft.from_pretrained(res.draft_dir)
    assert loaded.fc.weight.dtype == torch.float32 and res.heldout_metrics is not None
    cpu_target = copy.deepcopy(tiny_qwen2).cpu()
    before = _data_loss(build_draft(cpu_target, examples, cfg), cpu_target, examples)
    assert _data_loss(loaded, cpu_target, examples) < 0.85 * before


def test_autocast_setting():
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("off", torch.device("cuda")) is None
    assert autocast_dtype("float16", torch.device("cpu")) is torch.float16
    with pytest.raises(ConfigError, match="autocast must be one of"):
        FeatureKDConfig(autocast="fp8")
    with pytest.raises(ConfigError, match="layout must be one of"):
        FeatureKDConfig(layout="vllm")


def test_estimator_equals_direct_computation(tiny_qwen2, examples):
    cfg = FeatureKDConfig(head_tokens=128, threads=0)
    torch.manual_seed(0)
    draft = build_draft(tiny_qwen2, examples, cfg)
    with torch.no_grad():  # move it away from the pass-through init so step 1 and step 2 differ
        for p in draft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    data = examples[:2]
    feats = extract_features(tiny_qwen2, data)
    got = estimate_feature_acceptance(tiny_qwen2, draft, data, feats, top_p=1.0, temperature=0.5)
    greedy, sampled, greedy2 = [], [], []
    with torch.no_grad():
        for ex in data:
            ids = torch.tensor([ex.input_ids])
            out = tiny_qwen2(ids, output_hidden_states=True)
            f, logits = out.hidden_states[-1], out.logits
            T = ids.shape[1]
            for p in range(T - 2):
                if ex.labels[p + 2] == -100:
                    continue
                g = draft(f[:, : p + 1], ids[:, 1: p + 2])[:, -1]
                q = draft.logits(g)
                greedy.append(float(q.argmax(-1) == logits[0, p + 1].argmax(-1)))
                sampled.append(float(acceptance_probabilities(logits[:, p + 1], q, temperature=0.5, top_p=1.0)))
                if p >= 1:  # fed-back step: context with true features, the last input is g[p-1]
                    g_prev = draft(f[:, :p], ids[:, 1: p + 1])[:, -1:]
                    g2 = draft(torch.cat([f[:, :p], g_prev], 1), ids[:, 1: p + 2])[:, -1]
                    greedy2.append(float(draft.logits(g2).argmax(-1) == logits[0, p + 1].argmax(-1)))
    assert got["positions"] == len(greedy)
    assert got["acceptance_greedy"] == pytest.approx(sum(greedy) / len(greedy), abs=1e-9)
    assert got["acceptance_top_p"] == pytest.approx(sum(sampled) / len(sampled), abs=1e-5)
    assert got["step2_acceptance_greedy"] == pytest.approx(sum(greedy2) / len(greedy2), abs=1e-9)


def test_sampled_acceptance_fast_path_matches_reference():
    torch.manual_seed(0)
    vocab, keep = 500, torch.arange(0, 500, 3)
    t = torch.randn(6, vocab) * 4
    d = torch.full((6, vocab), float("-inf"))
    d[:, keep] = torch.randn(6, keep.numel()) * 4
    ref = acceptance_probabilities(t, d, temperature=1.0, top_p=0.7)
    fast = sampled_acceptance(t, d, keep, 0.7, 1.0, k=64)
    assert torch.allclose(fast, ref, atol=1e-6)
    assert torch.allclose(sampled_acceptance(t, d, keep, 0.7, 1.0, k=2), ref, atol=1e-6)  # falls back


def test_two_step_loss_trains_and_matches_mask(tiny_qwen2, examples):
    cfg = FeatureKDConfig(head_tokens=64, threads=0)
    frozen = copy.deepcopy(tiny_qwen2).requires_grad_(False)  # a frozen target still gives a trainable layer
    draft = build_draft(frozen, examples, cfg)
    feats = extract_features(tiny_qwen2, examples[:2])
    f = feats[0][None]
    ids = torch.tensor([examples[0].input_ids])
    g1, _ = two_step_hidden(draft, f[:, :-1], ids[:, 1:])
    assert torch.allclose(g1, draft(f[:, :-1], ids[:, 1:]), atol=1e-5)
    weight, _ = head_weight(draft)
    mask = torch.ones(g1.shape[:2], dtype=torch.bool)
    loss, parts = feature_kd_loss(g1, f[:, 1:], mask, weight, 1.0, 1.0)
    loss.backward()
    assert parts["kl"] >= 0 and weight.grad is None and draft.lm.get_input_embeddings().weight.grad is None
    trained = [draft.fc.weight, draft.lm.model.norm.weight, *draft.lm.model.layers[0].parameters()]
    assert all(p.grad is not None for p in trained)  # fc, the layer and the norm train; embeddings/head don't


def test_resume_equals_uninterrupted(tiny_qwen2, examples, tmp_path, monkeypatch):
    cfg = FeatureKDConfig(steps=6, unroll_weight=0.5, **{**FAST, "checkpoint_every": 3})
    full = train_feature_draft(tiny_qwen2, examples, None, cfg, tmp_path / "full")
    real_save, calls = torch.save, []

    def killed_at_second_checkpoint(obj, f, *args, **kwargs):  # a kill while step 6's checkpoint is written
        calls.append(f)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", killed_at_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_feature_draft(tiny_qwen2, examples, None, cfg, tmp_path / "resumed")
    monkeypatch.undo()
    state = torch.load(tmp_path / "resumed" / CHECKPOINT_FILE, weights_only=True)
    assert json.loads(state["meta"])["step"] == 3
    resumed = train_feature_draft(tiny_qwen2, examples, None, cfg, tmp_path / "resumed")
    a = torch.load(tmp_path / "full" / CHECKPOINT_FILE, weights_only=True)["params"]
    b = torch.load(tmp_path / "resumed" / CHECKPOINT_FILE, weights_only=True)["params"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.steps == full.steps == 6 and resumed.dev_metrics == full.dev_metrics


def test_bad_input_errors(tiny_qwen2, examples, tmp_path, embedded_model_dir):
    cfg = FeatureKDConfig(steps=2, **FAST)
    short = [TokenExample(i, [1, 2], [1, 2]) for i in range(4)]
    with pytest.raises(DataError, match="no usable training examples"):
        train_feature_draft(tiny_qwen2, short, None, cfg, tmp_path / "short")
    train_feature_draft(tiny_qwen2, examples, None, cfg, tmp_path / "run")
    from soaes_core import load_model
    from soaes_core.testing import make_tiny_qwen2

    other = load_model(make_tiny_qwen2(tmp_path / "wide", hidden_size=32, intermediate_size=64), dtype=torch.float32)
    with pytest.raises(DataError, match="hidden size 64, the target has 32"):
        train_feature_draft(other, examples, None, cfg, tmp_path / "run")
    (tmp_path / "run" / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="unreadable checkpoint"):
        train_feature_draft(tiny_qwen2, examples, None, cfg, tmp_path / "run")


def test_cli_feature_draft(tiny_qwen2_dir, examples, tmp_path):
    data = write_token_jsonl(tmp_path / "train.jsonl", examples)
    runner = CliRunner()
    res = runner.invoke(main, ["feature-draft", "--target", str(tiny_qwen2_dir), "--train", str(data),
                               "--heldout", str(data), "--out", str(tmp_path / "out"), "--steps", "3",
                               "--set", "head_tokens=64", "--set", "threads=0", "--set", "top_p=1",
                               "--set", "checkpoint_every=3"])
    assert res.exit_code == 0, res.output
    assert "held-out" in res.output and (tmp_path / "out" / "draft" / "feature_draft.json").is_file()
    res = runner.invoke(main, ["feature-draft", "--target", str(tiny_qwen2_dir), "--train",
                               str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out2")])
    assert res.exit_code == 2 and "error:" in res.output and "missing.jsonl" in res.output


def _flip_payload_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x5A  # inside the tensor data: the file still parses, the features differ
    path.write_bytes(bytes(data))


def test_corrupt_or_unrecorded_feature_shards_are_re_extracted(tiny_qwen2, examples, tmp_path, caplog):
    """Issue 29, item 7: a feature shard with flipped bytes was used silently. Shards carry a recorded sha256; a
    corrupted one, or one with no record (older soaes), is re-extracted with one warning line naming it."""
    cfg = FeatureKDConfig(**FAST)
    cache = tmp_path / "features"
    first = [t.clone() for t in cached_features(tiny_qwen2, examples, cache, cfg)]  # not views of the files
    shards = sorted(cache.glob("shard-*.safetensors"))
    assert len(shards) == 2 and set(json.loads((cache / "shards.json").read_text())["shards"]) == \
        {p.name for p in shards}
    _flip_payload_byte(shards[1])
    with caplog.at_level(logging.WARNING, logger="soaes_distill.feature_kd"):
        again = cached_features(tiny_qwen2, examples, cache, cfg)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and str(shards[1]) in warned[0] and "sha256" in warned[0] and "re-extract" in warned[0]
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)  # bf16 storage; batching may differ
    assert sorted(cache.glob("shard-*.safetensors")) == shards  # the same examples: the same shard name

    # a cache written before shards carried checksums: its shards are re-extracted once, then recorded
    (cache / "shards.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="soaes_distill.feature_kd"):
        cached_features(tiny_qwen2, examples, cache, cfg)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "2 feature shards" in warned[0] and "no recorded sha256" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="soaes_distill.feature_kd"):
        cached_features(tiny_qwen2, examples, cache, cfg)
    assert not caplog.records


def test_steps_bound_the_run_and_a_time_cap_says_it_ended_it(tiny_qwen2, examples, tmp_path):
    """Training runs to `steps`; `time_budget_s` only caps it, and a run the cap ends reports that in plain words."""
    res = train_feature_draft(tiny_qwen2, examples, None, FeatureKDConfig(steps=2, **FAST), tmp_path / "steps")
    assert (res.steps, res.stopped_by) == (2, "max_steps") and "trained the planned 2 steps" in res.stop_message
    res = train_feature_draft(tiny_qwen2, examples, None, FeatureKDConfig(steps=500, time_budget_s=1e-9, **FAST),
                              tmp_path / "cap")
    assert res.steps == 1 and res.stopped_by == "time_budget"
    assert "stopped by the time budget" in res.stop_message and "1 of the planned 500 steps" in res.stop_message
    manifest = json.loads((tmp_path / "cap" / "draft" / "manifest.json").read_text())
    metrics = json.loads((tmp_path / "cap" / "metrics.json").read_text())
    assert manifest["stopped_by"] == metrics["stopped_by"] == "time_budget" and manifest["planned_steps"] == 500
