"""soaes-data as installed: its version is the distribution's, its CLI entry point works, `pack` keeps its contract."""

from __future__ import annotations

import inspect

import soaes_data
from soaes_core.testing.installed import check_installed_distribution
from soaes_data.packing import build_packed_example, pack


def test_installed_distribution_and_console_script() -> None:
    check_installed_distribution("soaes-data", soaes_data, {"curate", "pack", "split", "inspect"})


def test_pack_contract() -> None:
    assert list(inspect.signature(pack).parameters) == ["lengths", "max_length"]
    lengths = [5, 3, 2, 4, 6, 1]
    bins = pack(lengths, 6)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 6 for b in bins)
    packed = build_packed_example([{"input_ids": [7, 8, 9]}, {"input_ids": [4, 5]}], [0, 1])
    assert packed["input_ids"] == [7, 8, 9, 4, 5] and packed["position_ids"] == [0, 1, 2, 0, 1]
    assert packed["labels"][3] == -100
