"""Feature-conditioned (EAGLE-style) drafts: the runner's hidden states and input embeddings, exact decoding with a
`FeatureDraft` (greedy equals plain decoding: batches, restricted head, dynamic length, batch-invariant bfloat16),
the decoder's proposals against the draft's reference forward, save/load and loading by kind, refusals, and the
bench's cost measurement. (Sampling exactness: test_specdec_decoding_chisq.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from soaes_core import load_model, load_tokenizer
from soaes_core.errors import InvalidArgumentError, ModelLoadError
from soaes_specdec import FeatureDraft, load_any_draft
from soaes_specdec.bench import BenchConfig, BenchRunner, load_bench_models, measure_costs, run_benchmark
from soaes_specdec.cli import main
from soaes_specdec.decoding import PromptLookupDecoder, SpeculativeDecoder, autoregressive_generate
from soaes_specdec.draft import (
    DraftTokenizerMismatchError,
    RestrictedLMHead,
    load_draft,
    make_layer_draft,
    restrict_output_head,
)
from soaes_specdec.feature_draft import FC_FILE, is_feature_draft_dir
from soaes_specdec.feature_runner import FeatureDraftRunner
from soaes_specdec.proposers import FeatureDraftProposer
from soaes_specdec.runner import CachedCausalLM
from soaes_specdec.testing import identity_feature_draft, swap_tokenizer_ids

NEW = 24


feature_draft = identity_feature_draft


def prompts(lengths: tuple[int, ...], vocab: int = 512, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g) for n in lengths]


@pytest.fixture(scope="module")
def target(qwen2_factory: Any) -> Any:
    return qwen2_factory(0, layers=1)


def record_proposals(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.Tensor, Any]]:
    """Record (row lengths, drafts, q) of every feature-draft proposal."""
    seen: list[tuple[torch.Tensor, torch.Tensor, Any]] = []
    original = FeatureDraftProposer.draft_tokens

    def wrapped(self: Any, rows: Any, *args: Any, **kwargs: Any) -> Any:
        lengths = rows.lengths.clone()
        drafts, probs = original(self, rows, *args, **kwargs)
        seen.append((lengths, drafts.clone(), None if probs is None else probs.clone()))
        return drafts, probs

    monkeypatch.setattr(FeatureDraftProposer, "draft_tokens", wrapped)
    return seen


# ----------------------------------------------------------------------------------------- runner


@pytest.mark.parametrize("batch_invariant", [False, True])
@pytest.mark.parametrize("linear", ["stream", "module"])
def test_runner_hidden_states_equal_hf_last_hidden_state(qwen2_factory: Any, linear: str,
                                                         batch_invariant: bool) -> None:
    model = qwen2_factory(0, layers=2)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        hf = model(ids, output_hidden_states=True)
        ref_hidden, ref_logits = hf.hidden_states[-1], hf.logits  # HF's last entry is post-norm (what the head reads)
        runner = CachedCausalLM(model, linear=linear, batch_invariant=batch_invariant)
        runner.start(2, 32)
        logits, hidden = runner.forward(ids[:, :8], torch.tensor([0, 0]), return_hidden=True)
        torch.testing.assert_close(hidden, ref_hidden[:, :8], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits, ref_logits[:, :8], rtol=1e-4, atol=1e-4)
        # row 1 rolled back to 6: a continuation block at per-row positions, hidden at logits_at only
        block = torch.stack([ids[0, 8:12], ids[1, 6:10]])
        logits, hidden = runner.forward(block, torch.tensor([8, 6]), logits_at=torch.tensor([3, 1]), return_hidden=True)
        assert hidden.shape == (2, 64) and logits.shape == (2, 512)
        torch.testing.assert_close(hidden[0], ref_hidden[0, 11], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hidden[1], ref_hidden[1, 7], rtol=1e-4, atol=1e-4)
        for r in range(2):  # one row at a time, as the batch-invariant runner computes them
            assert torch.equal(runner.head_logits(hidden[r:r + 1]), logits[r:r + 1]) or not batch_invariant
        assert torch.equal(runner.head_logits(hidden), logits) or batch_invariant
        # no logits, hidden only
        none, hidden = runner.forward(ids[:, 8:9], torch.tensor([8, 8]), need_logits=False, return_hidden=True)
        assert none is None and hidden.shape == (2, 1, 64)
        # "all": every prompt row's hidden state, logits at logits_at equal to a plain prefill's (bit for bit)
        at = torch.tensor([7, 4])
        logits, hidden = runner.forward(ids[:, :8], torch.tensor([0, 0]), logits_at=at, return_hidden="all")
        plain = runner.forward(ids[:, :8], torch.tensor([0, 0]), logits_at=at)
        assert torch.equal(logits, plain) and hidden.shape == (2, 8, 64)
        torch.testing.assert_close(hidden[0], ref_hidden[0, :8], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hidden[1, :5], ref_hidden[1, :5], rtol=1e-4, atol=1e-4)
        if batch_invariant:  # the padding past a prompt row's own length is not computed
            assert not hidden[1, 5:].any()
        assert isinstance(runner.forward(ids[:, :2], torch.tensor([0, 0])), torch.Tensor)  # default: logits only


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_runner_inputs_embeds_equal_embedding_the_tokens(qwen2_factory: Any, batch_invariant: bool) -> None:
    model = qwen2_factory(0, layers=2)
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(1))
    embeds = model.get_input_embeddings()(ids).detach()
    outs = []
    with torch.inference_mode():
        for use_embeds in (False, True):
            runner = CachedCausalLM(model, batch_invariant=batch_invariant)
            runner.start(2, 16)
            kw = {"inputs_embeds": embeds[:, :6]} if use_embeds else {}
            first = runner.forward(ids[:, :6], torch.tensor([0, 0]), **kw)
            kw = {"inputs_embeds": embeds[:, 6:]} if use_embeds else {}
            rest = runner.forward(ids[:, 6:], torch.tensor([6, 6]), return_hidden=True, **kw)
            outs.append((first, *rest))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    # the embeddings, not the tokens, are what the layers read
    with torch.inference_mode():
        runner.start(2, 16)
        other = runner.forward(torch.zeros_like(ids[:, :6]), torch.tensor([0, 0]), inputs_embeds=embeds[:, :6])
    assert torch.equal(other, outs[0][0])


def test_runner_refuses_bad_hidden_arguments_in_one_line(qwen2_factory: Any) -> None:
    runner = CachedCausalLM(qwen2_factory(0, layers=1))
    runner.start(1, 8)
    ids = torch.tensor([[5, 6, 7]])
    for kwargs, words in (({"return_hidden": "last"}, "return_hidden must be"),
                          ({"inputs_embeds": torch.zeros(1, 2, 64)}, "inputs_embeds must have shape (1, 3, 64)")):
        with pytest.raises(InvalidArgumentError) as err:
            runner.forward(ids, torch.tensor([0]), **kwargs)
        assert words in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("restricted", [False, True])
@pytest.mark.parametrize("n", [1, 3])
def test_feature_greedy_equals_plain_greedy(target: Any, n: int, restricted: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    draft = feature_draft(target, 0.02)
    if restricted:
        restrict_output_head(draft.lm, range(0, 512, 2))  # half the vocabulary: some target tokens unproposable
    batch = prompts((3, 9, 5))
    reference = [autoregressive_generate(target, p, NEW).new_tokens() for p in batch]
    decoder = SpeculativeDecoder(target, draft, n)
    assert isinstance(decoder.draft.head, RestrictedLMHead) == restricted  # the draft step uses the restricted head
    single = decoder.generate(batch[1], NEW)
    assert single.new_tokens() == reference[1]
    seen = record_proposals(monkeypatch)
    out = decoder.generate(batch, NEW)
    assert [out.new_tokens(i) for i in range(3)] == reference
    assert out.sequences.shape == (3, 9 + NEW)
    stats = out.stats
    assert 0 < stats.acceptance_rate < 1 and len(stats.acceptance_by_position) == n
    assert stats.new_tokens == 3 * NEW
    # one catch-up per verify after the first, the prefill, and width - 1 steps per block: n, or fewer once every
    # row has fewer than n new tokens left (cap_block_width)
    widths = [drafts.shape[1] for _, drafts, _ in seen]
    assert len(widths) == stats.target_calls - 1 and max(widths) == n
    assert stats.draft_calls == 1 + (stats.target_calls - 2) + sum(w - 1 for w in widths)
    if n == 3:  # some blocks were accepted whole (bonus + catch-up over 4 rows), some rejected at once
        assert stats.acceptance_by_position[2] > 0 and stats.acceptance_by_position[0] < 1


def test_feature_dynamic_length_and_rows_stopping_at_eos(target: Any) -> None:
    draft = feature_draft(target, 0.02)
    batch = prompts((3, 9, 5))
    reference = [autoregressive_generate(target, p, NEW).new_tokens() for p in batch]
    out = SpeculativeDecoder(target, draft, 5, draft_confidence=0.5).generate(batch, NEW)
    assert [out.new_tokens(i) for i in range(3)] == reference
    assert out.stats.proposed < 5 * (out.stats.target_calls - 1) * 3 and out.stats.accepted > 0
    eos = reference[0][6]
    out = SpeculativeDecoder(target, draft, 3).generate(batch, NEW, eos_token_id=eos)
    for i, ref in enumerate(reference):
        expected = ref[:ref.index(eos) + 1] if eos in ref else ref
        assert out.new_tokens(i) == expected
    for limit in (1, 2, 7):
        assert SpeculativeDecoder(target, draft, 3).generate(batch, limit).new_tokens(2) == reference[2][:limit]


def test_feature_batch_invariant_bfloat16_equals_plain_batch_one(qwen2_factory: Any) -> None:
    target = qwen2_factory(0, layers=1).to(torch.bfloat16)
    draft = feature_draft(target, 0.02)
    batch = prompts((5, 9, 3, 12))
    reference = [autoregressive_generate(target, p, NEW).new_tokens() for p in batch]
    for n in (1, 3):
        out = SpeculativeDecoder(target, draft, n, batch_invariant=True).generate(batch, NEW)
        assert [out.new_tokens(i) for i in range(len(batch))] == reference
        assert 0 < out.stats.acceptance_rate < 1


def test_proposals_follow_the_drafts_reference_forward(qwen2_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block's drafts equal greedy drafting with the HF reference `FeatureDraft.forward`: the target's true
    features up to the pending token (prefill, catch-ups after partial and full acceptance, padded batch rows),
    then the draft's own g fed back for each further token."""
    target = qwen2_factory(0, layers=2)
    draft = feature_draft(target, 0.3, layer=1)
    seen = record_proposals(monkeypatch)
    batch = prompts((4, 10, 6))
    out = SpeculativeDecoder(target, draft, 3).generate(batch, 16)
    checked = 0
    with torch.inference_mode():
        for b in range(3):
            seq = out.sequences[b:b + 1, :out.sequence_lengths[b]]
            features = target.model(seq).last_hidden_state
            for lengths, drafts, _ in seen:
                length = int(lengths[b])
                if length >= out.sequence_lengths[b]:
                    continue  # the row had stopped
                feats, ids = features[:, :length - 1], seq[:, 1:length]
                for j in range(drafts.shape[1]):
                    g = draft.forward(feats, ids)[:, -1:]
                    token = draft.logits(g).argmax(-1)
                    assert int(token) == int(drafts[b, j]), (b, length, j)
                    feats, ids = torch.cat([feats, g], dim=1), torch.cat([ids, token], dim=1)
                    checked += 1
    assert checked > 40


