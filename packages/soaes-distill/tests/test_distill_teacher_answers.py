"""Teacher answers as a package API: resume by prompt id after a kill, the three data sources with one record format
and one decontamination, and the vLLM engine's validation (its run needs vLLM and a GPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from soaes_core import from_dict, read_jsonl, read_prompts
from soaes_core.errors import ConfigError
from soaes_data.samples import sample_path
from soaes_distill import teacher_answers as ta
from soaes_distill.teacher_answers import (
    MagpieSettings,
    PassageSettings,
    SoaesEngine,
    TeacherAnswersConfig,
    generate_teacher_answers,
)
from soaes_distill.token_data import load_token_examples

OUTPUTS = ("train_records.jsonl", "train_tokens.jsonl", "train_prompts.jsonl", "heldout_records.jsonl",
           "heldout_tokens.jsonl", "heldout_prompts.jsonl", "rejects.jsonl")
PASSAGES = ["国有资产监督管理机构依照法律法规履行出资人职责，指导推进国有企业改革和重组，"
            "对所监管企业国有资产的保值增值进行监督，加强国有资产的管理工作。企业应当建立健全内部控制制度，完善公司治理结构。",
            "混合所有制改革引入非公有资本，员工持股试点对持股比例有明确限制，国有资本投资公司和运营公司承担不同职责。"]


class Killed(Exception):
    """Stands in for a SIGKILL after some batches (raised before the next batch is written)."""


class CountingEngine(SoaesEngine):
    """The soaes engine, counting the prompts it generates and raising `Killed` once `kill_after` batches ran."""

    def __init__(self, model: Any, tokenizer: Any, kill_after: int | None = None) -> None:
        super().__init__(model, tokenizer)
        self.kill_after, self.batches, self.prompts = kill_after, 0, []

    def generate(self, prompts, seeds, sampling, max_new_tokens, max_tokens):  # type: ignore[no-untyped-def]
        if self.kill_after is not None and self.batches >= self.kill_after:
            raise Killed
        self.batches += 1
        self.prompts += [(tuple(p), s) for p, s in zip(prompts, seeds, strict=True)]
        return super().generate(prompts, seeds, sampling, max_new_tokens, max_tokens)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten real domain prompts (the expert pool's first ten)."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = read_prompts(sample_path("sft/expert_pool.jsonl"))[:10]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _config(model_dir: Path, **kw: Any) -> TeacherAnswersConfig:
    base: dict[str, Any] = {"model": str(model_dir), "max_new_tokens": 4, "max_length": 96, "batch_size": 2,
                            "sample_top_p": 1.0}  # top-p 1: the sort over the vocabulary is skipped (test speed)
    return from_dict(TeacherAnswersConfig, {**base, **kw})


def _outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in OUTPUTS}


def test_resume_by_prompt_id_after_a_kill_answers_only_the_rest(tmp_path: Path, tiny_qwen2, embedded_tokenizer,
                                                                tiny_qwen2_dir: Path, prompt_file: Path) -> None:
    """Killed after three batches, a rerun generates only the prompts not answered before (greedy and sampled
    passes), and writes byte for byte what an uninterrupted run writes."""
    cfg = _config(tiny_qwen2_dir, prompts=[str(prompt_file)], samples_per_prompt=1, max_prompts=6)
    ref = CountingEngine(tiny_qwen2, embedded_tokenizer)
    counts = generate_teacher_answers(cfg, tmp_path / "ref", engine=ref, tokenizer=embedded_tokenizer).counts
    assert counts["train"] == {"prompts": 5, "records": 10, "examples": 10} and counts["heldout"]["prompts"] == 1
    assert counts["resumed"] == 0 and len(ref.prompts) == 5 + 5 + 1 and ref.batches == 3 + 3 + 1

    out = tmp_path / "run"
    killed = CountingEngine(tiny_qwen2, embedded_tokenizer, kill_after=4)
    with pytest.raises(Killed):
        generate_teacher_answers(cfg, out, engine=killed, tokenizer=embedded_tokenizer)
    assert len(killed.prompts) == 7 and not (out / "train_records.jsonl").exists()
    partial = out / ta.PARTIAL_DIR / "train-sampled-0.jsonl"
    with open(partial, "a", encoding="utf-8") as fh:  # a kill in the middle of a write: a torn last line
        fh.write('{"key": "torn')
    rerun = CountingEngine(tiny_qwen2, embedded_tokenizer)
    counts = generate_teacher_answers(cfg, out, engine=rerun, tokenizer=embedded_tokenizer).counts
    assert counts["resumed"] == 7
    assert len(rerun.prompts) == 4 and not set(rerun.prompts) & set(killed.prompts)
    assert sorted(killed.prompts + rerun.prompts) == sorted(ref.prompts)
    assert _outputs(out) == _outputs(tmp_path / "ref")
    assert not (out / ta.PARTIAL_DIR).exists()
    # sampled answers carry the serving setting; each prompt's draws come from its own seed
    sampled = [r for r in read_jsonl(out / "train_records.jsonl") if r["source"] == "target-sampled"]
    assert len(sampled) == 5 and all(r["sampling"] == {"temperature": 1.0, "top_p": 1.0, "seed": 1} for r in sampled)


def test_batching_does_not_change_sampled_answers(tmp_path: Path, tiny_qwen2, embedded_tokenizer,
                                                  tiny_qwen2_dir: Path, prompt_file: Path) -> None:
    """A prompt's sampled answer depends on its seed (from its id and text), not on which prompts share its batch."""
    kw = {"prompts": [str(prompt_file)], "samples_per_prompt": 1, "max_prompts": 4}
    outs = []
    for bs in (1, 3):
        out = tmp_path / f"bs{bs}"
        generate_teacher_answers(_config(tiny_qwen2_dir, batch_size=bs, **kw), out, model=tiny_qwen2,
                                 tokenizer=embedded_tokenizer)
        outs.append([r for r in read_jsonl(out / "train_records.jsonl") if r["source"] == "target-sampled"])
    assert outs[0] == outs[1]
    assert len({r["messages"][1]["content"] for r in outs[0]}) > 1


