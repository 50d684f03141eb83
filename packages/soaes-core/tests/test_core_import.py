"""soaes-core as installed: its version is the distribution's, and the contract loaders keep their signatures."""

from __future__ import annotations

import importlib.metadata as md
import inspect
import re
from pathlib import Path

import pytest

import soaes_core

# PEP 440 public version: N(.N)*[{a|b|rc}N][.postN][.devN]
PUBLIC_VERSION = re.compile(r"^\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?$")


def test_version_is_the_installed_distributions() -> None:
    assert PUBLIC_VERSION.match(soaes_core.__version__), soaes_core.__version__
    assert soaes_core.__version__ == md.version("soaes-core")


def test_every_exported_name_exists() -> None:
    missing = [name for name in soaes_core.__all__ if not hasattr(soaes_core, name)]
    assert missing == []


def test_contract_loaders_signatures() -> None:
    # design.md: load_model(spec, dtype=None, device=None), load_tokenizer(spec); spec defaults to the embedded model
    model = inspect.signature(soaes_core.load_model).parameters
    assert list(model)[:3] == ["spec", "dtype", "device"]
    assert (model["spec"].default, model["dtype"].default, model["device"].default) == (
        soaes_core.DEFAULT_MODEL, None, None)
    tok = inspect.signature(soaes_core.load_tokenizer).parameters
    assert list(tok)[:1] == ["spec"] and tok["spec"].default == soaes_core.DEFAULT_MODEL
    assert soaes_core.DEFAULT_MODEL == "embedded:smollm2-135m"


def test_bad_spec_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(soaes_core.ModelLoadError, match="does not exist"):
        soaes_core.load_model(f"gguf:{tmp_path / 'missing.gguf'}")
    assert issubclass(soaes_core.ModelLoadError, soaes_core.SoaesError)