def test_feature_decoder_refuses_bad_combinations_in_one_line(target: Any, qwen2_factory: Any) -> None:
    draft = feature_draft(target, 0.02)
    p = prompts((4,))[0]
    cases = [
        (lambda: SpeculativeDecoder(target, FeatureDraft.from_target(qwen2_factory(1, layers=1, hidden=32)), 3),
         "hidden size (32) differs from the target's (64)"),
        (lambda: SpeculativeDecoder(target, FeatureDraft.from_target(qwen2_factory(1, layers=1, vocab=300)), 3),
         "vocabularies differ"),
        (lambda: SpeculativeDecoder(draft, target, 3), "cannot decode on its own"),
        (lambda: autoregressive_generate(draft, p, 4), "cannot decode on its own"),
        (lambda: PromptLookupDecoder(draft, 3), "cannot decode on its own"),
        (lambda: FeatureDraftRunner(target), "needs a FeatureDraft"),
        (lambda: make_layer_draft(draft, 1), "cannot derive a layer draft"),
        (lambda: SpeculativeDecoder(target, draft, 3, draft_confidence=1.0), "draft_confidence"),
        (lambda: FeatureDraft(draft.lm, torch.nn.Linear(64, 64)), "fc must map 128 -> 64"),
    ]
    for call, words in cases:
        with pytest.raises(InvalidArgumentError) as err:
            call()
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