def _held_out_file(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"h{i}", "prompt": p}, ensure_ascii=False) + "\n"
                            for i, p in enumerate(prompts)), encoding="utf-8")
    return path


@pytest.mark.parametrize("source", ["prompts", "magpie", "passages"])
def test_each_source_writes_the_same_format_and_is_decontaminated(source: str, tmp_path: Path, tiny_qwen2,
                                                                  embedded_tokenizer, tiny_qwen2_dir: Path,
                                                                  prompt_file: Path) -> None:
    """Every source's records, token data, prompts and held-out split have the same fields; a training prompt equal
    to a held-out one is dropped by the one held-out matcher, with its reason."""
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in PASSAGES), encoding="utf-8")
    kw: dict[str, Any] = {
        "prompts": {"prompts": [str(prompt_file)], "max_prompts": 5},
        "magpie": {"magpie": MagpieSettings(num_queries=5, max_query_tokens=6, top_p=1.0, min_chars=1,
                                            dedup_jaccard=1.0)},
        "passages": {"passages": PassageSettings([str(texts)], max_queries=3, num_terms=3)},
    }[source]
    cfg = _config(tiny_qwen2_dir, source=source, **kw)
    first = tmp_path / "first"
    generate_teacher_answers(cfg, first, model=tiny_qwen2, tokenizer=embedded_tokenizer)
    train = read_jsonl(first / "train_records.jsonl")
    assert train and read_jsonl(first / "heldout_records.jsonl")
    for name in ("train", "heldout"):
        for rec in read_jsonl(first / f"{name}_records.jsonl"):
            assert set(rec) == {"id", "messages", "source"} and rec["source"] == "target-greedy"
            assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
        assert all(set(p) == {"id", "messages"} for p in read_jsonl(first / f"{name}_prompts.jsonl"))
        assert all(ex.labels is not None for ex in load_token_examples(first / f"{name}_tokens.jsonl"))
    # the same run against a held-out file holding one of its training prompts drops that prompt
    victim = train[0]["messages"][0]["content"]
    held = _held_out_file(tmp_path / "held.jsonl", [victim])
    second = tmp_path / "second"
    counts = generate_teacher_answers(_config(tiny_qwen2_dir, source=source, heldout_prompts=str(held), **kw), second,
                                      model=tiny_qwen2, tokenizer=embedded_tokenizer).counts
    assert victim not in {r["messages"][0]["content"] for r in read_jsonl(second / "train_records.jsonl")}
    assert [r["messages"][0]["content"] for r in read_jsonl(second / "heldout_records.jsonl")] == [victim]
    reasons = [r["reason"] for r in read_jsonl(second / "rejects.jsonl")]
    assert any("held-out prompt" in r for r in reasons) and counts["rejected"] == len(reasons)


