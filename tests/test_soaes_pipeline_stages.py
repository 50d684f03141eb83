"""The data stages of `soaes pipeline` on the shipped samples: curate → decontaminate → pack, as a slice."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from soaes.cli import main
from soaes.pipeline import load_pipeline_recipe, plan_pipeline, stage_dirname


def test_curate_decontaminate_pack_slice(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "data-only", "stages": ["curate", "decontaminate", "pack", "cpt"],
                                      "pack": {"max_length": 128}}), encoding="utf-8")
    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["pipeline", "run", str(recipe), "-o", str(run), "--until", "pack"])
    assert res.exit_code == 0, res.output
    dec = json.loads((run / "stages" / stage_dirname("decontaminate") / "manifest.json").read_text())
    for name, c in dec["counts"].items():
        assert c["in"] == c["kept"] + c["dropped"] and c["in"] > 0, name
    pack = json.loads((run / "stages" / stage_dirname("pack") / "manifest.json").read_text())
    # packing reads the decontaminated files, and records their hashes
    assert pack["pipeline"]["inputs"]["corpus"]["path"].endswith(f"{stage_dirname('decontaminate')}/docs.jsonl")
    assert pack["pipeline"]["inputs"]["sft_stage1"]["path"].endswith("sft_stage1.jsonl")
    assert pack["counts"]["cpt"]["kept"] == dec["counts"]["docs"]["kept"]
    plans = {p.name: p.status for p in plan_pipeline(load_pipeline_recipe(recipe), run)}
    assert plans == {"curate": "up-to-date", "decontaminate": "up-to-date", "pack": "up-to-date", "cpt": "will run"}
    res = CliRunner().invoke(main, ["pipeline", "run", str(recipe), "-o", str(run), "--from", "pack",
                                    "--until", "pack"])
    assert res.exit_code == 0 and "pack: skipped (up to date)" in res.output