# ----------------------------------------------------------------------------------------- saving and loading


def test_save_load_round_trip_gives_identical_proposals(tiny_qwen2_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    target = load_model(tiny_qwen2_dir, dtype=torch.float32, device="cpu")
    tokenizer = load_tokenizer(tiny_qwen2_dir)
    draft = feature_draft(target, 0.3, layer=1)
    with torch.no_grad():
        draft.fc.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    restrict_output_head(draft.lm, range(0, 4000))
    out_dir = draft.save_pretrained(tmp_path / "fd", tokenizer=tokenizer)
    assert is_feature_draft_dir(out_dir) and not is_feature_draft_dir(tiny_qwen2_dir)
    loaded = load_any_draft(out_dir, dtype=torch.float32, target=str(tiny_qwen2_dir), target_tokenizer=tokenizer)
    assert isinstance(loaded, FeatureDraft) and isinstance(loaded.lm.get_output_embeddings(), RestrictedLMHead)
    assert torch.equal(loaded.fc.weight, draft.fc.weight) and torch.equal(loaded.fc.bias, draft.fc.bias)
    seen = record_proposals(monkeypatch)
    batch = [torch.tensor(tokenizer(t)["input_ids"]) for t in ("Hello there, how are you", "def f(x):")]
    outs = []
    for d in (draft, loaded):
        seen.clear()
        out = SpeculativeDecoder(target, d, 3).generate(batch, 12, do_sample=True, top_p=0.9,
                                                        generator=torch.Generator().manual_seed(4))
        outs.append((out.sequences, [(x[1], x[2]) for x in seen]))
    assert torch.equal(outs[0][0], outs[1][0]) and len(outs[0][1]) == len(outs[1][1]) > 1
    for (d1, q1), (d2, q2) in zip(outs[0][1], outs[1][1], strict=True):
        assert torch.equal(d1, d2) and torch.equal(q1, q2)
    assert not isinstance(load_any_draft(tiny_qwen2_dir, dtype=torch.float32), FeatureDraft)  # a layer draft
    with pytest.raises(ModelLoadError, match="feature-conditioned draft"):
        load_draft(out_dir)  # the 1-layer model alone is no layer draft
    foreign = tmp_path / "foreign"
    shutil.copytree(out_dir, foreign)
    swap_tokenizer_ids(foreign)
    with pytest.raises(DraftTokenizerMismatchError):
        load_any_draft(foreign, target=str(tiny_qwen2_dir), target_tokenizer=tokenizer)
    (foreign / FC_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="fc weights"):
        FeatureDraft.from_pretrained(foreign)


# ----------------------------------------------------------------------------------------- bench


def test_bench_measures_and_checks_a_feature_draft(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    target = load_model(tiny_qwen2_dir, dtype=torch.float32, device="cpu")
    tokenizer = load_tokenizer(tiny_qwen2_dir)
    draft = feature_draft(target, 0.3, layer=1)
    costs = measure_costs(CachedCausalLM(target), FeatureDraftRunner(draft), 2, context=20, repeats=3, warmup=1)
    assert costs["draft_step_s"] > 0 and costs["c"] > 0 and costs["c_v"] > 0
    config = BenchConfig(target=str(tiny_qwen2_dir), max_new_tokens=6, max_prompts=2, warmup=0, repeats=1,
                         num_speculative_tokens=[2], modes=["greedy"], methods=["plain", "speculative"])
    report = run_benchmark(config, tmp_path, models=(target, draft, tokenizer))
    spec = next(r for r in report["results"] if r["method"] == "speculative" and r["n"] == 2)
    assert spec["exact_match"] is True and spec["extra"]["c"] > 0
    auto = next(r for r in report["results"] if r["method"] == "speculative" and r["adaptive"])
    assert auto["exact_match"] is True  # the decoder choosing n with a feature draft
    assert report["draft_kind"] == "feature" and "(feature-conditioned)" in (tmp_path / "bench.md").read_text()
    with pytest.raises(InvalidArgumentError, match="hf_assisted needs a layer draft"):
        BenchRunner(BenchConfig(methods=["plain", "hf_assisted"]), target, draft, tokenizer, [])
    # `draft: DIR` of a feature draft loads as one, in the bench and in `generate`
    saved = draft.save_pretrained(tmp_path / "fd", tokenizer=tokenizer)
    _, loaded, _ = load_bench_models(BenchConfig(target=str(tiny_qwen2_dir), draft=str(saved)))
    assert isinstance(loaded, FeatureDraft)
    result = CliRunner().invoke(main, ["generate", "Hello there", "--target", str(tiny_qwen2_dir), "--draft",
                                       str(saved), "--max-new-tokens", "6", "-n", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["proposed"] > 0


# ----------------------------------------------------------------------------------------- embedded model


@pytest.mark.slow
def test_embedded_target_with_a_feature_draft_is_exact(embedded_model: Any, embedded_tokenizer: Any) -> None:
    draft = FeatureDraft.from_target(embedded_model)  # last layer, fc passing the feature through
    texts = ["The capital of France is", "def fibonacci(n):"]
    batch = [torch.tensor(embedded_tokenizer(t)["input_ids"]) for t in texts]
    new = 12
    reference = [autoregressive_generate(embedded_model, p, new).new_tokens() for p in batch]
    for n in (1, 3):
        out = SpeculativeDecoder(embedded_model, draft, n).generate(batch, new)
        assert [out.new_tokens(i) for i in range(2)] == reference and out.stats.proposed > 0


# ----------------------------------------------------------------------------------------- target identity, layouts


def test_a_draft_is_refused_for_another_target_of_the_same_shapes(qwen2_factory: Any, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from soaes_specdec.feature_draft import FEATURE_DRAFT_FILE, DraftTargetMismatchError

    mine, other = qwen2_factory(0, layers=1), qwen2_factory(1, layers=1)  # same shapes, other weights
    draft = feature_draft(mine, 0.02)
    with pytest.raises(DraftTargetMismatchError, match=r"trained for another target.*allow_other_target") as err:
        SpeculativeDecoder(other, draft, 2)
    assert "\n" not in str(err.value)
    SpeculativeDecoder(mine.to(torch.bfloat16).float(), draft, 2)  # the same weights through bfloat16 still match
    saved = draft.save_pretrained(tmp_path / "fd")
    with pytest.raises(DraftTargetMismatchError):
        SpeculativeDecoder(other, FeatureDraft.from_pretrained(saved), 2)
    batch = prompts((6,))
    forced = SpeculativeDecoder(other, FeatureDraft.from_pretrained(saved, allow_other_target=True), 2)
    assert forced.generate(batch, 8).new_tokens() == autoregressive_generate(other, batch[0], 8).new_tokens()
    meta = json.loads((saved / FEATURE_DRAFT_FILE).read_text(encoding="utf-8"))
    del meta["target"], meta["layout"]  # a draft saved before the record existed
    (saved / FEATURE_DRAFT_FILE).write_text(json.dumps(meta), encoding="utf-8")
    with caplog.at_level("WARNING", logger="soaes_specdec.feature_draft"):
        SpeculativeDecoder(other, FeatureDraft.from_pretrained(saved), 2)
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]
    assert "no record of the target" in caplog.records[0].getMessage()


def test_engine_layout_decodes_exactly_and_round_trips(target: Any, tmp_path: Path) -> None:
    from soaes_specdec.feature_draft import ENGINE_FORMAT_VERSION, FEATURE_DRAFT_FILE, feature_draft_layout

    draft = FeatureDraft.from_target(target, layer=0, layout="engine")
    assert draft.fc.bias is None and isinstance(draft.lm.model.norm, torch.nn.Identity)
    assert isinstance(draft.lm.model.layers[0].input_layernorm, torch.nn.Identity)
    with torch.no_grad():
        draft.fc.weight.add_(0.05 * torch.randn(draft.fc.weight.shape, generator=torch.Generator().manual_seed(2)))
    batch = prompts((3, 9))
    out = SpeculativeDecoder(target, draft, 3).generate(batch, NEW)
    assert [out.new_tokens(i) for i in range(2)] == [autoregressive_generate(target, p, NEW).new_tokens()
                                                     for p in batch]
    assert out.stats.proposed > 0  # the engine-layout draft proposed; the target kept the output exact
    saved = draft.save_pretrained(tmp_path / "engine")
    meta = json.loads((saved / FEATURE_DRAFT_FILE).read_text(encoding="utf-8"))
    assert (meta["layout"], meta["version"]) == ("engine", ENGINE_FORMAT_VERSION)
    assert feature_draft_layout(saved) == "engine" and feature_draft_layout(tmp_path) is None
    loaded = FeatureDraft.from_pretrained(saved)
    assert loaded.layout == "engine" and loaded.fc.bias is None
    feats = torch.randn(1, 6, draft.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = batch[1][None, :6]
    with torch.no_grad():
        assert torch.equal(loaded.logits(loaded(feats, ids)), draft.logits(draft(feats, ids)))
    with pytest.raises(InvalidArgumentError, match="layout must be one of"):
        FeatureDraft.from_target(target, layout="vllm")