def test_vllm_engine_refused_in_one_line_where_vllm_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                               prompt_file: Path) -> None:
    monkeypatch.setattr(ta, "vllm_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        from_dict(TeacherAnswersConfig, {"engine": "vllm", "prompts": [str(prompt_file)]}, source="ta.yaml")
    assert "\n" not in str(err.value) and "pip install 'soaes-distill[vllm]'" in str(err.value)
    assert str(err.value).startswith("ta.yaml")
    from soaes_distill.cli import main

    res = CliRunner().invoke(main, ["teacher-answers", "--engine", "vllm", "--prompts", str(prompt_file),
                                    "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert res.output.startswith("error: ") and "vLLM is not installed" in res.output
    assert not (tmp_path / "out").exists()


def test_cli_writes_the_teacher_data(tmp_path: Path, tiny_qwen2_dir: Path, prompt_file: Path) -> None:
    from soaes_distill.cli import main

    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["teacher-answers", "--model", str(tiny_qwen2_dir), "--prompts", str(prompt_file),
                                    "--max-new-tokens", "4", "--max-prompts", "4", "--set", "placement.device=cpu",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "3 training and 1 held-out records from 4 prompts prompts (0 answers resumed)" in res.output
    assert len(read_jsonl(out / "train_records.jsonl")) == 3


@pytest.mark.gpu
def test_vllm_engine_writes_the_same_format(tmp_path: Path, tiny_qwen2_dir: Path, prompt_file: Path,
                                            embedded_tokenizer) -> None:
    """vLLM's offline engine answers the same prompts into the same files (greedy at temperature 0)."""
    pytest.importorskip("vllm")
    cfg = _config(tiny_qwen2_dir, prompts=[str(prompt_file)], engine="vllm", samples_per_prompt=1,
                  vllm={"gpu_memory_utilization": 0.3, "enforce_eager": True, "dtype": "float32"})
    counts = generate_teacher_answers(cfg, tmp_path / "v", tokenizer=embedded_tokenizer).counts
    assert counts["train"]["records"] == 16
    for rec in read_jsonl(tmp_path / "v" / "train_records.jsonl"):
        assert set(rec) <= {"id", "messages", "source", "sampling"}


def test_a_damaged_partial_answer_file_is_one_error_naming_its_line(tmp_path: Path) -> None:
    from soaes_core.errors import DataError

    path = tmp_path / "train-greedy.jsonl"
    path.write_text('{"key": "[1, \\"a\\"]", "id": 1, "answer": "x"}\nnot json\n{"key": "k", "answer": "y"}\n',
                    encoding="utf-8")
    with pytest.raises(DataError, match=r"train-greedy\.jsonl.*2.*not a saved answer"):
        ta._read_partial(path)
