"""Run one training stage under torchrun or DeepSpeed's launcher: the package CLI (`soaes-train stage`) does the
training in every process; this module builds the launcher command, starts it, and reads the stage's manifest back.

`LaunchConfig` is the launch section of a recipe. `launch_command` is the one command builder (the pipeline's scale
plan prints with it too). `run_job` trains a `StageJob` in this process (`launcher: none`) or under the launcher;
either way the result is the stage's `model/` folder with its manifest, and checkpoints under `checkpoints/`, so a
rerun after a kill resumes. The launched processes write to `<stage_dir>/train.log` and end themselves when their
launcher, or the process that started it, is gone (`exit_with_launcher`): a SIGKILL leaves no orphan training on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from soaes_core import atomic_write_text, dump_config, read_manifest, sha256_file
from soaes_core.atomic import pid_alive
from soaes_core.errors import ConfigError, SoaesError

from .config import DeepSpeedConfig, StageConfig, StageJob

log = logging.getLogger(__name__)

LauncherName = Literal["none", "torchrun", "deepspeed"]
OWNER_ENV = "SOAES_TRAIN_OWNER_PID"  # set for launched processes: the pid whose death ends them
LOG_NAME = "train.log"
JOB_NAME = "launch_job.yaml"
CLI_MODULE = "soaes_train.cli"
MULTINODE_PORT = 29500  # torchrun's and DeepSpeed's default rendezvous port
# how a printed command leaves a value to the shell of each node
NODE_RANK_PLACEHOLDER, MASTER_ADDR_PLACEHOLDER = "$NODE_RANK", "$MASTER_ADDR"
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                 "ROLE_RANK", "TORCHELASTIC_RUN_ID")


class LaunchError(SoaesError):
    """A launched stage failed; the message names its log file and the last error line in it."""


@dataclass
class LaunchConfig:
    """How a training stage's processes start: in this process (`none`), or the soaes-train CLI under torchrun or
    DeepSpeed's launcher, `nproc_per_node` processes on each of `nnodes` nodes (gloo on the CPU, nccl on GPUs).

    The global batch is `per_device_train_batch_size × gradient_accumulation_steps × nproc_per_node × nnodes`.
    `zero_stage` / `deepspeed_config` put the trainer under DeepSpeed with any launcher (also `none`)."""

    launcher: LauncherName = field(default="none", metadata={
        "help": "none (train in this process), torchrun, or deepspeed (DeepSpeed's launcher)."})
    nproc_per_node: int = field(default=1, metadata={"help": "Processes per node: one per GPU (on the CPU: gloo)."})
    nnodes: int = field(default=1, metadata={
        "help": "Nodes. deepspeed: the first N hosts of hostfile; torchrun: start the same command on each node."})
    node_rank: int | None = field(default=None, metadata={
        "help": "torchrun with nnodes > 1: this node's rank; unset = $NODE_RANK."})
    hostfile: str | None = field(default=None, metadata={
        "help": "deepspeed with nnodes > 1: MPI-style hostfile ('host slots=8' lines)."})
    master_addr: str | None = field(default=None, metadata={
        "help": "Address of the rank-0 node (nnodes > 1); unset = $MASTER_ADDR (deepspeed: the first host)."})
    master_port: int | None = field(default=None, metadata={
        "help": "Rendezvous port; unset = a free port on one node, 29500 on several."})
    zero_stage: int | None = field(default=None, metadata={
        "help": "Train under DeepSpeed ZeRO 0-3 (the stage's deepspeed settings for the rest, e.g. offload); "
                "unset = as the stage's deepspeed settings say."})
    deepspeed_config: str | None = field(default=None, metadata={
        "help": "A DeepSpeed JSON file that replaces the generated config (trains under DeepSpeed)."})
    env: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Extra environment variables for the launched processes (e.g. NCCL_DEBUG)."})

    def __post_init__(self) -> None:
        for name in ("nproc_per_node", "nnodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"launch.{name} must be >= 1, got {getattr(self, name)}")
        if self.launcher == "none" and self.world_size > 1:
            raise ValueError(f"launch.launcher: none runs one process; {self.world_size} processes need torchrun "
                             "or deepspeed")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"launch.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.hostfile and self.launcher != "deepspeed":
            raise ValueError("launch.hostfile is read by the deepspeed launcher only (torchrun: start the command "
                             "on each node with node_rank)")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError(f"launch.master_port must be in 1..65535, got {self.master_port}")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"launch.node_rank must be in [0, nnodes={self.nnodes}), got {self.node_rank}")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def uses_deepspeed(self) -> bool:
        return self.zero_stage is not None or self.deepspeed_config is not None


def stage_deepspeed(stage: StageConfig, launch: LaunchConfig) -> StageConfig:
    """`stage` with the launch section's DeepSpeed choice applied: a config file, or a ZeRO stage on top of the
    stage's own settings (offload kept where that stage allows it)."""
    if not launch.uses_deepspeed:
        return stage
    ds = stage.deepspeed
    zero = ds.stage if launch.zero_stage is None else launch.zero_stage
    ds = DeepSpeedConfig(**{**dataclasses.asdict(ds), "enabled": True, "stage": zero,
                            "offload_optimizer": ds.offload_optimizer and zero > 0,
                            "offload_param": ds.offload_param and zero == 3,
                            "config_file": launch.deepspeed_config or ds.config_file})
    return dataclasses.replace(stage, deepspeed=ds)


