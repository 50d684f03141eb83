"""`soaes_train.launch`: the one launcher command builder, the launch settings, and real runs of the soaes-train CLI
under torchrun (gloo) and DeepSpeed's launcher (ZeRO-3, CPU accelerator) with two CPU processes.

Loss curves are compared with one process at the same global batch (2 processes × 2 rows = 1 × 4 rows: the same rows
of the same seeded permutation per step) to a relative 1e-5: fp32 throughout, the only difference is the order of
the gradient sums (a gloo all-reduce of two half-batch gradients, or ZeRO-3's reduce-scatter, against one batch),
measured at ~1e-7. A SIGKILL of the launcher's process group (`SOAES_FULL_LAUNCH=1`, it starts two more runs)
resumes from the checkpoint to the same final loss.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from soaes_core import from_dict, read_manifest
from soaes_core.errors import ConfigError
from soaes_train.cli import main
from soaes_train.config import DataConfig, DeepSpeedConfig, StageConfig, StageJob, TrainConfig
from soaes_train.launch import (
    JOB_NAME,
    LOG_NAME,
    LaunchConfig,
    LaunchError,
    check_launch,
    format_command,
    last_error_line,
    launch_command,
    launch_fingerprint,
    launch_stage,
    run_job,
    stage_deepspeed,
    start_stage,
)

FULL = os.environ.get("SOAES_FULL_LAUNCH") == "1"
STEPS, SAVE_STEPS, GLOBAL_BATCH = 6, 2, 4
RTOL = 1e-5


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2_dir: Path) -> tuple[Path, Path]:
    """(a private tiny Qwen2, 60 documents): packed into 64-token rows they fill more than STEPS × GLOBAL_BATCH rows,
    so no step reaches the epoch's end (where a two-process sampler pads the last batch)."""
    base = tmp_path_factory.mktemp("launch")
    model = Path(shutil.copytree(tiny_qwen2_dir, base / "tiny"))
    rng = random.Random(0)
    words = "the state owned enterprise shall register changes of capital within thirty days".split()
    docs = base / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))}) + "\n"
                            for _ in range(60)), encoding="utf-8")
    return model, docs


def _job(inputs: tuple[Path, Path], stage_dir: Path, batch: int, **deepspeed: object) -> StageJob:
    model, docs = inputs
    stage = StageConfig(name="cpt", kind="cpt", data=DataConfig(paths=[str(docs)], max_length=64),
                        train=TrainConfig(learning_rate=1e-3, max_steps=STEPS, per_device_train_batch_size=batch,
                                          save_steps=SAVE_STEPS, logging_steps=1),
                        deepspeed=DeepSpeedConfig(**deepspeed))  # type: ignore[arg-type]
    return StageJob(stage=stage, model=str(model), stage_dir=str(stage_dir), parent={"stage": "base"})


def _curve(model_dir: Path) -> list[float]:
    return json.loads((model_dir / "loss_curve.json").read_text())["loss"]


