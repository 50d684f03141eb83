"""`soaes demo` on the embedded model: curation balances, speculative output equals plain, report written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from soaes.demo import DemoConfig, run_demo
from soaes_core import from_dict
from soaes_core.errors import ConfigError


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, embedded_model_dir: Path) -> None:
    result = run_demo(DemoConfig(output_dir=str(tmp_path / "demo"), num_prompts=1, max_new_tokens=8))
    assert result.exact
    for name, counts in result.curation.items():
        assert counts["in"] == counts["kept"] + counts["dropped"], name
    assert result.decoding["plain"]["new_tokens"] > 0
    assert result.decoding["speculative"]["new_tokens"] == result.decoding["plain"]["new_tokens"]
    assert 0.0 <= result.metrics["rougeL"] <= 100.0 and result.metrics["num_items"] == 1
    report = Path(result.report_path).read_text(encoding="utf-8")
    assert "identical to plain greedy: **True**" in report
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text(encoding="utf-8"))
    assert saved["exact"] is True and (tmp_path / "demo" / "manifest.json").is_file()


def test_demo_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="draft_layers must be >= 1"):
        from_dict(DemoConfig, {"draft_layers": 0}, source="demo")
