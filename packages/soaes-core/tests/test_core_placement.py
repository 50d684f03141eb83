"""Placements: one clear error per bad value, what `auto` resolves to, and a model sharded over the CPU and disk
(accelerate device_map forced by max_memory) giving the unsharded model's logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from soaes_core import from_dict
from soaes_core.errors import ConfigError, ModelLoadError
from soaes_core.models import load_model
from soaes_core.placement import Placement, ResolvedPlacement, input_device, memory_bytes

# float32 on the same CPU kernels: sharding only moves weights, so logits agree to this (measured: bit-identical)
SHARDED_ATOL = 1e-6


@pytest.mark.parametrize(("fields", "message"), [
    ({"device": "gpu"}, "device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ({"dtype": "float33"}, "dtype: expected auto, float32, bfloat16, float16 (or bf16, fp16, fp32), got 'float33'"),
    ({"device_map": "everywhere"}, "device_map: expected one of auto, balanced, balanced_low_0, sequential"),
    ({"device_map": {}}, "device_map: an empty mapping places nothing"),
    ({"device_map": {"model.layers.0": "tpu"}}, "device_map.model.layers.0: expected a GPU number, cuda:N, cpu"),
    ({"device_map": {"model": -1}}, "device_map.model: expected a GPU number"),
    ({"device": "cpu", "device_map": {"model": 0}}, "device_map.model: 0 is not on the CPU, but device is cpu"),
    ({"device_map": {"model": "disk"}}, "offload_folder: device_map puts modules on disk; give a folder"),
    ({"max_memory": {"cpu": "1GiB"}}, "max_memory: needs a device_map"),
    ({"device_map": "auto", "max_memory": {}}, "max_memory: give one or more devices"),
    ({"device_map": "auto", "max_memory": {"gpu0": "1GiB"}}, "max_memory.gpu0: unknown device"),
    ({"device_map": "auto", "max_memory": {"cpu": "lots"}}, "max_memory.cpu: expected a positive size"),
    ({"device_map": "auto", "max_memory": {"cpu": 0}}, "max_memory.cpu: expected a positive size"),
    ({"device": "cpu", "device_map": "auto", "max_memory": {0: "1GiB"}}, "max_memory.0: a GPU budget, but device "
                                                                         "is cpu"),
    ({"offload_folder": "/tmp/x"}, "offload_folder: needs a device_map"),
    ({"device_map": "auto", "offload_folder": " "}, "offload_folder: empty path"),
])
def test_bad_values_are_one_config_error(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        Placement(**fields)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_loaded_from_yaml_mapping_names_the_field() -> None:
    p = from_dict(Placement, {"device": "cpu", "dtype": "bf16", "device_map": "auto",
                              "max_memory": {"cpu": "2GiB"}, "offload_folder": "off"})
    assert (p.dtype, p.sharded) == ("bfloat16", True)
    with pytest.raises(ConfigError, match=r"^r\.yaml: device: expected auto"):
        from_dict(Placement, {"device": "tpu"}, source="r.yaml")


def test_auto_resolves_per_machine() -> None:
    auto = Placement()
    assert auto.resolve(cuda_available=False, bf16_supported=False) == ResolvedPlacement("cpu", "float32")
    assert auto.resolve(cuda_available=True, bf16_supported=True) == ResolvedPlacement("cuda", "bfloat16")
    assert auto.resolve(cuda_available=True, bf16_supported=False).dtype == "float16"
    assert Placement(device="cpu", dtype="bf16").resolve(cuda_available=True, bf16_supported=True).dtype == "bfloat16"
    assert Placement(dtype="float32").resolve(cuda_available=True, bf16_supported=True).device == "cuda"
    with pytest.raises(ConfigError, match="device: cuda:1 asked for, but no CUDA GPU is available"):
        Placement(device="cuda:1").resolve(cuda_available=False, bf16_supported=False)
    here = auto.resolve()
    assert here.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_fingerprint_is_empty_for_what_stages_ran_with_before() -> None:
    assert Placement().resolve(cuda_available=False, bf16_supported=False).fingerprint() == {}
    assert Placement(device="cpu", dtype="fp32", device_map="auto").resolve().fingerprint() == {}
    gpu = Placement().resolve(cuda_available=True, bf16_supported=True)
    assert gpu.fingerprint() == {"device": "cuda", "dtype": "bfloat16"}
    assert ResolvedPlacement("cuda:3", "bfloat16").fingerprint() == gpu.fingerprint()
    assert ResolvedPlacement("cpu", "bfloat16").fingerprint() == {"device": "cpu", "dtype": "bfloat16"}


def test_load_kwargs_and_memory_keys() -> None:
    r = Placement(device_map="balanced", max_memory={"0": "70GiB", "cuda:1": "70GiB", "cpu": "200GiB"},
                  offload_folder="off").resolve(cuda_available=True, bf16_supported=True)
    assert r.load_kwargs() == {"dtype": "bfloat16", "device": "cuda", "device_map": "balanced",
                               "max_memory": {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}, "offload_folder": "off"}
    assert "device_map" not in Placement(device="cpu").resolve().load_kwargs()
    assert r.describe() == "cuda bfloat16, device_map balanced (+ disk)"
    assert memory_bytes("1.5GB", "x") == 1_500_000_000 and memory_bytes("2GiB", "x") == 2**31


def test_auto_dtype_on_the_cpu_is_float32(tiny_qwen2_dir: Path) -> None:
    model = load_model(tiny_qwen2_dir, **Placement(device="cpu").resolve().load_kwargs())
    assert model.dtype is torch.float32 and model.device.type == "cpu" and not model.training
    with pytest.raises(ModelLoadError, match="max_memory and offload_folder need a device_map"):
        load_model(tiny_qwen2_dir, dtype="float32", device="cpu", max_memory={"cpu": "1GiB"})


def test_sharded_over_cpu_and_disk_gives_the_unsharded_logits(tiny_qwen2_dir: Path, tiny_qwen2: Any,
                                                              tmp_path: Path) -> None:
    sizes = {n: p.numel() * p.element_size() for n, p in tiny_qwen2.named_parameters()}
    embed = sizes["model.embed_tokens.weight"]  # tied with lm_head: counted once
    layer = sum(v for k, v in sizes.items() if k.startswith("model.layers.0."))
    # room for the embeddings and about one decoder layer (accelerate keeps a layer's worth spare): the rest on disk
    placement = Placement(device="cpu", dtype="float32", device_map="auto", max_memory={"cpu": embed + 2 * layer},
                          offload_folder=str(tmp_path / "offload"))
    sharded = load_model(tiny_qwen2_dir, **placement.resolve().load_kwargs())
    where = sharded.hf_device_map
    assert where.get("model.embed_tokens") == "cpu" and where.get("model.layers.0") == "cpu", where
    assert where.get("model.layers.1") == "disk", where
    assert any(p.device.type == "meta" for p in sharded.parameters())  # offloaded weights are not in memory
    assert input_device(sharded) == input_device(tiny_qwen2) == torch.device("cpu")
    ids = torch.tensor([[1, 502, 1771, 30, 9, 4411, 88, 2], [7, 7, 7, 5100, 4000, 12, 600, 31]])
    with torch.no_grad():
        want = tiny_qwen2(input_ids=ids).logits
        got = sharded(input_ids=ids).logits
    assert got.shape == want.shape == (2, 8, 49152)
    torch.testing.assert_close(got, want, atol=SHARDED_ATOL, rtol=0)


def test_explicit_module_map_with_disk(tiny_qwen2_dir: Path, tiny_qwen2: Any, tmp_path: Path) -> None:
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    placement = from_dict(Placement, {"device": "cpu", "dtype": "fp32", "device_map": device_map,
                                      "offload_folder": str(tmp_path / "off")})
    sharded = load_model(tiny_qwen2_dir, **placement.resolve().load_kwargs())
    assert sharded.hf_device_map["model.layers.0"] == "disk"
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(sharded(input_ids=ids).logits, tiny_qwen2(input_ids=ids).logits,
                                   atol=SHARDED_ATOL, rtol=0)


@pytest.mark.gpu
def test_auto_on_a_gpu_and_sharded_over_gpu_and_cpu(tiny_qwen2_dir: Path, tiny_qwen2: Any) -> None:
    auto = Placement().resolve()
    assert (auto.device, auto.dtype) == ("cuda", "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    model = load_model(tiny_qwen2_dir, **auto.load_kwargs())
    assert model.device.type == "cuda" and model.dtype == getattr(torch, auto.dtype)
    sizes = {n: p.numel() * p.element_size() for n, p in tiny_qwen2.named_parameters()}
    layer = sum(v for k, v in sizes.items() if k.startswith("model.layers.0."))
    gpu_budget = sizes["model.embed_tokens.weight"] + 2 * layer
    placement = Placement(device="cuda", dtype="float32", device_map="auto",
                          max_memory={0: gpu_budget, "cpu": "4GiB"})
    sharded = load_model(tiny_qwen2_dir, **placement.resolve().load_kwargs())
    assert {0, "cpu"} <= set(sharded.hf_device_map.values()), sharded.hf_device_map
    ids = torch.tensor([[1, 502, 1771, 30, 9, 4411, 88, 2]])
    with torch.no_grad():
        got = sharded(input_ids=ids.to("cuda")).logits.cpu()
        want = tiny_qwen2(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # CUDA and CPU fp32 kernels differ in rounding
