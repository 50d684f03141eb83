"""Fault injection on `soaes demo --quick`: a stage killed at one of its fail points (`SOAES_PIPELINE_FAIL_AT`) or
SIGKILLed right after one of its checkpoints is complete, then rerun, writes the same output as the uninterrupted
run: equal bytes, except the fields that record time or the resume itself (`VOLATILE_KEYS`, `TIMING_FILES`).

Each case reruns only the killed stage, in a hard-linked copy of the shared uninterrupted run: the later stages
are a deterministic function of equal upstream bytes (test_soaes_pipeline.py reruns them after a kill). The default
suite runs a representative subset (`DEFAULT_CASES`: a fail point, a trainer's final checkpoint, the feature
draft's final one); `SOAES_FULL_FAULTS=1` runs every fail point and every checkpoint boundary of the recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from soaes.cli import main
from soaes.pipeline import load_pipeline_recipe, stage_dirname
from soaes.pipeline.stages import FAIL_ENV, Eval
from soaes_train.checkpoints import COMPLETE_MARKER

pytestmark = pytest.mark.slow
RECIPE = load_pipeline_recipe("demo", quick=True)
FULL = os.environ.get("SOAES_FULL_FAULTS") == "1"
TRAINING = ("cpt", "sft_stage1", "sft_stage2")

# what records wall time, measured speed, the repository commit or the resume itself: never equal across runs
VOLATILE_KEYS = frozenset({
    "created", "timings_s", "resumed", "resumed_from",  # manifests
    "train_runtime", "train_samples_per_second", "train_steps_per_second",  # transformers' train metrics
    "elapsed", "elapsed_s", "extract_seconds", "train_seconds",  # feature-draft training
    "date", "start_time", "end_time", "total_evaluation_time_seconds", "git_hash", "upper_git_hash",  # lm-eval
    "wall_time_s", "tokens_per_s", "repeats_tokens_per_s", "speedup_vs_plain", "speedup_vs_reference",
    "theoretical_speedup", "costs", "machine", "extra", "padded_rows",  # specdec bench: measured speeds
})
TIMING_FILES = ("bench.md", "bench.png")  # the bench's speed table and plot: present, contents timed


def _fail_points() -> list[tuple[str, str]]:
    """Every `ctx.fail_point` the demo recipe's stages pass (stages.py)."""
    points = [("pack", "after_cpt"), *((s, "before_train") for s in TRAINING),
              ("teacher_data", "after_train"), ("teacher_data", "after_heldout"), ("distill_draft", "before_train"),
              ("specdec_bench", "after_distilled"), ("specdec_bench", "after_undistilled")]
    for label, stage, _, general in Eval.MODELS:
        if stage is None or stage in RECIPE.stages:
            points += [("eval", f"after_{label}_{kind}") for kind in ("domain", "general")
                       if kind == "domain" or general]
    return [p for p in points if p[0] in RECIPE.stages]


def _checkpoints() -> list[tuple[str, int]]:
    """Every checkpoint boundary: the training stages' `checkpoint-N` and the feature draft's `checkpoint.pt`."""
    out = []
    for name in TRAINING:
        t = getattr(RECIPE, name).train
        out += [(name, s) for s in range(1, t.max_steps + 1) if s % t.save_steps == 0 or s == t.max_steps]
    f = RECIPE.distill_draft.feature
    out += [("distill_draft", s) for s in range(1, f.steps + 1) if s % f.checkpoint_every == 0 or s == f.steps]
    return out


# the default suite's subset: a fail point, a trainer's final checkpoint (where resuming once trained a step too
# many), the feature draft's final one; soaes-train's own test kills after every checkpoint of a run
DEFAULT_CASES = {("pack", "after_cpt"), ("sft_stage2", 3), ("distill_draft", 4)}


def _cases(cases: list[Any]) -> list[Any]:
    return [pytest.param(*c, marks=() if FULL or c in DEFAULT_CASES else pytest.mark.skip(
        reason="full fault sweep: set SOAES_FULL_FAULTS=1"), id=f"{c[0]}-{c[1]}") for c in cases]


def test_the_sweep_has_a_first_and_a_final_checkpoint_per_stage() -> None:
    """The quick budgets give every training stage and the draft a checkpoint before the final one, and the default
    subset holds a trainer's final checkpoint and the feature draft's final one."""
    ckpts = _checkpoints()
    for name in (*TRAINING, "distill_draft"):
        assert len([s for n, s in ckpts if n == name]) >= 2, name
    assert ("sft_stage2", RECIPE.sft_stage2.train.max_steps) in DEFAULT_CASES
    assert ("distill_draft", RECIPE.distill_draft.feature.steps) in DEFAULT_CASES
    assert DEFAULT_CASES <= set(_fail_points()) | set(ckpts)


# ------------------------------------------------------------------------------------------------- helpers


def _rerun(run: Path, stage: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, ["pipeline", "run", "demo", "--quick", "-o", str(run), "--from", stage,
                                     "--until", stage, "--set", "threads=1"], env=env)


