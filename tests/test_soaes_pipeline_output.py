"""What `soaes pipeline run` shows: one line per stage, ETAs from the stage times measured on this machine, and no
library warnings or progress bars unless --verbose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from soaes.pipeline import STAGE_ORDER
from soaes.pipeline.console import key_counts, stage_line
from soaes.pipeline.runner import StageEvent
from soaes.pipeline.timings import DEFAULT_SECONDS_PER_WEIGHT, StageTimes, estimate_stage, run_rate

# stage times (s) as a run records them (made-up values of a plausible size; the estimator is what is tested)
RECORDED = {"curate": 21.4, "pack": 6.2, "cpt": 151.0, "sft_stage1": 148.3, "sft_stage2": 150.9,
            "teacher_data": 203.5, "distill_draft": 291.0, "specdec_bench": 187.2, "export": 4.1, "eval": 412.8,
            "report": 3.3}
WEIGHTS = {"curate": 1.0, "pack": 1.0, "cpt": 3.0, "sft_stage1": 3.0, "sft_stage2": 3.0, "teacher_data": 2.0,
           "distill_draft": 3.0, "specdec_bench": 2.0, "export": 0.5, "eval": 3.0, "report": 1.0}


def test_a_stage_measured_with_its_settings_is_expected_to_take_that_long(tmp_path: Path) -> None:
    """A second run's ETAs are the first run's measured times, also in another run folder, from the history file
    alone; other settings are not measured."""
    times = StageTimes(tmp_path / "timings.json")
    for stage, seconds in RECORDED.items():
        times.record(stage, "cfg", seconds)
    again = StageTimes.load(tmp_path / "timings.json")
    for stage, seconds in RECORDED.items():
        assert estimate_stage(again.measured(stage, "cfg"), WEIGHTS[stage], rate=1.0) == pytest.approx(seconds)
    assert again.measured("cpt", "other settings") is None


def test_the_median_of_the_last_measurements_is_used(tmp_path: Path) -> None:
    times = StageTimes(tmp_path / "t.json")
    for seconds in (100.0, 400.0, 110.0, 105.0, 98.0, 102.0):  # one outlier, then more than KEEP
        times.record("eval", "c", seconds)
    assert StageTimes.load(tmp_path / "t.json").measured("eval", "c") == pytest.approx(105.0)
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    assert StageTimes.load(tmp_path / "bad.json").seconds == {}


def test_unmeasured_stages_use_this_runs_rate() -> None:
    assert estimate_stage(None, 2.0, None) == 2.0 * DEFAULT_SECONDS_PER_WEIGHT
    assert run_rate([(30.0, 1.0, None), (90.0, 3.0, None), (500.0, 1.0, 480.0)]) == pytest.approx(30.0)
    assert estimate_stage(None, 2.0, 30.0) == 60.0


def test_one_line_per_stage_with_status_time_and_counts() -> None:
    done = StageEvent("done", "pack", 3, 11, "no previous output", seconds=65.2, eta_s=600.0,
                      counts={"cpt": {"rows": 3}, "documents": 120, "kind": "feature", "tokens": 5000})
    assert stage_line(done) == ("[3/11] pack: ran in 1m05s (no previous output); documents 120, tokens 5000, "
                                "cpt.rows 3; about 10m00s left")
    assert stage_line(StageEvent("skip", "curate", 1, 11, "up to date")) == "[1/11] curate: up to date"
    assert key_counts({"flag": True, "x": 1.5}) == "x 1.5"


def test_quick_demo_shows_one_line_per_stage_and_no_library_output(quick_run: Path) -> None:
    """The shared `soaes demo --quick` run's output (tests/conftest.py keeps it)."""
    out = (quick_run.parent / "demo-output.txt").read_text(encoding="utf-8")
    stage_lines = [line for line in out.splitlines() if line.startswith("[")]
    names = [line.split("] ", 1)[1].split(":")[0] for line in stage_lines]
    assert names == [n for n in STAGE_ORDER if n in names] and len(names) == len(set(names)) == 11, out[-3000:]
    for noise in ("Setting accelerator", "Loading weights", "Warning", "warn("):
        assert noise not in out, noise


QUIET_SCRIPT = """
import sys
from soaes.pipeline.console import quiet_libraries
from soaes_core import load_model
for mode in ("quiet", "verbose"):
    print(f"--- {mode} ---", flush=True)
    print(f"--- {mode} ---", file=sys.stderr, flush=True)
    with quiet_libraries(verbose=mode == "verbose"):
        import deepspeed.accelerator.real_accelerator as real  # DeepSpeed's import detects the accelerator
        real.ds_accelerator = None  # detect again: the warning comes with each detection
        real.get_accelerator()
        load_model(sys.argv[1])
        from tqdm import tqdm  # as lm-eval shows its progress, and warns
        list(tqdm(range(3), desc="Running loglikelihood requests"))
        import logging
        logging.getLogger("lm_eval.evaluator").warning("generation_kwargs: specified through cli")
    sys.stderr.flush()
    sys.stdout.flush()
"""


def test_library_warnings_and_bars_are_quiet_unless_verbose(tiny_qwen2_dir: Path) -> None:
    """DeepSpeed's accelerator warning, transformers' "Loading weights" bar, lm-eval's tqdm bars and warnings are
    silent in a quiet run and shown with --verbose (in a fresh process, output as a user would see it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "DS_ACCELERATOR")}
    res = subprocess.run([sys.executable, "-c", QUIET_SCRIPT, str(tiny_qwen2_dir)], capture_output=True, text=True,
                         timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-2000:]
    (q1, v1), (q2, v2) = (out.split("--- verbose ---") for out in (res.stdout, res.stderr))
    quiet, verbose = q1 + q2, v1 + v2
    for noise in ("Setting accelerator to CPU", "Loading weights", "Running loglikelihood requests",
                  "specified through cli"):
        assert noise not in quiet, quiet[-2000:]
        assert noise in verbose, verbose[-2000:]
