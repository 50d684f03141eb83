"""`soaes-eval run / metrics / table`: real runs, printed item counts, one clear error line per bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import soaes_eval
from soaes_eval.cli import main
from soaes_eval.metrics import text_metrics


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_version() -> None:
    result = _invoke("--version")
    assert result.exit_code == 0 and soaes_eval.__version__ in result.output.split()


def test_run_reports_item_counts(cli_general_run: tuple[Path, str, list[str]]) -> None:
    out, output, _ = cli_general_run
    assert "soaes_cmmlu: n=67" in output and "soaes_ceval: n=52" in output
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert res["soaes"]["label"] == "tiny-cpt" and res["soaes"]["num_items"]["soaes_cmmlu"] == 67
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["stage"] == "eval"


def test_rerun_with_cache_resumes(cli_general_run: tuple[Path, str, list[str]], tmp_path: Path) -> None:
    out, _, args = cli_general_run
    assert list((out / "cache").glob("lm*"))  # the request cache was written
    result = _invoke(*args[:-1], str(tmp_path))  # same run, new output dir: every request comes from the cache
    assert result.exit_code == 0, result.output
    first = json.loads((out / "results.json").read_text(encoding="utf-8"))["results"]
    again = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["results"]
    assert again["soaes_cmmlu"]["acc,none"] == first["soaes_cmmlu"]["acc,none"]
    assert again["soaes_ceval"]["acc,none"] == first["soaes_ceval"]["acc,none"]


def test_run_bad_answer_is_one_line(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    for split in ("test", "dev"):
        (tmp_path / "cmmlu" / split).mkdir(parents=True)
        (tmp_path / "cmmlu" / split / "agronomy.csv").write_text(",Question,A,B,C,D,Answer\n0,题,1,2,3,4,F\n",
                                                                  encoding="utf-8")
    result = _invoke("run", "--model", str(tiny_qwen2_dir), "--tasks", "soaes_cmmlu_agronomy",
                     "--data-dir", str(tmp_path), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "agronomy.csv:2: field 'Answer': answer 'F'" in result.output
    assert "Loading weights" not in result.output  # data is validated before any model is loaded
    assert sum(line.startswith("error:") for line in result.output.splitlines()) == 1
    assert "Traceback" not in result.output and "Custom kwargs" not in result.output


def test_run_unknown_task(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    result = _invoke("run", "--model", str(tiny_qwen2_dir), "--tasks", "soaes_nope", "-o", str(tmp_path))
    assert result.exit_code == 2 and "unknown task(s) ['soaes_nope']" in result.output


def test_metrics_command(tmp_path: Path) -> None:
    rows = [{"prediction": "国资委负责监管中央企业。", "reference": "国务院国资委负责监管中央企业的国有资产。"},
            {"prediction": "GDP增长5.2%", "reference": "2023年GDP增长5.2%"}]
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    result = _invoke("metrics", str(path), "-o", str(tmp_path / "m.json"))
    assert result.exit_code == 0, result.output
    assert "items: 2" in result.output and "tok:zh" in result.output
    saved = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    expect = text_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows], convention="jieba")
    assert saved["metrics"]["jieba"]["bleu4"] == pytest.approx(expect.bleu4)
    assert saved["num_items"] == 2 and set(saved["metrics"]) == {"llamafactory", "jieba", "char"}


def test_metrics_bad_input(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    result = _invoke("metrics", str(empty))
    assert result.exit_code == 2 and "empty.jsonl: empty file: no records to score" in result.output
    missing = _write_jsonl(tmp_path / "missing.jsonl", [{"prediction": "a", "reference": "b"}, {"prediction": "c"}])
    result = _invoke("metrics", str(missing))
    assert result.exit_code == 2 and "missing.jsonl:2: field 'reference'" in result.output
    preds = _write_jsonl(tmp_path / "preds.jsonl", [{"prediction": "a"}, {"prediction": "b"}])
    refs = _write_jsonl(tmp_path / "refs.jsonl", [{"reference": "a"}])
    result = _invoke("metrics", str(preds), "--references", str(refs))
    assert result.exit_code == 2 and "2 predictions" in result.output and "1 references" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_table_command(cli_general_run: tuple[Path, str, list[str]], tiny_mc_run: tuple[Path, dict[str, Any]],
                       tmp_path: Path) -> None:
    result = _invoke("table", str(tiny_mc_run[0]), str(cli_general_run[0]), "--base", "tiny-base",
                     "-o", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "Table 1: General ability" in result.output and "Table 2: soaes_domain_qa" in result.output
    assert (tmp_path / "tables.md").is_file() and (tmp_path / "table1_general.png").is_file()
    result = _invoke("table", str(tmp_path / "nothing"))
    assert result.exit_code == 2 and "no such result file or directory" in result.output


def test_run_options_come_from_the_config_dataclass() -> None:
    """Every EvalRunConfig field is an option (old names kept) with its help and default; bad values are one line."""
    import dataclasses

    from soaes_eval.runner import EvalRunConfig

    text = " ".join(_invoke("run", "--help").output.split())
    squeezed = "".join(text.split())  # help lines wrap anywhere, even after a hyphen
    for f in dataclasses.fields(EvalRunConfig):
        assert "".join(f.metadata["help"].split()) in squeezed, f.name
    for name in ("-n, --num-speculative-tokens", "-o, --output-dir", "--do-sample / --greedy",
                 "--apply-chat-template / --no-chat-template", "--set KEY=VALUE", "(default: soaes_cmmlu,soaes_ceval)"):
        assert name in text, name
    for args, message in ((["--limit", "0"], "error: command line: limit must be >= 1"),
                          (["--backend", "vllm"],
                           "error: --backend: expected one of 'auto', 'hf', 'specdec', got 'vllm'"),
                          (["-n", "two"], "error: --num-speculative-tokens: expected int, got str 'two'")):
        result = _invoke("run", *args)
        assert result.exit_code == 2 and result.output.strip().splitlines() == [message], result.output


def test_run_places_the_model_on_auto_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto`: a GPU in bfloat16 when present, else the CPU in float32 (soaes_core's Placement); a bad device is one
    error line naming the option."""
    import torch

    from soaes_eval.runner import EvalRunConfig, build_lm

    cfg = EvalRunConfig(model="/no/model")
    assert (cfg.device, cfg.dtype) == ("auto", "auto")
    seen: dict[str, Any] = {}

    def fake_hf(**kwargs: Any) -> dict[str, Any]:  # capture where lm-eval's model would be loaded, load nothing
        seen.update(kwargs)
        return kwargs

    monkeypatch.setattr("lm_eval.api.registry.get_model", lambda name: fake_hf)
    monkeypatch.setattr("soaes_eval.runner.resolve_model_dir", lambda spec: spec)
    for cuda, expected in ((False, ("cpu", "float32")), (True, ("cuda", "bfloat16"))):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
        build_lm(cfg)
        assert (seen["device"], seen["dtype"]) == expected
    result = _invoke("run", "--device", "gpu")
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "error: command line: device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"], result.output