def launch_fingerprint(launch: LaunchConfig) -> dict[str, Any]:
    """The launch settings that change what a stage computes: the process count (it multiplies the global batch,
    so the data order and the result) and the DeepSpeed choice (its optimizer and precision handling). The
    launcher itself, ports, hosts and env do not; defaults give {} so older fingerprints stay valid."""
    out: dict[str, Any] = {}
    if launch.world_size != 1:
        out["world_size"] = launch.world_size
    if launch.zero_stage is not None:
        out["zero_stage"] = launch.zero_stage
    if launch.deepspeed_config is not None and Path(launch.deepspeed_config).is_file():
        out["deepspeed_config_sha256"] = sha256_file(launch.deepspeed_config)
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launcher_argv(launch: LaunchConfig, *, placeholders: bool = False, runnable: bool = False) -> list[str]:
    """The launcher part of the command, up to and including `-m`/`--module`.

    `placeholders`: leave what each node decides to its shell ($NODE_RANK, $MASTER_ADDR) and omit a port not set
    (a printed plan); otherwise they must be known. `runnable`: start the launchers as modules of this Python
    (`python -m torch.distributed.run`, `python -m deepspeed.launcher.runner`), as `torchrun`/`deepspeed` do."""
    if launch.launcher == "none":
        return [sys.executable if runnable else "python", "-m"]
    multi = launch.nnodes > 1
    port = launch.master_port
    if port is None and not placeholders:
        port = MULTINODE_PORT if multi else _free_port()
    if launch.launcher == "deepspeed":
        argv = [sys.executable, "-m", "deepspeed.launcher.runner"] if runnable else ["deepspeed"]
        if multi:
            argv += ["--hostfile", launch.hostfile or "hostfile", "--num_nodes", str(launch.nnodes)]
        if launch.master_addr:
            argv += ["--master_addr", launch.master_addr]
        if port is not None:
            argv += ["--master_port", str(port)]
        # --no_local_rank: the CLI reads LOCAL_RANK from the environment (it takes no --local_rank argument)
        return [*argv, "--num_gpus", str(launch.nproc_per_node), "--no_local_rank", "--module"]
    argv = [sys.executable, "-m", "torch.distributed.run"] if runnable else ["torchrun"]
    if multi:
        rank = launch.node_rank if launch.node_rank is not None else os.environ.get("NODE_RANK")
        addr = launch.master_addr or os.environ.get("MASTER_ADDR")
        if placeholders:
            rank = launch.node_rank if launch.node_rank is not None else NODE_RANK_PLACEHOLDER
            addr = launch.master_addr or MASTER_ADDR_PLACEHOLDER
            port = port or MULTINODE_PORT
        elif rank is None or not addr:
            raise ConfigError("launch: torchrun on several nodes needs node_rank and master_addr (or $NODE_RANK and "
                              "$MASTER_ADDR); start the same command on every node")
        argv += ["--nnodes", str(launch.nnodes), "--node_rank", str(rank), "--master_addr", str(addr)]
    if port is not None:
        argv += ["--master_port", str(port)]
    return [*argv, "--nproc_per_node", str(launch.nproc_per_node), "-m"]


def launch_command(launch: LaunchConfig, module_args: list[str], *, placeholders: bool = False,
                   runnable: bool = False) -> list[str]:
    """The whole command: the launcher (`launcher_argv`) and a module with its arguments, e.g.
    `["soaes_train.cli", "stage", "--config", "job.yaml"]`."""
    return launcher_argv(launch, placeholders=placeholders, runnable=runnable) + list(module_args)


def format_command(argv: list[str]) -> str:
    """A command as one shell line; `$VAR` placeholders stay unquoted so each node's shell fills them in."""
    return " ".join(a if re.fullmatch(r"\$[A-Z_][A-Z0-9_]*", a) else shlex.quote(a) for a in argv)


def check_launch(launch: LaunchConfig) -> None:
    """Refuse, before anything starts, a launch that cannot run here (a missing hostfile or DeepSpeed JSON)."""
    from .deepspeed_setup import load_deepspeed_json

    if launch.deepspeed_config is not None:
        load_deepspeed_json(launch.deepspeed_config)
    if launch.hostfile is not None and not Path(launch.hostfile).is_file():
        raise ConfigError(f"launch.hostfile: no such file {launch.hostfile}")
    if launch.launcher == "torchrun" and launch.nnodes > 1:
        launcher_argv(launch)


