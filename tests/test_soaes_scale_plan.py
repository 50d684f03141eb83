"""The scale plan: parameter counts equal the meta-device model's, ZeRO memory equals DeepSpeed's estimators, and the
shipped qwen2.5-7b / qwen2.5-72b recipes plan every stage offline (no socket opened)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from soaes.pipeline.recipe import load_scale_recipe
from soaes.pipeline.scale_plan import (
    GIB,
    ClusterSettings,
    ScaleSettings,
    arch_size,
    launcher_prefix,
    plan_at_scale,
    read_arch_config,
    render_plan,
    zero_train_memory,
)
from soaes_core.errors import ConfigError
from soaes_train.config import DeepSpeedConfig


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test: the plan must be computed offline."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access during planning: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", ["qwen2.5-7b", "qwen2.5-72b"])
def test_parameter_count_equals_the_meta_model(name: str) -> None:
    from soaes_train.recipes import architecture_source
    from soaes_train.trainer import meta_param_counts

    size = arch_size(read_arch_config(name), name)
    assert (size.params, size.largest_layer_params) == meta_param_counts(architecture_source(name))
    assert size.params == {"qwen2.5-7b": 7_615_616_512, "qwen2.5-72b": 72_706_203_648}[name]


def test_tied_tiny_config_and_truncation(tiny_qwen2_dir: Path, tiny_qwen2: object) -> None:
    from soaes_train.deepspeed_setup import count_params

    config = json.loads((tiny_qwen2_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert (arch_size(config).params, arch_size(config).largest_layer_params) == count_params(tiny_qwen2)
    full, one = arch_size(config), arch_size(config, num_layers=1)
    assert full.params - one.params == one.params - arch_size(config, num_layers=0).params  # one layer's worth
    with pytest.raises(ConfigError, match="lacks a usable 'hidden_size'"):
        arch_size({"model_type": "qwen2"}, "broken")


def test_kv_cache_bytes_per_token() -> None:
    # 2 (K, V) × 80 layers × 8 KV heads × 128 dims × 2 bytes
    assert arch_size(read_arch_config("qwen2.5-72b")).kv_bytes_per_token() == 327_680


@pytest.mark.parametrize(("offload_optimizer", "offload_param"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("nodes", [1, 4])
def test_zero3_model_states_equal_deepspeeds_estimator(offload_optimizer: bool, offload_param: bool,
                                                       nodes: int) -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    size = arch_size(read_arch_config("qwen2.5-72b"))
    cluster = ClusterSettings(nodes=nodes, gpus_per_node=8)
    ds = DeepSpeedConfig(enabled=True, stage=3, offload_optimizer=offload_optimizer, offload_param=offload_param)
    mem = zero_train_memory(size, ds, cluster, micro_batch=1, seq_len=8192)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        size.params, size.largest_layer_params, num_gpus_per_node=8, num_nodes=nodes, cpu_offload=offload_optimizer,
        cpu_offload_params=offload_param, zero_init=True)
    states = mem.gpu_total - mem.gpu_activations
    if offload_optimizer:
        assert abs(states - gpu) <= 1
    else:  # DeepSpeed's ZeRO-3 figure leaves out the bf16 gradient partition (2 of our 20 bytes per parameter / GPU)
        assert gpu < states <= gpu * 1.12
    assert mem.gpu_activations > 0
    if offload_optimizer:
        assert abs(mem.host - cpu) <= 1
    else:
        assert mem.host == 0


@pytest.mark.parametrize("offload", [False, True])
def test_zero2_gpu_states_equal_deepspeeds_estimator(offload: bool) -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    size = arch_size(read_arch_config("qwen2.5-7b"))
    mem = zero_train_memory(size, DeepSpeedConfig(enabled=True, stage=2, offload_optimizer=offload),
                            ClusterSettings(), micro_batch=1, seq_len=4096)
    _, gpu = estimate_zero2_model_states_mem_needs(size.params, num_gpus_per_node=8, num_nodes=1, cpu_offload=offload)
    assert abs(mem.gpu_total - mem.gpu_activations - gpu) <= 1


def test_checkpointing_keeps_activations_smaller() -> None:
    from soaes.pipeline.scale_plan import activation_bytes

    size = arch_size(read_arch_config("qwen2.5-7b"))
    assert activation_bytes(size, 1, 8192, checkpointing=True) < activation_bytes(size, 1, 8192, checkpointing=False)
    assert activation_bytes(size, 2, 8192) == pytest.approx(2 * activation_bytes(size, 1, 8192))


@pytest.mark.parametrize("name", ["qwen2.5-72b", "qwen2.5-7b"])
def test_shipped_recipes_plan_every_stage_offline(name: str, no_network: None) -> None:
    recipe, scale = load_scale_recipe(name)
    rows = plan_at_scale(recipe, scale, recipe_ref=name)
    assert [r.stage for r in rows] == recipe.stages
    gpu_rows = [r for r in rows if r.gpu_gib is not None]
    assert {r.stage for r in gpu_rows} >= {"cpt", "sft_stage1", "sft_stage2", "eval"}
    for r in gpu_rows:
        assert r.fits and 0 < r.gpu_gib <= 80 and r.seconds and r.seconds > 0 and r.time_basis, r
    train = [r for r in rows if r.stage in ("cpt", "sft_stage1", "sft_stage2")]
    assert all(r.launcher.startswith(f"deepspeed --num_gpus 8 --no_local_rank --module soaes_train.cli run "
                                     f"{name}-paper --stage {r.stage}") for r in train)
    assert all("assumed: MFU 40%" in r.time_basis for r in train)
    text = render_plan(rows, recipe.target, scale)
    for r in rows:
        assert f"run:    {r.launcher}" in text
    if name == "qwen2.5-72b":
        assert {"teacher_data", "dump_logits", "distill_draft", "specdec_bench"} <= {r.stage for r in gpu_rows}
        teacher = next(r for r in rows if r.stage == "teacher_data")
        assert "device_map over 2 GPUs" in teacher.layout  # 145 GB of bf16 weights: one 80 GB GPU cannot
        assert "qwen2.5-7b" in next(r for r in rows if r.stage == "distill_draft").layout


def test_what_does_not_fit_is_said_and_more_gpus_take_less_time() -> None:
    recipe, scale = load_scale_recipe("qwen2.5-72b", overrides={"scale.deepspeed.offload_optimizer": False,
                                                                "scale.deepspeed.offload_param": False})
    cpt = next(r for r in plan_at_scale(recipe, scale) if r.stage == "cpt")
    assert not cpt.fits and cpt.gpu_gib > 80  # ZeRO-3 without offload: ~150 GiB of states per GPU
    recipe, four = load_scale_recipe("qwen2.5-72b", overrides={"scale.cluster.nodes": 4})
    _, one = load_scale_recipe("qwen2.5-72b")
    t4, t1 = (next(r for r in plan_at_scale(recipe, s) if r.stage == "cpt").seconds for s in (four, one))
    assert t4 == pytest.approx(t1 / 4)
    assert launcher_prefix(four).startswith("deepspeed --hostfile hostfile --num_nodes 4 --num_gpus 8")
    measured = load_scale_recipe("qwen2.5-72b", overrides={"scale.rates.target_train_tokens_per_gpu_s": 400})[1]
    row = next(r for r in plan_at_scale(recipe, measured) if r.stage == "cpt")
    assert row.time_basis.endswith("measured: 400 tok/s/GPU")
    assert row.seconds == pytest.approx(17e9 / (400 * 8))


def test_torchrun_launcher() -> None:
    two = ScaleSettings(launcher="torchrun", cluster=ClusterSettings(nodes=2, gpus_per_node=4))
    assert launcher_prefix(two) == ("torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $MASTER_ADDR "
                                    "--master_port 29500 --nproc_per_node 4 -m")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("scale.cluster.nodes", 0, "scale.cluster: nodes must be >= 1, got 0"),
    ("scale.cluster.gpu_memory_gib", -80, "scale.cluster: gpu_memory_gib must be > 0"),
    ("scale.rates.mfu", 1.5, "scale.rates: need 0 < mfu <= 1"),
    ("scale.launcher", "mpirun", "scale.launcher: expected one of 'deepspeed', 'torchrun'"),
    ("scale.data.teacher_prompts", 0, "scale.data: teacher_prompts must be >= 1"),
])
def test_bad_scale_values_name_the_field(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_scale_recipe("qwen2.5-72b", overrides={key: value})
    assert message in str(err.value) and "qwen2.5-72b.yaml" in str(err.value) and "\n" not in str(err.value)


def test_unknown_hub_architecture_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no shipped architecture for this hub id"):
        read_arch_config("hf:someone/else")
    with pytest.raises(ConfigError, match="no architecture to plan with"):
        read_arch_config(str(tmp_path / "missing"))
    assert GIB == 2**30


def test_plan_command_prints_every_stage_offline(no_network: None) -> None:
    from click.testing import CliRunner

    from soaes.cli import main

    res = CliRunner().invoke(main, ["pipeline", "plan", "qwen2.5-72b"])
    assert res.exit_code == 0, res.output
    recipe, _ = load_scale_recipe("qwen2.5-72b")
    rows = {line.split()[0]: line for line in res.output.splitlines() if line and not line.startswith(" ")}
    assert set(recipe.stages) <= set(rows)
    for stage in ("cpt", "sft_stage1", "sft_stage2", "teacher_data", "dump_logits", "distill_draft",
                  "specdec_bench", "eval"):
        gib = rows[stage].split()[1]
        assert float(gib) > 0, rows[stage]  # a memory estimate per GPU
    runs = [line.strip() for line in res.output.splitlines() if line.strip().startswith("run:")]
    assert len(runs) == len(recipe.stages)
    assert "run:    deepspeed --num_gpus 8 --no_local_rank --module soaes_train.cli run qwen2.5-72b-paper --stage cpt" \
        in res.output
    sliced = CliRunner().invoke(main, ["pipeline", "plan", "qwen2.5-72b", "--from", "cpt", "--until", "sft_stage2",
                                       "--set", "scale.cluster.nodes=2"])
    assert sliced.exit_code == 0 and "on 2 node(s)" in sliced.output
    assert [ln.split()[0] for ln in sliced.output.splitlines()[2:] if ln and not ln.startswith(" ")][:3] == [
        "cpt", "sft_stage1", "sft_stage2"]
    assert "--hostfile hostfile --num_nodes 2" in sliced.output