def _feature_checkpoint_step(path: Path, seen: dict[str, Any]) -> int | None:
    """The step of the feature draft's `checkpoint.pt` (read again only when a new file replaced it)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    if seen.get("key") != key:
        meta = torch.load(path, map_location="cpu", weights_only=True)["meta"]
        seen.update(key=key, step=json.loads(meta)["step"])
    return seen["step"]


def _sigkill_after_checkpoint(run: Path, stage: str, step: int) -> Path:
    """Run `stage` alone in a child `soaes` process and SIGKILL it as soon as its checkpoint at `step` is complete;
    returns that checkpoint."""
    partial = run / "stages" / f".{stage_dirname(stage)}.partial"
    feature = stage == "distill_draft"
    marker = partial / "distilled" / "checkpoint.pt" if feature else \
        partial / "checkpoints" / f"checkpoint-{step}" / COMPLETE_MARKER
    seen: dict[str, Any] = {}

    def done() -> bool:
        return _feature_checkpoint_step(marker, seen) == step if feature else marker.is_file()

    env = {**os.environ, "SOAES_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop(FAIL_ENV, None)
    cmd = [str(Path(sys.executable).with_name("soaes")), "pipeline", "run", "demo", "--quick", "-o", str(run),
           "--from", stage, "--until", stage, "--set", "threads=1"]
    log = run.with_name(f"{stage}-{step}.log")
    with open(log, "wb") as fh:
        child = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 1200
            while not done():
                if child.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{stage}: no checkpoint at step {step} before the child ended (rc {child.poll()}): "
                                + log.read_text(errors="replace")[-2000:])
                time.sleep(0.02)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL, log.read_text(errors="replace")[-2000:]
    assert not (run / "stages" / stage_dirname(stage)).exists(), f"{stage} finished before the kill"
    return marker.parent


def _normalise(obj: Any, roots: tuple[str, ...]) -> Any:
    """`obj` without volatile fields, with the run folder's path replaced by `<run>`."""
    if isinstance(obj, dict):
        return {k: _normalise(v, roots) if k != "outputs" else _outputs(v, roots)
                for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [_normalise(v, roots) for v in obj]
    if isinstance(obj, str):
        for root in roots:
            obj = obj.replace(root, "<run>")
    return obj


def _outputs(outputs: Any, roots: tuple[str, ...]) -> Any:
    """A manifest's file list: checksums of the files compared by content (JSON, timed files) are left out."""
    if not isinstance(outputs, dict):
        return _normalise(outputs, roots)
    return {k: (v if not (k.endswith(".json") or k.endswith(".pt") or k.endswith(TIMING_FILES)) else "<compared>")
            for k, v in outputs.items()}


def _plain(obj: Any) -> Any:
    """Nested state with every tensor replaced by its dtype, shape and bytes (comparable with ==)."""
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().cpu().reshape(-1).contiguous()
        return str(obj.dtype), tuple(obj.shape), flat.view(torch.uint8).numpy().tobytes()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _checkpoint_pt(path: Path, roots: tuple[str, ...]) -> Any:
    """The feature draft's checkpoint: parameters and optimizer state by bytes, its metadata without timings."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {"params": _plain(state["params"]), "optimizer": _plain(state["optimizer"]),
            "meta": _normalise(json.loads(state["meta"]), roots)}


def stage_differences(ref_run: Path, run: Path, stage: str) -> list[str]:
    """Files of `stage` whose content differs between two run folders (volatile fields ignored)."""
    a, b = ref_run / "stages" / stage_dirname(stage), run / "stages" / stage_dirname(stage)
    files = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    other = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    diffs = [f"only in one run: {f}" for f in sorted(files ^ other)]
    ra = (str(ref_run), str(ref_run.resolve()))
    rb = (str(run), str(run.resolve()))
    for rel in sorted(files & other):
        fa, fb = a / rel, b / rel
        if fa.read_bytes() == fb.read_bytes() or rel.endswith(TIMING_FILES):
            continue
        if rel.endswith(".json"):
            same = _normalise(json.loads(fa.read_text()), ra) == _normalise(json.loads(fb.read_text()), rb)
        elif rel.endswith(".pt"):
            same = _checkpoint_pt(fa, ra) == _checkpoint_pt(fb, rb)
        else:
            same = False
        if not same:
            diffs.append(rel)
    return diffs


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("stage", "point"), _cases(_fail_points()))
def test_stage_killed_at_a_fail_point_reruns_to_the_same_output(stage: str, point: str, quick_run: Path,
                                                                copy_quick_run) -> None:
    run = copy_quick_run()
    _remove_stage(run, stage)
    res = _rerun(run, stage, env={FAIL_ENV: f"{stage}:{point}"})
    assert res.exit_code == 2 and "injected failure" in res.output, res.output
    assert not (run / "stages" / stage_dirname(stage)).exists()
    res = _rerun(run, stage)
    assert res.exit_code == 0 and f"{stage}: ran in" in res.output, res.output
    assert stage_differences(quick_run, run, stage) == []


@pytest.mark.parametrize(("stage", "step"), _cases(_checkpoints()))
def test_stage_sigkilled_after_a_checkpoint_resumes_to_the_same_output(stage: str, step: int, quick_run: Path,
                                                                       copy_quick_run) -> None:
    run = copy_quick_run()
    _remove_stage(run, stage)
    ckpt = _sigkill_after_checkpoint(run, stage, step)
    res = _rerun(run, stage)
    assert res.exit_code == 0 and f"{stage}: ran in" in res.output, res.output
    if stage in TRAINING:  # it went on from the checkpoint the kill left (the path is inside the partial folder)
        resumed = json.loads((run / "stages" / stage_dirname(stage) / "manifest.json").read_text())["counts"]
        assert resumed["resumed_from"] == str(ckpt)
        assert resumed["metrics"]["global_step"] == getattr(RECIPE, stage).train.max_steps
    assert stage_differences(quick_run, run, stage) == []


def _remove_stage(run: Path, stage: str) -> None:
    shutil.rmtree(run / "stages" / stage_dirname(stage))