def read_stage_result(job: StageJob) -> Any:
    """The `StageResult` of a finished stage, from the manifest its processes wrote into `stage_dir/model`."""
    from .trainer import MODEL_DIRNAME, StageResult

    model_dir = Path(job.stage_dir) / MODEL_DIRNAME
    manifest = read_manifest(model_dir)
    if manifest is None:
        raise LaunchError(f"{job.stage.name}: the launched run wrote no {model_dir / 'manifest.json'}; "
                          f"see {Path(job.stage_dir) / LOG_NAME}")
    training = manifest.get("training") or {}
    return StageResult(name=job.stage.name, model_dir=model_dir, resumed_from=training.get("resumed_from"),
                       attn_implementation=training.get("attn_implementation"),
                       metrics=dict(training.get("metrics") or {}), counts=dict(manifest.get("counts") or {}),
                       warnings=list(manifest.get("warnings") or []))


def last_error_line(text: str) -> str:
    """The line of a launch log that says best what failed: our CLI's `error:` line, else an exception's last line,
    else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pattern in (r"^error: ", r"^[\w.]*(Error|Exception|Interrupt)\b:?"):
        hits = [ln for ln in lines if re.search(pattern, ln)]
        if hits:
            return hits[-1]
    return lines[-1] if lines else "(empty log)"


@dataclass
class LaunchedStage:
    """A stage running under its launcher (in a process group of its own): `wait()` for its result."""

    job: StageJob
    launcher: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_offset: int  # where this attempt's output starts in the (appended) log
    command: list[str]

    def wait(self) -> Any:
        """Wait for the launcher; return the stage's `StageResult`, or raise `LaunchError` naming the log and the
        last error line. Ctrl-C stops the whole process group before it is re-raised."""
        try:
            rc = self.proc.wait()
        except KeyboardInterrupt:
            self.stop()
            raise
        if rc != 0:
            with open(self.log_path, "rb") as fh:
                fh.seek(self.log_offset)
                text = fh.read().decode("utf-8", "replace")
            why = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
            raise LaunchError(f"{self.job.stage.name}: training under {self.launcher} failed ({why}); see "
                              f"{self.log_path}: {last_error_line(text)}")
        return read_stage_result(self.job)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the launcher's process group (launchers pass it to their workers), SIGKILL after `grace_s`."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


def start_stage(job: StageJob, launch: LaunchConfig) -> LaunchedStage:
    """Write `job` to `stage_dir/launch_job.yaml` and start `soaes-train stage` on it under `launch`'s launcher,
    in a new process group, with its output appended to `stage_dir/train.log`."""
    stage_dir = Path(job.stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    job = dataclasses.replace(job, stage=stage_deepspeed(job.stage, launch))
    job_file = atomic_write_text(stage_dir / JOB_NAME, dump_config(job))
    command = launch_command(launch, [CLI_MODULE, "stage", "--config", str(job_file), "-v"], runnable=True)
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    env.update(launch.env)
    # a log file gets one line per logged step instead of progress bars (ours and transformers')
    env.update({OWNER_ENV: str(os.getpid()), "SOAES_PROGRESS": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "PYTHONUNBUFFERED": "1"})
    log_path = stage_dir / LOG_NAME
    with open(log_path, "ab") as fh:
        offset = fh.tell()
        fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {format_command(command)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    log.info("%s: started %s (log %s)", job.stage.name, format_command(command), log_path)
    return LaunchedStage(job, launch.launcher, proc, log_path, offset, command)


def launch_stage(job: StageJob, launch: LaunchConfig) -> Any:
    """Train `job` under `launch`'s launcher and return its `StageResult` (read from the stage's manifest)."""
    return start_stage(job, launch).wait()


def run_job(job: StageJob, launch: LaunchConfig | None = None) -> Any:
    """Train `job`: in this process when the launcher is `none`, else under the launcher. Same outputs either way
    (`stage_dir/model` with its manifest; checkpoints resumed from)."""
    launch = launch or LaunchConfig()
    if launch.launcher != "none":
        return launch_stage(job, launch)
    from .trainer import train_stage

    return train_stage(stage_deepspeed(job.stage, launch), job.model, job.stage_dir, parent=job.parent)


def exit_with_launcher(interval_s: float = 1.0) -> threading.Thread | None:
    """In a launched process (`SOAES_TRAIN_OWNER_PID` set): a daemon thread that SIGKILLs this process once its
    parent (the launcher) or the owner that started the launcher is gone. torchrun starts its workers in sessions
    of their own, so a kill of the launcher would otherwise leave them training into the stage folder."""
    owner = os.environ.get(OWNER_ENV, "")
    if not owner.isdigit():
        return None
    parent, owner_pid = os.getppid(), int(owner)

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent or not pid_alive(owner_pid):
                os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="soaes-exit-with-launcher", daemon=True)
    thread.start()
    return thread