@pytest.fixture(scope="module")
def one_process(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """The loss curve of one process at the global batch, through `soaes-train stage --config JOB.yaml`."""
    from soaes_core import dump_config

    out = tmp_path_factory.mktemp("one") / "stage"
    job_file = out.parent / "job.yaml"
    job_file.write_text(dump_config(_job(inputs, out, GLOBAL_BATCH)), encoding="utf-8")
    res = CliRunner().invoke(main, ["stage", "--config", str(job_file)])
    assert res.exit_code == 0, res.output
    assert "train_loss=" in res.output
    curve = _curve(out / "model")
    assert len(curve) == STEPS and curve[-1] < curve[0]
    return curve


@pytest.fixture(scope="module")
def torchrun_two(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> object:
    return run_job(_job(inputs, tmp_path_factory.mktemp("tr") / "stage", GLOBAL_BATCH // 2),
                   LaunchConfig(launcher="torchrun", nproc_per_node=2))


# ---------------------------------------------------------------------------------------------------- no processes


def test_one_command_builder_for_both_launchers() -> None:
    mod = ["soaes_train.cli", "stage", "--config", "job.yaml"]
    assert launch_command(LaunchConfig(launcher="torchrun", nproc_per_node=8), mod, placeholders=True) == [
        "torchrun", "--nproc_per_node", "8", "-m", *mod]
    two = LaunchConfig(launcher="torchrun", nproc_per_node=4, nnodes=2)
    assert format_command(launch_command(two, mod, placeholders=True)) == (
        "torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $MASTER_ADDR --master_port 29500 "
        "--nproc_per_node 4 -m soaes_train.cli stage --config job.yaml")
    ds = LaunchConfig(launcher="deepspeed", nproc_per_node=8, nnodes=4, hostfile="hosts", master_port=29600)
    assert format_command(launch_command(ds, mod)) == (
        "deepspeed --hostfile hosts --num_nodes 4 --master_port 29600 --num_gpus 8 --no_local_rank --module "
        "soaes_train.cli stage --config job.yaml")
    # what actually starts: the launchers as modules of this Python, on a free port when none is set
    real = launch_command(LaunchConfig(launcher="torchrun", nproc_per_node=2), mod, runnable=True)
    assert real[:3] == [sys.executable, "-m", "torch.distributed.run"] and real[3] == "--master_port"
    assert launch_command(LaunchConfig(launcher="deepspeed", nproc_per_node=2), mod, runnable=True)[:3] == [
        sys.executable, "-m", "deepspeed.launcher.runner"]
    assert format_command(["echo", "a b", "$X"]) == "echo 'a b' $X"


@pytest.mark.parametrize(("data", "message"), [
    ({"nproc_per_node": 2}, "launcher: none runs one process; 2 processes need torchrun or deepspeed"),
    ({"launcher": "torchrun", "zero_stage": 4}, "zero_stage must be 0, 1, 2 or 3"),
    ({"launcher": "torchrun", "hostfile": "h"}, "hostfile is read by the deepspeed launcher only"),
    ({"launcher": "mpirun"}, "expected one of 'none', 'torchrun', 'deepspeed'"),
    ({"launcher": "torchrun", "nproc_per_node": 0}, "nproc_per_node must be >= 1"),
])
def test_bad_launch_settings_are_one_line(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(LaunchConfig, data, source="recipe.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_check_refuses_what_cannot_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NODE_RANK", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="needs node_rank and master_addr"):
        check_launch(LaunchConfig(launcher="torchrun", nnodes=2))
    with pytest.raises(ConfigError, match="no such file"):
        check_launch(LaunchConfig(launcher="deepspeed", hostfile=str(tmp_path / "none")))
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 7}}')
    with pytest.raises(ConfigError, match="stage must be 0, 1, 2 or 3"):
        check_launch(LaunchConfig(deepspeed_config=str(bad)))


def test_deepspeed_choice_and_fingerprint(tmp_path: Path) -> None:
    stage = StageConfig(name="s", kind="cpt", deepspeed=DeepSpeedConfig(offload_param=False))
    assert stage_deepspeed(stage, LaunchConfig()) is stage
    z3 = stage_deepspeed(dataclass_replace(stage, offload_param=True), LaunchConfig(zero_stage=3)).deepspeed
    assert (z3.enabled, z3.stage, z3.offload_optimizer, z3.offload_param) == (True, 3, True, True)
    z0 = stage_deepspeed(stage, LaunchConfig(zero_stage=0)).deepspeed
    assert (z0.stage, z0.offload_optimizer) == (0, False)  # offload needs ZeRO >= 1
    cfg = tmp_path / "ds.json"
    cfg.write_text('{"zero_optimization": {"stage": 2}}')
    assert stage_deepspeed(stage, LaunchConfig(deepspeed_config=str(cfg))).deepspeed.config_file == str(cfg)
    # what changes the numbers changes the fingerprint; where the processes run does not
    assert launch_fingerprint(LaunchConfig()) == {}
    assert launch_fingerprint(LaunchConfig(launcher="torchrun")) == {}
    assert launch_fingerprint(LaunchConfig(launcher="deepspeed", nproc_per_node=2, master_port=1234)) == \
        launch_fingerprint(LaunchConfig(launcher="torchrun", nproc_per_node=2)) == {"world_size": 2}
    fp = launch_fingerprint(LaunchConfig(zero_stage=3, deepspeed_config=str(cfg)))
    assert fp["zero_stage"] == 3 and len(fp["deepspeed_config_sha256"]) == 64


def dataclass_replace(stage: StageConfig, **deepspeed: object) -> StageConfig:
    import dataclasses

    return dataclasses.replace(stage, deepspeed=dataclasses.replace(stage.deepspeed, **deepspeed))


def test_last_error_line_prefers_our_error_then_the_exception() -> None:
    assert last_error_line("noise\nerror: cpt: no such model\nTraceback\nChildFailedError:\n  x") == \
        "error: cpt: no such model"
    assert last_error_line("Traceback (most recent call last):\n  File x\nValueError: bad value\nexitcode: 1") == \
        "ValueError: bad value"
    assert last_error_line("just\nlines\n") == "lines"


# ---------------------------------------------------------------------------------------------------- processes


def test_failed_launch_is_one_line_naming_the_log(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    job = _job(inputs, tmp_path / "stage", 2)
    job.model = str(tmp_path / "no-such-model")
    with pytest.raises(LaunchError) as err:
        start_stage(job, LaunchConfig()).wait()  # launcher none: the CLI in one subprocess
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "stage" / LOG_NAME) in message
    assert "exit status 2" in message and "error: " in message and "no-such-model" in message
    assert yaml.safe_load((tmp_path / "stage" / JOB_NAME).read_text())["model"] == job.model


def test_torchrun_two_processes_give_the_one_process_curve(torchrun_two: object, one_process: list[float]) -> None:
    model_dir = torchrun_two.model_dir  # type: ignore[attr-defined]
    manifest = read_manifest(model_dir)
    assert manifest["training"]["world_size"] == 2 and manifest["training"]["deepspeed"] is None
    assert torchrun_two.metrics["global_step"] == STEPS  # type: ignore[attr-defined]
    assert _curve(model_dir) == pytest.approx(one_process, rel=RTOL)
    log = (model_dir.parent / LOG_NAME).read_text()
    assert "torch.distributed.run" in log and f"cpt: step {STEPS}/{STEPS} loss" in log  # readable progress lines
    assert "Loading weights" not in log  # no progress bars in the log


def test_deepspeed_zero3_two_processes_give_the_one_process_curve(inputs: tuple[Path, Path], tmp_path: Path,
                                                                   one_process: list[float]) -> None:
    """DeepSpeed's launcher on its CPU accelerator, ZeRO-3 with optimizer and parameter offload (DeepSpeed's CPU
    Adam): the same curve as one plain process."""
    job = _job(inputs, tmp_path / "stage", GLOBAL_BATCH // 2, offload_param=True)
    result = run_job(job, LaunchConfig(launcher="deepspeed", nproc_per_node=2, zero_stage=3))
    training = read_manifest(result.model_dir)["training"]
    assert training["world_size"] == 2
    zero = training["deepspeed"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert _curve(result.model_dir) == pytest.approx(one_process, rel=RTOL)
    assert "deepspeed.launcher.runner" in (tmp_path / "stage" / LOG_NAME).read_text()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(result.model_dir).model.embed_tokens.weight.numel() > 0


@pytest.mark.skipif(not FULL, reason="two more two-process runs: set SOAES_FULL_LAUNCH=1")
def test_sigkill_of_the_launcher_resumes_to_the_same_final_loss(inputs: tuple[Path, Path], tmp_path: Path,
                                                                 one_process: list[float]) -> None:
    import psutil

    job = _job(inputs, tmp_path / "stage", GLOBAL_BATCH // 2)
    launch = LaunchConfig(launcher="torchrun", nproc_per_node=2)
    running = start_stage(job, launch)
    first = tmp_path / "stage" / "checkpoints" / f"checkpoint-{SAVE_STEPS}"  # renamed into place when complete
    deadline = time.monotonic() + 600
    while not first.is_dir():
        assert running.proc.poll() is None, (tmp_path / "stage" / LOG_NAME).read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    workers = psutil.Process(running.proc.pid).children(recursive=True)
    os.killpg(running.proc.pid, signal.SIGKILL)
    running.proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive  # torchrun's workers run in sessions of their own: they end themselves (exit_with_launcher)
    assert not (tmp_path / "stage" / "model" / "manifest.json").exists()
    result = launch_stage(job, launch)
    assert result.resumed_from is not None and "checkpoint-" in result.resumed_from
    curve = _curve(result.model_dir)
    assert len(curve) == STEPS and curve[-1] == pytest.approx(one_process[-1], rel=RTOL)
