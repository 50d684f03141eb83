#!/usr/bin/env python3
"""Release check: build every soaes distribution (the six packages and the root) with hatch, then install each one
ALONE in a fresh venv with only its declared dependencies and prove it works there.

Per distribution it checks, and reports every failure (exit 1) rather than stopping at the first:
  metadata  version is PEP 440, CHANGELOG.md has a `## <version>` section, every sibling requirement is a bounded
            range (`>=a,<b`) that admits the sibling's version in the tree;
  build     `hatch build` makes a wheel and an sdist; every file under src/<import>/ is in the wheel (package data:
            samples, templates, YAML, TSV); a wheel built from the sdist has the same files;
  install   `uv pip install WHEEL` into an empty venv, siblings only from the wheels just built (--find-links),
            third-party versions from constraints/dev.txt (torch = the local CPU wheel; a resolution that would pull
            CUDA packages is refused before anything is downloaded); `uv pip check`;
  run       `__version__` equals the installed metadata, every submodule imports (a missing module is allowed only
            when an optional extra provides it), every module-level or lazy `import X` is provided by a declared
            dependency (not merely a transitive one), and every console script answers `--help` and `--version`.

The sources are a copy of the files git would commit (tracked + untracked-not-ignored; `--tracked-only` for exactly a
clean clone), so nothing ignored or left over in the working tree (build outputs, caches, .venv) can make it pass.

    .venv/bin/python scripts/release_check.py            # or: make release-check
    .venv/bin/python scripts/release_check.py --only soaes-core soaes-data --keep
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
# Imported lazily by code paths that document an environment of their own; not declared on purpose.
UNDECLARED_OPTIONAL = {"vllm": "vLLM pins its own torch and is installed in a separate environment"}
# Names that would mean a CUDA build of torch is about to be downloaded (gigabytes); refused unless --allow-cuda.
CUDA_DIST = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
VERSION_LINE = re.compile(r'^__version__\s*=\s*"([^"]+)"', re.M)


@dataclass
class Project:
    """One distribution in the tree: where it is and what its pyproject declares."""

    name: str
    path: Path  # relative to the source root
    import_name: str
    version: str
    dependencies: list[str]
    extras: dict[str, list[str]]
    scripts: list[str]
    problems: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    wheel: Path | None = None  # set by build()

    @property
    def dist_info(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}.dist-info"

    @property
    def sdist_name(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}.tar.gz"


def load_project(root: Path, rel: Path) -> Project:
    """Read `rel/pyproject.toml` (hatch layout: version from `[tool.hatch.version] path`, one wheel package)."""
    data = tomllib.loads((root / rel / "pyproject.toml").read_text(encoding="utf-8"))
    proj, hatch = data["project"], data["tool"]["hatch"]
    version_file = root / rel / hatch["version"]["path"]
    match = VERSION_LINE.search(version_file.read_text(encoding="utf-8"))
    if match is None:
        raise SystemExit(f"error: {version_file}: no `__version__ = \"...\"` line")
    (package,) = hatch["build"]["targets"]["wheel"]["packages"]
    return Project(name=canonicalize_name(proj["name"]), path=rel, import_name=Path(package).name,
                   version=match.group(1), dependencies=list(proj.get("dependencies", [])),
                   extras={k: list(v) for k, v in proj.get("optional-dependencies", {}).items()},
                   scripts=sorted(proj.get("scripts", {})))


def load_projects(root: Path) -> list[Project]:
    """The packages under packages/ (by directory name), then the root distribution."""
    rels = sorted(p.parent.relative_to(root) for p in (root / "packages").glob("*/pyproject.toml"))
    return [load_project(root, rel) for rel in rels] + [load_project(root, Path("."))]


def check_metadata(root: Path, projects: list[Project]) -> None:
    """Versions, changelog sections and sibling ranges, from the files alone (fast; runs before any build)."""
    versions = {p.name: p.version for p in projects}
    for p in projects:
        try:
            Version(p.version)
        except InvalidVersion:
            p.problems.append(f"version {p.version!r} is not PEP 440")
            continue
        changelog = root / p.path / "CHANGELOG.md"
        heading = re.compile(rf"^##\s+\[?v?{re.escape(p.version)}\]?(\s|$)", re.M)
        if not changelog.is_file():
            p.problems.append(f"{changelog.relative_to(root)} is missing")
        elif not heading.search(changelog.read_text(encoding="utf-8")):
            p.problems.append(f"{changelog.relative_to(root)} has no `## {p.version}` section")
        declared = [(None, d) for d in p.dependencies] + [(x, d) for x, ds in p.extras.items() for d in ds]
        for extra, text in declared:
            req = Requirement(text)
            sibling = canonicalize_name(req.name)
            if sibling not in versions:
                continue
            where = f"{p.path / 'pyproject.toml'}: {'[' + extra + '] ' if extra else ''}{text!r}"
            if not req.specifier.contains(versions[sibling], prereleases=True):
                p.problems.append(f"{where} does not admit {sibling} {versions[sibling]} (the tree's version)")
            if not any(s.operator in ("<", "~=", "==") for s in req.specifier):
                p.problems.append(f"{where} has no upper bound (use a compatible range such as >=0.2,<0.3)")


def source_files(root: Path, tracked_only: bool) -> tuple[list[str], list[str]]:
    """Paths git would put in a clean clone (+ untracked, not ignored ones unless tracked_only), and the untracked."""
    def ls(*args: str) -> list[str]:
        out = subprocess.run(["git", "ls-files", "-z", *args], cwd=root, check=True, capture_output=True).stdout
        return [f for f in out.decode().split("\0") if f]

    tracked = [f for f in ls("--cached") if (root / f).is_file()]
    untracked = [] if tracked_only else ls("--others", "--exclude-standard")
    return sorted(set(tracked) | set(untracked)), untracked


def stage(root: Path, files: list[str], dest: Path) -> None:
    """Copy `files` (relative to root) into dest, keeping the layout."""
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def run(cmd: list[str | Path], cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def tail(proc: subprocess.CompletedProcess[str], lines: int = 15) -> str:
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return "\n      ".join(text[-lines:])


def build(p: Project, src: Path, dist: Path, hatch: str) -> None:
    """hatch build (wheel + sdist) into dist; check the wheel holds every source file of the package."""
    proc = run([hatch, "build", "-t", "wheel", "-t", "sdist", dist], cwd=src / p.path)
    wheels, sdist = sorted(dist.glob(f"{p.name.replace('-', '_')}-{p.version}-*.whl")), dist / p.sdist_name
    if proc.returncode != 0 or len(wheels) != 1 or not sdist.is_file():
        p.problems.append(f"hatch build failed:\n      {tail(proc)}")
        return
    wheel = p.wheel = wheels[0]
    pkg_dir = src / p.path / "src" / p.import_name
    in_tree = {f"{p.import_name}/{f.relative_to(pkg_dir).as_posix()}" for f in pkg_dir.rglob("*") if f.is_file()}
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(in_tree - in_wheel)
    if missing:
        p.problems.append(f"wheel lacks {len(missing)} package file(s): {', '.join(missing[:8])}")
    stray = sorted(n for n in in_wheel if not n.startswith((f"{p.import_name}/", f"{p.dist_info}/")))
    if stray:
        p.problems.append(f"wheel holds files outside {p.import_name}/: {', '.join(stray[:8])}")
    check_sdist(p, sdist, in_wheel, dist.parent / "from-sdist", hatch)


def check_sdist(p: Project, sdist: Path, wheel_files: set[str], work: Path, hatch: str) -> None:
    """A wheel built from the unpacked sdist (what pip does with it) has the same files as the direct wheel."""
    unpack = work / p.name
    shutil.rmtree(unpack, ignore_errors=True)
    unpack.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(unpack, filter="data")
    (top,) = list(unpack.iterdir())
    out = work / f"{p.name}-dist"
    proc = run([hatch, "build", "-t", "wheel", out], cwd=top)
    wheels = list(out.glob("*.whl")) if out.is_dir() else []
    if proc.returncode != 0 or len(wheels) != 1:
        p.problems.append(f"building a wheel from the sdist failed:\n      {tail(proc)}")
        return
    again = {n for n in zipfile.ZipFile(wheels[0]).namelist() if not n.endswith("/RECORD")}
    first = {n for n in wheel_files if not n.endswith("/RECORD")}
    if again != first:
        diff = sorted(first ^ again)
        p.problems.append(f"sdist is incomplete: its wheel differs in {len(diff)} file(s): {', '.join(diff[:8])}")


PROBE = r'''
import ast, importlib, importlib.metadata as md, json, pkgutil, sys
from pathlib import Path
pkg, dist = sys.argv[1], sys.argv[2]
mod = importlib.import_module(pkg)
failed = {}
for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
    try:
        importlib.import_module(info.name)
    except BaseException as exc:  # noqa: BLE001 - report any import failure
        failed[info.name] = [type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
                             getattr(exc, "name", None)]
imports = {}
root = Path(mod.__file__).parent
for path in sorted(root.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            imports.setdefault(name.split(".")[0], f"{path.relative_to(root.parent)}:{node.lineno}")
provided = md.packages_distributions()
print(json.dumps({"version": getattr(mod, "__version__", None), "metadata_version": md.version(dist),
                  "failed": failed, "imports": imports, "stdlib": sorted(sys.stdlib_module_names),
                  "provided": {k: provided.get(k, []) for k in imports}}))
'''


def install_and_probe(p: Project, projects: list[Project], dist: Path, venv: Path, constraints: Path,
                      find_links: list[str], uv: str, allow_cuda: bool) -> None:
    """Install the wheel alone into a fresh venv, then import, analyse imports and run its console scripts."""
    t0 = time.monotonic()
    proc = run([uv, "venv", "-q", "--python", sys.executable, venv])
    if proc.returncode != 0:
        p.problems.append(f"uv venv failed:\n      {tail(proc)}")
        return
    py = venv / "bin" / "python"
    links = [arg for link in [str(dist), *find_links] for arg in ("--find-links", link)]
    # uv caches a find-links wheel by its file name: without a refresh it would install a stale build of a sibling
    refresh = [arg for q in projects for arg in ("--refresh-package", q.name)]
    install = [uv, "pip", "install", "--python", py, "-c", constraints, *links, *refresh, p.wheel]
    plan = run([*install, "--dry-run"])
    planned = re.findall(r"^ \+ ([A-Za-z0-9_.\-]+)(?:==| @ )(\S+)", plan.stdout + plan.stderr, re.M)
    if plan.returncode != 0 or not planned:
        p.problems.append(f"dependencies do not resolve:\n      {tail(plan)}")
        return
    cuda = sorted(f"{n}=={v}" for n, v in planned if CUDA_DIST.match(canonicalize_name(n)))
    if cuda and not allow_cuda:
        p.problems.append(f"resolution would download CUDA packages ({', '.join(cuda[:4])}...): refused; is the CPU "
                          "torch wheel on a --find-links path? (--allow-cuda to accept)")
        return
    proc = run(install)
    if proc.returncode != 0:
        p.problems.append(f"install failed:\n      {tail(proc)}")
        return
    ours = {q.name: q for q in projects}
    for name, _ in planned:
        q = ours.get(canonicalize_name(name))
        if q is not None and (q.wheel is None or not same_files(venv, q, q.wheel)):
            p.problems.append(f"the installed {q.name} is not the wheel just built (a cached or indexed build?)")
    proc = run([uv, "pip", "check", "--python", py])
    if proc.returncode != 0:
        p.problems.append(f"uv pip check:\n      {tail(proc)}")
    p.timings["install"] = time.monotonic() - t0

    t0 = time.monotonic()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "SOAES_PROGRESS": "0", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    probe = venv / "probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    proc = run([py, "-I", probe, p.import_name, p.name], cwd=venv, env=env)
    if proc.returncode != 0:
        p.problems.append(f"`import {p.import_name}` failed in its own venv:\n      {tail(proc)}")
        return
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if report["version"] != report["metadata_version"] or report["version"] != p.version:
        p.problems.append(f"__version__ {report['version']} / installed metadata {report['metadata_version']} / "
                          f"tree {p.version} disagree")
    check_imports(p, report)
    for script in p.scripts:
        exe = venv / "bin" / script
        for args in (["--help"], ["--version"]):
            proc = run([exe, *args], cwd=venv, env=env, timeout=600)
            if proc.returncode != 0:
                p.problems.append(f"`{script} {' '.join(args)}` exited {proc.returncode}:\n      {tail(proc)}")
            elif args == ["--version"] and p.version not in proc.stdout.split():
                p.problems.append(f"`{script} --version` printed {proc.stdout.strip()!r}, not {p.version}")
    p.timings["run"] = time.monotonic() - t0


def same_files(venv: Path, p: Project, wheel: Path) -> bool:
    """True when the venv holds exactly `wheel`'s package files (RECORD hashes) for distribution p."""
    def entries(record: str) -> set[str]:
        return {line for line in record.splitlines() if line.startswith(f"{p.import_name}/")}

    installed = list(venv.glob(f"lib/python*/site-packages/{p.dist_info}/RECORD"))
    with zipfile.ZipFile(wheel) as zf:
        built = entries(zf.read(f"{p.dist_info}/RECORD").decode())
    return len(installed) == 1 and bool(built) and entries(installed[0].read_text(encoding="utf-8")) == built


