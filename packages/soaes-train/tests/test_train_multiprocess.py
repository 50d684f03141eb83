"""Two CPU processes (torchrun, gloo) through DeepSpeed ZeRO-3 with CPU offload: trains, sees world size 2,
saves one model, exits cleanly. Slow (two interpreters, DeepSpeed start-up)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not found")
def test_two_process_zero3_gloo(tiny_model_copy: Path, chat_jsonl: Path, tmp_path: Path) -> None:
    recipe = {"name": "mp", "base_model": str(tiny_model_copy), "output_dir": str(tmp_path / "out"),
              "stages": [{"name": "sft", "kind": "sft", "data": {"paths": [str(chat_jsonl)], "max_length": 96},
                          "train": {"max_steps": 6, "per_device_train_batch_size": 2, "learning_rate": 3e-3,
                                    "save_steps": 3, "logging_steps": 1},
                          "deepspeed": {"enabled": True, "stage": 3, "offload_optimizer": True,
                                        "offload_param": True}}]}
    p = tmp_path / "mp.yaml"
    p.write_text(yaml.safe_dump(recipe))
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "SOAES_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(_port()), "-m", "soaes_train.cli",
                           "run", str(p)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model_dir = tmp_path / "out" / "sft" / "model"
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["training"]["world_size"] == 2
    curve = json.loads((model_dir / "loss_curve.json").read_text())["loss"]
    assert len(curve) == 6 and curve[-1] < curve[0]
    assert AutoModelForCausalLM.from_pretrained(model_dir).model.embed_tokens.weight.numel() > 0
