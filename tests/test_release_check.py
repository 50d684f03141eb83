"""scripts/release_check.py's metadata rules (versions, changelog sections, sibling ranges), on the real tree and on
small trees that break each rule once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def release_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("release_check", ROOT / "scripts" / "release_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _package(root: Path, rel: str, name: str, version: str, deps: list[str], changelog: str | None) -> None:
    pkg = root / rel
    module = name.replace("-", "_")
    (pkg / "src" / module).mkdir(parents=True)
    (pkg / "src" / module / "__init__.py").write_text(f'__version__ = "{version}"\n')
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        f'[project]\nname = "{name}"\ndynamic = ["version"]\nrequires-python = ">=3.10"\ndependencies = {deps!r}\n'
        f'[project.scripts]\n{name} = "{module}.cli:main"\n'
        f'[tool.hatch.version]\npath = "src/{module}/__init__.py"\n'
        f'[tool.hatch.build.targets.wheel]\npackages = ["src/{module}"]\n'.replace("'", '"'))
    if changelog is not None:
        (pkg / "CHANGELOG.md").write_text(changelog)


def _tree(root: Path, data_dep: str = "soaes-core>=0.2,<0.3", core_log: str | None = "## Unreleased\n\n## 0.2.0\n",
          core_version: str = "0.2.0") -> Path:
    _package(root, "packages/soaes-core", "soaes-core", core_version, ["torch>=2.4"], core_log)
    _package(root, "packages/soaes-data", "soaes-data", "0.3.1", [data_dep, "click>=8.1"], "## 0.3.1 (2026-11-30)\n")
    _package(root, ".", "soaes", "1.0.0", ["soaes-core>=0.2,<0.3", "soaes-data~=0.3.0"], "## [1.0.0]\n")
    return root


def _problems(release_check: ModuleType, root: Path) -> dict[str, list[str]]:
    projects = release_check.load_projects(root)
    release_check.check_metadata(root, projects)
    return {p.name: p.problems for p in projects}


def test_consistent_tree_passes(release_check: ModuleType, tmp_path: Path) -> None:
    problems = _problems(release_check, _tree(tmp_path))
    assert problems == {"soaes-core": [], "soaes-data": [], "soaes": []}
    projects = {p.name: p for p in release_check.load_projects(tmp_path)}
    assert projects["soaes-data"].import_name == "soaes_data" and projects["soaes-data"].scripts == ["soaes-data"]
    assert projects["soaes"].dist_info == "soaes-1.0.0.dist-info" and projects["soaes"].wheel is None


@pytest.mark.parametrize(("data_dep", "message"), [
    ("soaes-core>=0.1,<0.2", "does not admit soaes-core 0.2.0"),
    ("soaes-core>=0.2", "has no upper bound"),
])
def test_sibling_range_must_admit_the_tree_and_be_bounded(release_check: ModuleType, tmp_path: Path, data_dep: str,
                                                          message: str) -> None:
    problems = _problems(release_check, _tree(tmp_path, data_dep=data_dep))
    assert len(problems["soaes-data"]) == 1 and message in problems["soaes-data"][0]
    assert problems["soaes-core"] == [] and problems["soaes"] == []


def test_version_bump_without_a_changelog_section_or_range_update_is_reported(release_check: ModuleType,
                                                                           tmp_path: Path) -> None:
    problems = _problems(release_check, _tree(tmp_path, core_version="0.3.0"))
    assert problems["soaes-core"] == ["packages/soaes-core/CHANGELOG.md has no `## 0.3.0` section"]
    assert any("does not admit soaes-core 0.3.0" in p for p in problems["soaes-data"])
    assert any("does not admit soaes-core 0.3.0" in p for p in problems["soaes"])


def test_missing_changelog_and_bad_version(release_check: ModuleType, tmp_path: Path) -> None:
    assert "CHANGELOG.md is missing" in _problems(release_check, _tree(tmp_path / "a", core_log=None))["soaes-core"][0]
    problems = _problems(release_check, _tree(tmp_path / "b", core_version="0.2-beta!"))
    assert problems["soaes-core"] == ["version '0.2-beta!' is not PEP 440"]


def test_the_tree_is_releasable(release_check: ModuleType) -> None:
    problems = _problems(release_check, ROOT)
    assert set(problems) == {"soaes", "soaes-core", "soaes-data", "soaes-train", "soaes-distill", "soaes-specdec",
                             "soaes-eval"}
    assert {name: found for name, found in problems.items() if found} == {}


@pytest.mark.parametrize("ignored", [False, True])
def test_build_reports_package_files_left_out_of_the_wheel(release_check: ModuleType, tmp_path: Path,
                                                          ignored: bool) -> None:
    # a tracked lexicon that the ignore rules keep out of the wheel is a broken release
    hatch = Path(sys.executable).parent / "hatch"
    if not hatch.exists():
        pytest.skip("hatch is not installed next to this Python (the dev extra installs it)")
    root = tmp_path / "src"
    _package(root, "packages/soaes-core", "soaes-core", "0.2.0", [], "## 0.2.0\n")
    (root / "packages/soaes-core/src/soaes_core/lexicon.tsv").write_text("国资委\t1\n", encoding="utf-8")
    (root / ".gitignore").write_text("*.tsv\n" if ignored else "*.pyc\n")
    project = release_check.load_project(root, Path("packages/soaes-core"))
    release_check.build(project, root, tmp_path / "dist", str(hatch))
    assert project.wheel is not None and project.wheel.name == "soaes_core-0.2.0-py3-none-any.whl"
    if ignored:
        assert project.problems == ["wheel lacks 1 package file(s): soaes_core/lexicon.tsv"]
    else:
        assert project.problems == []