def check_imports(p: Project, report: dict) -> None:
    """Every imported top-level name must be stdlib, the package itself, or come from a declared distribution."""
    declared = {canonicalize_name(Requirement(d).name) for d in p.dependencies}
    optional = {canonicalize_name(Requirement(d).name) for ds in p.extras.values() for d in ds}
    stdlib = set(report["stdlib"]) | {"__future__"}
    optional_modules = set()
    for name, where in sorted(report["imports"].items()):
        if name in stdlib or name == p.import_name:
            continue
        dists = {canonicalize_name(d) for d in report["provided"].get(name, [])}
        if dists & declared:
            continue
        guess = canonicalize_name(name)
        if dists & optional or (not dists and guess in optional):
            optional_modules.add(name)
            continue
        if not dists and name in UNDECLARED_OPTIONAL:
            optional_modules.add(name)
            continue
        if dists:
            p.problems.append(f"imports `{name}` ({where}) from {', '.join(sorted(dists))}, which it does not declare "
                              "(it is only there as someone else's dependency)")
        else:
            p.problems.append(f"imports `{name}` ({where}), which no declared dependency or extra provides")
    for module, (kind, message, missing) in sorted(report["failed"].items()):
        top = (missing or "").split(".")[0]
        if kind == "ModuleNotFoundError" and top in optional_modules:
            continue
        p.problems.append(f"`import {module}` fails in its own venv: {kind}: {message}")


