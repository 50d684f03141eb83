"""DeepSpeed config generation/validation, the memory pre-flight estimate, extension dir and process group."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from soaes_core.errors import ConfigError
from soaes_train.config import DeepSpeedConfig, TrainConfig
from soaes_train.deepspeed_setup import (
    build_deepspeed_config,
    configure_torch_extensions_dir,
    count_params,
    estimate_zero_memory,
    load_deepspeed_json,
)


def test_generated_zero3_and_zero2_configs() -> None:
    z3 = build_deepspeed_config(DeepSpeedConfig(enabled=True, stage=3, offload_param=True), TrainConfig(), bf16=True)
    zo = z3["zero_optimization"]
    assert zo["stage"] == 3 and zo["offload_optimizer"]["device"] == "cpu" and zo["offload_param"]["device"] == "cpu"
    assert zo["stage3_gather_16bit_weights_on_model_save"] is True
    assert z3["bf16"] == {"enabled": True} and z3["optimizer"]["params"]["lr"] == "auto"
    assert "scheduler" not in z3  # the Trainer's (paper) schedule is used
    z2 = build_deepspeed_config(DeepSpeedConfig(enabled=True, stage=2), TrainConfig(), bf16=False)
    assert "offload_param" not in z2["zero_optimization"] and z2["bf16"] == {"enabled": False}


def test_invalid_settings_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="offload_param needs ZeRO stage 3"):
        DeepSpeedConfig(stage=2, offload_param=True)
    with pytest.raises(ValueError, match="stage must be 0, 1, 2 or 3"):
        DeepSpeedConfig(stage=4)
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}))
    with pytest.raises(ConfigError, match=r"ds\.json: zero_optimization.offload_param needs stage 3, got stage 2"):
        load_deepspeed_json(p)
    p.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "gpu"}}}))
    with pytest.raises(ConfigError, match=r"offload_optimizer.device must be one of cpu, nvme, none, got 'gpu'"):
        load_deepspeed_json(p)
    p.write_text('{"zero_optimization": {"stage": 3,}}')
    with pytest.raises(ConfigError, match=r"ds\.json:1: invalid JSON"):
        load_deepspeed_json(p)
    with pytest.raises(ConfigError, match="no such file"):
        build_deepspeed_config(DeepSpeedConfig(config_file=str(tmp_path / "none.json")), TrainConfig(), False)


def test_user_json_is_used(tmp_path: Path) -> None:
    p = tmp_path / "ds.json"
    user = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}, "train_micro_batch_size_per_gpu": 1}
    p.write_text(json.dumps(user))
    assert build_deepspeed_config(DeepSpeedConfig(config_file=str(p)), TrainConfig(), bf16=False) == user


def test_memory_estimate_uses_deepspeed_formula_and_warns() -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    n, largest = 7_615_616_512, 544_997_376  # Qwen2.5-7B: total params, embedding (largest layer)
    ds = DeepSpeedConfig(enabled=True, stage=3, offload_optimizer=True, offload_param=False, num_gpus_per_node=8)
    est = estimate_zero_memory(n, largest, ds, cpu_available=64 * 2**30, gpu_available=80 * 2**30)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(n, largest, num_gpus_per_node=8, cpu_offload=True,
                                                        cpu_offload_params=False)
    assert (est.cpu_bytes_needed, est.gpu_bytes_needed) == (cpu, gpu)
    assert len(est.warnings) == 1 and "host RAM" in est.warnings[0]  # ~170 GiB host > 64 GiB
    roomy = estimate_zero_memory(n, largest, ds, cpu_available=2**41, gpu_available=80 * 2**30)
    assert roomy.warnings == []
    no_offload = DeepSpeedConfig(enabled=True, stage=3, offload_optimizer=False, num_gpus_per_node=1)
    assert any("per GPU" in w for w in estimate_zero_memory(n, largest, no_offload, 2**41, 80 * 2**30).warnings)


def test_count_params_on_meta_model(tiny_qwen2) -> None:
    total, largest = count_params(tiny_qwen2)
    assert total == sum(p.numel() for p in tiny_qwen2.parameters())  # tied head counted once
    assert largest == tiny_qwen2.model.embed_tokens.weight.numel()


def test_extensions_dir_is_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("SOAES_CACHE", str(tmp_path))
    assert configure_torch_extensions_dir() == tmp_path / "torch_extensions"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "torch_extensions")


@pytest.mark.parametrize(("model", "params"),
                         [("qwen2.5-7b", 7_615_616_512), ("hf:Qwen/Qwen2.5-72B-Instruct", 72_706_203_648)])
def test_estimate_sizes_the_paper_models_offline(model: str, params: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped architecture configs give the published parameter counts (7.61B, 72.7B) with no hub access."""
    from click.testing import CliRunner

    from soaes_train.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = CliRunner().invoke(main, ["estimate", model, "--gpus", "8"])
    assert res.exit_code == 0, res.output
    est = json.loads(res.output[res.output.index("{"):])
    assert est["total_params"] == params and est["stage"] == 3


def test_estimate_unknown_offline_model_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from soaes_train.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = CliRunner().invoke(main, ["estimate", "hf:NoSuchOrg/no-such-model"])
    assert res.exit_code == 2 and "hf:NoSuchOrg/no-such-model: cannot read its config" in res.output
    assert "Traceback" not in res.output
