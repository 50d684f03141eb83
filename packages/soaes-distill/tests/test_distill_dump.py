"""Dump → store round trip on a tiny random Qwen2: exact contents, resume after a kill, corruption, settings,
tail samples (format 2) and reading format-1 stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from soaes_core import sha256_bytes
from soaes_core.errors import IntegrityError, InvalidArgumentError
from soaes_core.testing.killed import killed_file_write
from soaes_data.packing import build_packed_example
from soaes_distill.dump import DumpConfig, capture_example, run_dump
from soaes_distill.losses import TopKLogits, distillation_loss
from soaes_distill.store import STORE_FORMAT, CaptureSettings, TeacherLogitStore
from soaes_distill.token_data import TokenExample, load_token_examples, write_token_jsonl


def _teacher_logp(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def _dump(tmp: Path, dataset: Path, model, tok, **kw) -> Path:
    cfg = DumpConfig(dataset=str(dataset), output_dir=str(tmp), examples_per_shard=kw.pop("per", 5), **kw)
    run_dump(cfg, model=model, tokenizer=tok)
    return tmp


def test_topk_store_round_trip(tmp_path, token_dataset, tiny_qwen2, embedded_tokenizer) -> None:
    out = _dump(tmp_path / "s", token_dataset, tiny_qwen2, embedded_tokenizer, top_k=8, temperatures=[1.0, 2.0])
    store = TeacherLogitStore(out)
    ex = load_token_examples(token_dataset)[3]
    ref = _teacher_logp(tiny_qwen2, ex.input_ids)
    L = len(ex.input_ids)
    got = store.lookup(torch.full((1, L), ex.example_id), torch.arange(L)[None], temperature=2.0)
    assert isinstance(got, TopKLogits) and got.k == 8 and got.vocab_size == ref.shape[-1]
    top = torch.topk(ref, 8, -1)
    torch.testing.assert_close(got.values[0], top.values, rtol=1e-3, atol=1e-4)  # fp16 log-probs
    assert torch.equal(got.indices[0], top.indices)
    torch.testing.assert_close(got.logsumexp[0], torch.logsumexp(ref / 2.0, -1), rtol=0, atol=1e-5)
    stats = store.stats()
    assert stats["positions"] == sum(len(e.input_ids) for e in load_token_examples(token_dataset))
    assert store.settings.bytes_per_position() == 8 * 2 + 8 * 2 + 2 * 4
    assert 40 <= stats["bytes_per_token"] < 50  # + a safetensors header per (tiny) shard
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["capture"]["top_k"] == 8 and manifest["counts"]["bytes_per_token"] > 0


def test_dense_fp32_store_is_exact_and_zstd(tmp_path, token_dataset, tiny_qwen2, embedded_tokenizer) -> None:
    out = _dump(tmp_path / "d", token_dataset, tiny_qwen2, embedded_tokenizer, top_k=0, dtype="float32",
                compression="zstd", temperatures=[1.0], per=20)
    store = TeacherLogitStore(out)
    ex = load_token_examples(token_dataset)[0]
    L = len(ex.input_ids)
    got = store.lookup(torch.full((1, L), ex.example_id), torch.arange(L)[None])
    torch.testing.assert_close(got[0], _teacher_logp(tiny_qwen2, ex.input_ids), rtol=0, atol=1e-5)


def test_lookup_aligns_packed_and_shuffled_batches(tmp_path, token_dataset, tiny_qwen2, embedded_tokenizer) -> None:
    out = _dump(tmp_path / "s", token_dataset, tiny_qwen2, embedded_tokenizer, top_k=4, temperatures=[2.0])
    store = TeacherLogitStore(out)
    examples = load_token_examples(token_dataset)
    order = [7, 2, 9, 0]
    packed = build_packed_example([{"input_ids": e.input_ids} for e in examples], order)
    lengths = packed["seq_lengths"]
    eids = torch.tensor([examples[i].example_id for i, n in zip(order, lengths, strict=True) for _ in range(n)])
    got = store.lookup(eids[None], torch.tensor(packed["position_ids"])[None], temperature=2.0)
    start = 0
    for i, n in zip(order, packed["seq_lengths"], strict=False):
        alone = store.lookup(torch.full((1, n), i), torch.arange(n)[None], temperature=2.0)
        assert torch.equal(got.values[0, start:start + n], alone.values[0])
        assert torch.equal(got.indices[0, start:start + n], alone.indices[0])
        start += n
    padded = store.lookup(torch.tensor([[1, 1, -1]]), torch.tensor([[0, 1, 0]]), temperature=2.0)
    assert torch.isfinite(padded.logsumexp).all()


def test_packed_rows_dump_equals_unpacked(tmp_path, token_dataset, tiny_qwen2, embedded_tokenizer) -> None:
    examples = load_token_examples(token_dataset)
    packed = build_packed_example([{"input_ids": e.input_ids} for e in examples], [1, 4])
    rows = [TokenExample(0, packed["input_ids"], packed["labels"], packed["position_ids"])]
    data = write_token_jsonl(tmp_path / "packed.jsonl", rows)
    store = TeacherLogitStore(_dump(tmp_path / "p", data, tiny_qwen2, embedded_tokenizer, top_k=4, dtype="float32"))
    n1 = len(examples[1].input_ids)
    row = store.example(0)["values"]
    torch.testing.assert_close(row[n1:], torch.topk(_teacher_logp(tiny_qwen2, examples[4].input_ids), 4).values,
                               rtol=0, atol=1e-4)


def test_killed_dump_resumes_without_duplicates(tmp_path, token_dataset, tiny_qwen2, embedded_tokenizer) -> None:
    cfg = DumpConfig(dataset=str(token_dataset), output_dir=str(tmp_path / "k"), top_k=4, examples_per_shard=3,
                     batch_size=2)

    def crash(shard: int, batch: int) -> None:
        if shard == 2 and batch == 1:
            raise KeyboardInterrupt  # killed in the middle of shard 2

    with pytest.raises(KeyboardInterrupt):
        run_dump(cfg, model=tiny_qwen2, tokenizer=embedded_tokenizer, on_batch=crash)
    with pytest.raises(IntegrityError, match="incomplete"):
        TeacherLogitStore(cfg.output_dir)
    leftover = killed_file_write(Path(cfg.output_dir) / "shard-00002.safetensors")  # a kill during a shard write
    calls: list[int] = []
    res = run_dump(cfg, model=tiny_qwen2, tokenizer=embedded_tokenizer, on_batch=lambda s, b: calls.append(s))
    assert res.shards_skipped == 2 and res.shards_written == 2 and set(calls) == {2, 3}
    ref = run_dump(DumpConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "ref")}), model=tiny_qwen2,
                   tokenizer=embedded_tokenizer)
    a, b = TeacherLogitStore(cfg.output_dir), TeacherLogitStore(ref.output_dir)
    assert a.example_ids() == b.example_ids() == list(range(12))
    assert a.stats() == b.stats()
    for eid in range(12):
        assert torch.equal(a.example(eid)["values"], b.example(eid)["values"])
    # no leftover temp files and exactly one file per shard
    assert sorted(p.name for p in Path(cfg.output_dir).glob("shard-*")) == [f"shard-{i:05d}.safetensors"
                                                                            for i in range(4)]
    assert not leftover.exists() and not list(Path(cfg.output_dir).glob(".*.tmp"))  # issue 15, defect 9


def test_corrupt_store_shard_is_refused_with_how_to_redo_it(tmp_path, token_dataset, tiny_qwen2,
                                                            embedded_tokenizer) -> None:
    """Issue 29, item 7: a corrupted or unrecorded logit shard is refused on load with one line naming the shard and
    the command that redoes it; rerunning the dump re-dumps those shards only."""
    out = _dump(tmp_path / "c", token_dataset, tiny_qwen2, embedded_tokenizer, top_k=4)  # 3 shards of 5 examples
    before = {eid: TeacherLogitStore(out).example(eid)["values"] for eid in (0, 7, 11)}
    state = json.loads((out / "store.json").read_text())
    del state["shards"]["2"]["sha256"]  # a hand-edited store.json: nothing to check shard 2 against
    (out / "store.json").write_text(json.dumps(state))
    with pytest.raises(IntegrityError, match=r"shard-00002\.safetensors: no sha256 recorded in store\.json; rerun"):
        TeacherLogitStore(out).example(11)
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as err:
        TeacherLogitStore(out).lookup(torch.full((1, 3), 7), torch.arange(3)[None])
    message = str(err.value)
    assert f"{shard}: shard corrupted" in message and "\n" not in message
    assert "rerun `soaes-distill dump` with the same settings and output directory" in message
    res = run_dump(DumpConfig(dataset=str(token_dataset), output_dir=str(out), top_k=4, examples_per_shard=5),
                   model=tiny_qwen2, tokenizer=embedded_tokenizer)
    assert (res.shards_written, res.shards_skipped) == (2, 1)
    store = TeacherLogitStore(out)
    store.verify()
    assert all(torch.equal(store.example(eid)["values"], v) for eid, v in before.items())


def test_settings_mismatch_is_refused(tmp_path, token_dataset, tiny_qwen2, embedded_tokenizer) -> None:
    out = _dump(tmp_path / "m", token_dataset, tiny_qwen2, embedded_tokenizer, top_k=4, temperatures=[2.0])
    store = TeacherLogitStore(out)
    with pytest.raises(IntegrityError, match="tokenizer_sha256"):
        store.require(tokenizer_sha256="0" * 64)
    with pytest.raises(IntegrityError, match="dataset_sha256"):
        store.require(dataset_sha256="0" * 64)
    with pytest.raises(IntegrityError, match=r"temperature 1\.0 was not captured"):
        store.lookup(torch.zeros(1, 2, dtype=torch.long), torch.arange(2)[None], temperature=1.0)
    with pytest.raises(IntegrityError, match="top_k"):
        _dump(out, token_dataset, tiny_qwen2, embedded_tokenizer, top_k=8, temperatures=[2.0])
    with pytest.raises(InvalidArgumentError, match="exceeds"):
        _dump(tmp_path / "big", token_dataset, tiny_qwen2, embedded_tokenizer, top_k=10 ** 6)


# ---- tail samples (store format 2) ------------------------------------------------------------------------

@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_tail_samples_round_trip(tmp_path, token_dataset, tiny_qwen2, embedded_tokenizer, compression) -> None:
    out = _dump(tmp_path / "t", token_dataset, tiny_qwen2, embedded_tokenizer, top_k=8, temperatures=[1.0, 2.0],
                tail_samples=6, tail_temperature=2.0, compression=compression)
    store = TeacherLogitStore(out)
    assert json.loads((out / "store.json").read_text())["format"] == STORE_FORMAT == 2
    assert store.settings.tail_samples == 6 and store.settings.tail_temperature == 2.0
    assert store.settings.bytes_per_position() == (8 + 6) * (2 + 2) + 2 * 4
    ex = load_token_examples(token_dataset)[3]
    ref = _teacher_logp(tiny_qwen2, ex.input_ids)
    L = len(ex.input_ids)
    for tau in (1.0, 2.0):  # loss τ = 1 reads the τ_s = 2 logsumexp for the importance weights
        got = store.lookup(torch.full((1, L), ex.example_id), torch.arange(L)[None], temperature=tau)
        assert got.num_tail_samples == 6 and got.tail_temperature == 2.0
        torch.testing.assert_close(got.tail_logsumexp[0], torch.logsumexp(ref / 2.0, -1), rtol=0, atol=1e-5)
        torch.testing.assert_close(got.logsumexp[0], torch.logsumexp(ref / tau, -1), rtol=0, atol=1e-5)
    tail = got.tail_indices[0]
    assert not (tail[:, :, None] == got.indices[0][:, None, :]).any()  # outside the top-k
    torch.testing.assert_close(got.tail_values[0], ref.gather(-1, tail), rtol=1e-3, atol=1e-4)  # fp16 log-probs
    # exactly what capture_example draws with the example's generator
    settings = CaptureSettings(model="m", model_fingerprint="-", tokenizer_sha256="-", dataset_sha256="-",
                               vocab_size=ref.shape[-1], top_k=8, temperatures=[1.0, 2.0], tail_samples=6)
    assert torch.equal(capture_example(ref, settings, ex.example_id)["tail_indices"], tail)
    assert not torch.equal(capture_example(ref, settings, ex.example_id + 1)["tail_indices"], tail)
    # padding positions get a finite placeholder, and the loss runs on the looked-up batch
    batch = store.lookup(torch.tensor([[3, 3, -1]]), torch.tensor([[0, 1, 0]]), temperature=2.0)
    assert torch.isfinite(batch.tail_values).all() and torch.isfinite(batch.tail_logsumexp).all()
    loss = distillation_loss(torch.randn(1, 3, ref.shape[-1]), batch, torch.tensor([[5, 6, -100]]))
    assert torch.isfinite(loss)


def test_tail_samples_resume_is_byte_identical(tmp_path, token_dataset, tiny_qwen2, embedded_tokenizer) -> None:
    cfg = DumpConfig(dataset=str(token_dataset), output_dir=str(tmp_path / "k"), top_k=4, examples_per_shard=3,
                     batch_size=2, tail_samples=5, compression="zstd")

    def crash(shard: int, batch: int) -> None:
        if shard == 1 and batch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_dump(cfg, model=tiny_qwen2, tokenizer=embedded_tokenizer, on_batch=crash)
    run_dump(cfg, model=tiny_qwen2, tokenizer=embedded_tokenizer)
    ref = run_dump(DumpConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "ref")}), model=tiny_qwen2,
                   tokenizer=embedded_tokenizer)
    names = sorted(p.name for p in Path(cfg.output_dir).glob("shard-*"))
    assert names == sorted(p.name for p in ref.output_dir.glob("shard-*")) and len(names) == 4
    for name in names:
        assert (Path(cfg.output_dir) / name).read_bytes() == (ref.output_dir / name).read_bytes()
    assert TeacherLogitStore(cfg.output_dir).settings.tail_temperature == 2.0  # default: the largest τ


def test_format_1_store_is_read(tmp_path, token_dataset, tiny_qwen2, embedded_tokenizer) -> None:
    """A store written before tail samples existed (format 1: no tail keys, shards tagged format 1) still reads."""
    out = _dump(tmp_path / "f1", token_dataset, tiny_qwen2, embedded_tokenizer, top_k=4, temperatures=[2.0])
    before = TeacherLogitStore(out).lookup(torch.full((1, 5), 2), torch.arange(5)[None], temperature=2.0)
    state = json.loads((out / "store.json").read_text())
    state["format"] = 1
    for key in ("tail_samples", "tail_temperature"):
        del state["settings"][key]
    for entry in state["shards"].values():
        data = st_save(st_load((out / entry["file"]).read_bytes()), metadata={"format": "1"})
        (out / entry["file"]).write_bytes(data)
        entry.update(sha256=sha256_bytes(data), bytes=len(data))
    (out / "store.json").write_text(json.dumps(state))
    store = TeacherLogitStore(out)
    store.verify()
    after = store.lookup(torch.full((1, 5), 2), torch.arange(5)[None], temperature=2.0)
    assert store.settings.tail_samples == 0 and after.num_tail_samples == 0
    assert torch.equal(after.values, before.values) and torch.equal(after.indices, before.indices)
    state["format"] = 3
    (out / "store.json").write_text(json.dumps(state))
    with pytest.raises(IntegrityError, match="format 3 is newer"):
        TeacherLogitStore(out)


def test_tail_sample_settings_are_checked(tmp_path, token_dataset, tiny_qwen2, embedded_tokenizer) -> None:
    base = {"model": "m", "model_fingerprint": "-", "tokenizer_sha256": "-", "dataset_sha256": "-",
            "vocab_size": 100, "top_k": 8, "temperatures": [1.0, 2.0]}
    with pytest.raises(InvalidArgumentError, match="tail_samples must be an int ≥ 0"):
        CaptureSettings(**base, tail_samples=-1)
    with pytest.raises(InvalidArgumentError, match=r"tail_temperature 3\.0 must be one of the captured"):
        CaptureSettings(**base, tail_samples=4, tail_temperature=3.0)
    with pytest.raises(InvalidArgumentError, match="no tail to sample"):
        CaptureSettings(**{**base, "top_k": 0}, tail_samples=4)
    assert CaptureSettings(**base, tail_samples=4).tail_temperature == 2.0
    assert CaptureSettings(**base, tail_samples=4, tail_temperature=1).tail_temperature == 1.0
    with pytest.raises(ValueError, match="tail_samples must be ≥ 0"):
        DumpConfig(tail_samples=-2)
    with pytest.raises(ValueError, match=r"tail_temperature 5\.0 must be one of"):
        DumpConfig(tail_samples=2, temperatures=[1.0, 2.0], tail_temperature=5.0)
    # resuming with another number of tail samples is refused
    out = _dump(tmp_path / "r", token_dataset, tiny_qwen2, embedded_tokenizer, top_k=4, tail_samples=2)
    with pytest.raises(IntegrityError, match="tail_samples"):
        _dump(out, token_dataset, tiny_qwen2, embedded_tokenizer, top_k=4, tail_samples=3)