def pip_find_links() -> list[str]:
    """pip's configured find-links (where a machine keeps local wheels such as the CPU torch build), if any."""
    proc = run([sys.executable, "-m", "pip", "config", "get", "global.find-links"], timeout=60)
    return proc.stdout.split() if proc.returncode == 0 else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="check only these distributions (others still built)")
    parser.add_argument("--work", type=Path, help="work directory (default: a fresh temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (wheels, venvs)")
    parser.add_argument("--tracked-only", action="store_true", help="only git-tracked files (exactly a clean clone)")
    parser.add_argument("--find-links", action="append", default=[],
                        help="extra wheel directory (default: $PIP_FIND_LINKS, e.g. where the CPU torch wheel is)")
    parser.add_argument("--allow-cuda", action="store_true", help="allow resolving CUDA builds (multi-GB downloads)")
    args = parser.parse_args(argv)

    bindir = Path(sys.executable).parent
    hatch = shutil.which("hatch", path=str(bindir)) or shutil.which("hatch")
    uv = shutil.which("uv", path=str(bindir)) or shutil.which("uv")
    if not hatch or not uv:
        print("error: release check needs `hatch` and `uv` (pip install hatch uv)", file=sys.stderr)
        return 2
    find_links = args.find_links or os.environ.get("PIP_FIND_LINKS", "").split() or pip_find_links()
    work = args.work or Path(tempfile.mkdtemp(prefix="soaes-release-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        files, untracked = source_files(REPO, args.tracked_only)
        src = work / "src"
        shutil.rmtree(src, ignore_errors=True)
        stage(REPO, files, src)
        print(f"sources: {len(files)} files staged in {src}"
              + (f" ({len(untracked)} untracked, not ignored: {', '.join(untracked[:5])})" if untracked else ""))
        projects = load_projects(src)
        names = {p.name for p in projects}
        unknown = sorted(set(map(canonicalize_name, args.only or [])) - names)
        if unknown:
            print(f"error: --only {' '.join(unknown)}: not one of {', '.join(sorted(names))}", file=sys.stderr)
            return 2
        selected = [p for p in projects if not args.only or p.name in set(map(canonicalize_name, args.only))]
        check_metadata(src, projects)
        dist = work / "dist"
        shutil.rmtree(dist, ignore_errors=True)
        for p in projects:  # every wheel is built: a package installed alone needs its siblings' wheels
            t0 = time.monotonic()
            build(p, src, dist, hatch)
            p.timings["build"] = time.monotonic() - t0
            print(f"built {p.name} {p.version} ({p.timings['build']:.1f}s)", flush=True)
        constraints = src / "constraints" / "dev.txt"
        for p in selected:
            if p.wheel is None:  # the build failed (reported)
                continue
            venv = work / "venvs" / p.name
            shutil.rmtree(venv, ignore_errors=True)
            install_and_probe(p, projects, dist, venv, constraints, find_links, uv, args.allow_cuda)
            print(f"installed alone: {p.name} (install {p.timings.get('install', 0):.1f}s, "
                  f"import + CLI {p.timings.get('run', 0):.1f}s): {'ok' if not p.problems else 'PROBLEMS'}",
                  flush=True)
            if not args.keep:  # seven venvs with torch at once need several GB; one at a time is enough
                shutil.rmtree(venv, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - start
    bad = [p for p in projects if p.problems]
    print()
    for p in projects:
        status = "ok" if not p.problems else f"{len(p.problems)} problem(s)"
        print(f"{p.name:14} {p.version:8} {status}")
        for problem in p.problems:
            print(f"    - {problem}")
    print(f"\nrelease check: {'FAILED' if bad else 'passed'} in {total:.0f}s"
          + (f" (work dir kept: {work})" if args.keep else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
