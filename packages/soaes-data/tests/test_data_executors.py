"""Curation on datatrove's other executors: Ray (a local cluster on 127.0.0.1, no network) gives the same
documents as the local executor; Slurm job scripts are generated, chained by dependencies, and running the
pickled jobs as Slurm would (no cluster here) gives the same documents too."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import dill
import make_samples
import pytest
import yaml

from soaes_core.errors import ConfigError
from soaes_data.pipeline import load_curation_config, run_curation

STAGES = ["read", "clean", "pii", "quality", "dedup_exact", "dedup_near"]


def _corpus(tmp_path: Path, n: int = 600) -> Path:
    docs = [{"text": f"{make_samples.DOMAIN_DOCS[k % 20][1]}编号{k}。"} for k in range(n)]
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return src


def _recipe(tmp_path: Path, src: Path, name: str, **extra: Any) -> Path:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({"inputs": [str(src)], "output_dir": str(tmp_path / name), "stages": STAGES,
                                      "output_format": "jsonl", "decontaminate": {"use_fetched": False}, **extra}),
                      encoding="utf-8")
    return recipe


def _ids(out: Path) -> list[str]:
    return [json.loads(x)["id"] for x in (out / "final" / "docs.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def local_ids(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    tmp = tmp_path_factory.mktemp("local")
    src = _corpus(tmp)
    run_curation(load_curation_config(_recipe(tmp, src, "local")))
    return src, _ids(tmp / "local")


def test_ray_executor_same_documents(tmp_path: Path, local_ids: tuple[Path, list[str]]) -> None:
    ray = pytest.importorskip("ray")
    src, expected = local_ids
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, object_store_memory=80 * 2**20,
             log_to_driver=False, configure_logging=False)
    try:
        reports = run_curation(load_curation_config(_recipe(tmp_path, src, "ray", executor="ray", tasks=2, workers=2)))
    finally:
        ray.shutdown()
    assert _ids(tmp_path / "ray") == expected
    assert sorted(_ids(tmp_path / "ray")) == sorted(expected) and len(set(expected)) == len(expected)
    near = next(r for r in reports if r.name == "dedup_near")
    assert near.counts["dropped_by_reason"]["near_duplicate_of"] > 0
    assert sorted((tmp_path / "ray" / "work" / "00_segment" / "completions").iterdir())[-1].name == "00001"


def test_slurm_job_scripts(tmp_path: Path, local_ids: tuple[Path, list[str]],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    import datatrove.executor.slurm as slurm

    src, expected = local_ids
    launched: list[tuple[str, tuple[str, ...]]] = []

    def fake_sbatch(script: str, _retriever: Any, *args: str) -> str:
        launched.append((script, args))
        return str(1000 + len(launched))

    monkeypatch.setattr(slurm, "launch_slurm_job", fake_sbatch)
    recipe = _recipe(tmp_path, src, "slurm", executor="slurm", tasks=3,
                     engine={"partition": "cpu", "time": "2:00:00", "cpus_per_task": 1, "mem_per_cpu_gb": 2,
                             "venv_path": "/opt/venv/bin/activate"})
    assert run_curation(load_curation_config(recipe)) == []
    jobs = json.loads((tmp_path / "slurm" / "work" / "slurm_jobs.json").read_text())
    assert [j["phase"] for j in jobs] == ["00_segment", "01_dedup_exact_buckets", "02_dedup_exact_cluster",
                                          "03_dedup_near_buckets", "04_dedup_near_cluster", "05_segment",
                                          "06_finalize"]
    main_jobs = [(s, a) for s, a in launched if "launch_pickled_pipeline" in s]
    assert len(main_jobs) == len(jobs)  # plus one stats-merging job per phase
    arrays = []
    for k, ((script, args), job) in enumerate(zip(main_jobs, jobs, strict=True)):
        assert script.startswith("#!/bin/bash\n") and "#SBATCH --partition=cpu" in script
        assert "#SBATCH --time=2:00:00" in script and "source /opt/venv/bin/activate" in script
        assert f"launch_pickled_pipeline {tmp_path / 'slurm' / 'work' / job['phase']}/executor.pik" in script
        assert Path(job["launch_script"]).read_text() == script
        arrays.append(int(re.search(r"#SBATCH --array=0-(\d+)", script).group(1)) + 1)  # type: ignore[union-attr]
        deps = [a for a in args if a.startswith("--dependency=")]
        if k == 0:
            assert not deps
        else:  # each phase waits for the one before (datatrove's `depends`)
            assert deps == [f"--dependency=afterok:{jobs[k - 1]['job_id']}"]
    assert arrays == [3, 3, 1, 3, 1, 3, 1]
    # run each array task as Slurm would: unpickle the executor, SLURM_ARRAY_TASK_ID set, in dependency order
    monkeypatch.setattr(slurm, "expand_slurm_nodelist", lambda nodes: [nodes])
    monkeypatch.setenv("SLURM_NODELIST", "node1")
    for job, n in zip(jobs, arrays, strict=True):
        with open(Path(job["launch_script"]).parent / "executor.pik", "rb") as fh:
            executor = dill.load(fh)
        for task in range(n):
            monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
            executor.run()
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert _ids(tmp_path / "slurm") == expected
    os.environ.pop("RUN_OFFSET", None)


def test_slurm_needs_partition_and_time(tmp_path: Path, local_ids: tuple[Path, list[str]]) -> None:
    src, _ = local_ids
    with pytest.raises(ConfigError, match=r"needs engine options \['partition', 'time'\]"):
        run_curation(load_curation_config(_recipe(tmp_path, src, "s", executor="slurm")))
