"""manifest.json: inputs, config, counts, versions, checksums; tampering is detected."""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from pathlib import Path

from soaes_core.manifest import Timer, read_manifest, verify_outputs, write_manifest


@dataclass
class Cfg:
    k: int = 3


def test_manifest_records_everything_and_detects_tampering(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("input")
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.jsonl").write_text('{"x": 1}\n')
    timer = Timer()
    with timer("work"):
        pass
    write_manifest(out, "unit", inputs={"corpus": src}, config=Cfg(), counts={"in": 1, "kept": 1},
                   timings=timer.timings)
    m = read_manifest(out)
    assert m is not None and m["stage"] == "unit" and m["config"] == {"k": 3}
    assert m["inputs"]["corpus"]["size"] == 5 and len(m["inputs"]["corpus"]["sha256"]) == 64
    assert set(m["outputs"]) == {"data.jsonl"} and "work" in m["timings_s"]
    assert m["versions"]["soaes-core"] == md.version("soaes-core") and "torch" in m["versions"]
    assert verify_outputs(out) == []
    (out / "data.jsonl").write_text('{"x": 2}\n')
    assert verify_outputs(out) == ["data.jsonl"]
