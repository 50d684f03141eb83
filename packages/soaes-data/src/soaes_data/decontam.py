"""Decontamination: find training texts that share long character n-grams with evaluation sets (CMMLU /
C-Eval folders of subject CSVs, fetched or given; JSONL/JSON/CSV/TXT files such as the domain test split) and
report every overlap, per benchmark and subject."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from soaes_core.errors import DataError

from .dedup import normalise_for_dedup

# `soaes-eval fetch` unpacks each benchmark into $SOAES_CACHE/benchmarks/<name>/ and writes this marker last
# (soaes_eval.fetch.MARKER); soaes-data does not depend on soaes-eval, so the two names are kept in step by a test.
FETCHED_BENCHMARKS = ("cmmlu", "ceval")
FETCH_MARKER = "soaes_fetch.json"
CSV_SPLITS = ("test", "val", "dev")
# text columns of the public releases (the row index, id and answer letter are not content)
CSV_TEXT_COLUMNS = ("Question", "question", "A", "B", "C", "D", "explanation")


@dataclass
class DecontamConfig:
    """`eval_files`: JSONL/JSON/CSV/TXT files of evaluation items; `eval_dirs`: folders of subject CSVs (CMMLU
    `test|dev/<subject>.csv`, C-Eval `dev|val|test/<subject>_<split>.csv`, or a parent with `cmmlu/`, `ceval/`);
    `use_fetched`: also the benchmarks `soaes-eval fetch` put in the cache, when present; `ngram`: overlap length
    in normalised characters (13 by default, as in GPT-3's decontamination, counted in characters for Chinese)."""

    eval_files: list[str] = field(default_factory=list, metadata={
        "help": "Evaluation files (JSONL/JSON/CSV/TXT), comma-separated (CMMLU, C-Eval, a test split)."})
    eval_dirs: list[str] = field(default_factory=list, metadata={
        "help": "Folders of subject CSVs (CMMLU / C-Eval release layout, or a parent of cmmlu/ and ceval/), "
                "comma-separated."})
    use_fetched: bool = field(default=True, metadata={
        "help": "Also the CMMLU / C-Eval releases `soaes-eval fetch` put in the cache, when present."})
    ngram: int = field(default=13, metadata={"help": "Overlap length in normalised characters."})
    min_overlaps: int = field(default=1, metadata={"help": "Shared n-grams that make a record contaminated."})

    def __post_init__(self) -> None:
        if self.ngram < 5 or self.min_overlaps < 1:
            raise ValueError("need ngram >= 5 and min_overlaps >= 1")

    def benchmark_dirs(self) -> dict[str, Path]:
        """Benchmark name → folder of subject CSVs: the given `eval_dirs`, then the fetched ones (if `use_fetched`)."""
        dirs: dict[str, Path] = {}
        for d in self.eval_dirs:
            for name, path in benchmark_dirs_in(d).items():
                dirs.setdefault(_unique_name(name, path, dirs), path)
        if self.use_fetched:
            for name, path in fetched_benchmark_dirs().items():
                if path not in dirs.values():
                    dirs.setdefault(_unique_name(name, path, dirs), path)
        return dirs

    def has_sources(self) -> bool:
        """True when there is anything to decontaminate against (the stage is on by default only then)."""
        return bool(self.eval_files) or bool(self.benchmark_dirs())


def _unique_name(name: str, path: Path, taken: Mapping[str, Path]) -> str:
    return name if name not in taken or taken[name] == path else f"{name}:{path}"


def fetched_benchmark_dirs(root: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """CMMLU / C-Eval copies that `soaes-eval fetch` completed under `root` (default `$SOAES_CACHE/benchmarks`)."""
    if root is None:
        from soaes_core import cache_root

        root = cache_root() / "benchmarks"
    base = Path(root)
    return {name: base / name for name in FETCHED_BENCHMARKS if (base / name / FETCH_MARKER).is_file()}


def _subject_csvs(folder: Path) -> list[tuple[str, str, Path]]:
    """(split, subject, path) of every `<split>/<subject>[_<split>].csv` directly in `folder`, sorted."""
    found = []
    for split in CSV_SPLITS:
        for path in sorted((folder / split).glob("*.csv")) if (folder / split).is_dir() else []:
            subject = path.stem.removesuffix(f"_{split}")
            found.append((split, subject, path))
    return found


def _layout_name(folder: Path) -> str:
    """'ceval' when files are named `<subject>_<split>.csv`, else 'cmmlu' (`<split>/<subject>.csv`)."""
    csvs = _subject_csvs(folder)
    return "ceval" if csvs and all(p.stem.endswith(f"_{split}") for split, _, p in csvs) else "cmmlu"


def benchmark_dirs_in(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Benchmark folders in `folder`: itself when it holds `<split>/*.csv`, else its subfolders that do
    (`cmmlu/`, `ceval/`, ...), named by subfolder. A folder with neither raises `DataError`."""
    base = Path(folder)
    if not base.is_dir():
        raise DataError("benchmark folder not found", path=str(base))
    if _subject_csvs(base):
        return {_layout_name(base): base}
    subs = {sub.name: sub for sub in sorted(base.iterdir()) if sub.is_dir() and _subject_csvs(sub)}
    if not subs:
        raise DataError("no subject CSVs (expected <split>/<subject>.csv or <split>/<subject>_<split>.csv with "
                        f"split in {', '.join(CSV_SPLITS)}, or cmmlu/ and ceval/ subfolders)", path=str(base))
    return subs


@dataclass(frozen=True)
class EvalItem:
    """One benchmark question: where it is (benchmark, subject, file, 0-based row) and its text fields."""

    benchmark: str
    subject: str
    file: str
    row: int
    fields: tuple[str, ...]


def read_benchmark_dir(folder: str | os.PathLike[str], benchmark: str | None = None) -> list[EvalItem]:
    """Every question of a folder of subject CSVs (all splits), with the text columns as separate fields."""
    import csv

    base = Path(folder)
    csvs = _subject_csvs(base)
    if not csvs:
        raise DataError("no subject CSVs in benchmark folder", path=str(base))
    name = benchmark or _layout_name(base)
    items = []
    for _split, subject, path in csvs:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None) or []
            cols = [i for i, h in enumerate(header) if h in CSV_TEXT_COLUMNS]
            if not cols:
                raise DataError(f"no question/choice columns; header is {header}", path=str(path), line=1)
            for row_no, cells in enumerate(reader):
                texts = tuple(cells[i] for i in cols if i < len(cells) and cells[i].strip())
                if texts:
                    items.append(EvalItem(name, subject, str(path), row_no, texts))
    return items


@dataclass(frozen=True)
class Overlap:
    """A training item sharing `count` n-grams (`example`: one of them) with eval item `eval_item` (0-based row)
    of `eval_file`; `benchmark` / `subject` name it (for a plain eval file: the file name and '')."""

    eval_file: str
    eval_item: int
    count: int
    example: str
    benchmark: str = ""
    subject: str = ""


def strings_in(obj: Any) -> Iterator[str]:
    """Every string value inside a JSON-like object (questions, choices, message contents...)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from strings_in(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings_in(v)


def read_eval_items(path: str | os.PathLike[str]) -> list[str]:
    """Eval items as texts: one per JSONL line / JSON list element / CSV row / non-empty TXT line."""
    import csv

    p = Path(path)
    if not p.is_file():
        raise DataError("evaluation file not found", path=str(p))
    text = p.read_text(encoding="utf-8-sig")
    if p.suffix == ".jsonl":
        items = []
        for k, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    items.append(" ".join(strings_in(json.loads(line))))
                except json.JSONDecodeError as err:
                    raise DataError(f"invalid JSON: {err}", path=str(p), line=k) from None
        return items
    if p.suffix == ".json":
        data = json.loads(text)
        return [" ".join(strings_in(x)) for x in (data if isinstance(data, list) else [data])]
    if p.suffix == ".csv":
        return [" ".join(row) for row in csv.reader(text.splitlines())][1:]
    return [line for line in text.splitlines() if line.strip()]


def char_ngrams(text: str, n: int) -> set[str]:
    s = normalise_for_dedup(text)
    return {s[i:i + n] for i in range(len(s) - n + 1)}


_HASH_BASE = np.uint64(0x100000001B3)  # odd multiplier of the polynomial n-gram hash (mod 2**64)
_FILTER_BITS = 27  # pre-check bitmap of 2**27 bits: ~2 % false positives for CMMLU + C-Eval's ~3M n-grams


def ngram_hashes(codes: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash (mod 2**64) of every window of `n` code points: one vector op per position in the window."""
    m = len(codes) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    for j in range(n):
        h = h * _HASH_BASE + codes[j:j + m]  # wraps mod 2**64
    return h


def _normalised_codes(text: str) -> tuple[str, np.ndarray]:
    s = normalise_for_dedup(text)
    return s, np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)


class NgramIndex:
    """n-gram → eval item for every item of the eval files and benchmark folders; `overlaps(text)` lists the items
    a text shares n-grams with. The n-grams are kept as a sorted array of 64-bit hashes (a few bytes each, not a
    dict of strings: a worker's copy of CMMLU + C-Eval stays small and pickles fast); a hash hit counts only when
    the n-gram really occurs in the item's normalised text, so a hash collision never reports an overlap."""

    def __init__(self, files: Iterable[str | os.PathLike[str]] = (), n: int = 13,
                 dirs: Mapping[str, str | os.PathLike[str]] | Iterable[str | os.PathLike[str]] = ()) -> None:
        self.n = n
        self.refs: list[tuple[str, str, str, int]] = []  # (benchmark, subject, file, row)
        self.texts: list[str] = []  # normalised fields of each item, NUL-separated (for checking hits)
        for f in files:
            name = Path(f).name
            for k, item in enumerate(read_eval_items(f)):
                self._add((name, "", str(f), k), (item,))
        named = dirs.items() if isinstance(dirs, Mapping) else [(None, d) for d in dirs]
        for bench, folder in named:
            for it in read_benchmark_dir(folder, bench):
                self._add((it.benchmark, it.subject, it.file, it.row), it.fields)
        self.items = len(self.refs)
        self.keys, self.owner = self._build()

    def _add(self, ref: tuple[str, str, str, int], texts: Iterable[str]) -> None:
        self.refs.append(ref)
        self.texts.append("\0".join(normalise_for_dedup(t) for t in texts))

    def _build(self) -> tuple[np.ndarray, np.ndarray]:
        """All items' n-gram hashes at once: (sorted distinct hashes, the first item that has each)."""
        if not self.texts:
            return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int32)
        joined = "\0".join(self.texts)  # NUL ends each field and item: no n-gram may contain one
        codes = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
        hashes = ngram_hashes(codes.astype(np.uint64), self.n)
        nul = np.concatenate([[0], np.cumsum(codes == 0)])
        item_of = np.repeat(np.arange(len(self.texts), dtype=np.int32), [len(t) + 1 for t in self.texts])[:len(codes)]
        valid = (nul[self.n:] - nul[:-self.n]) == 0  # windows inside one field
        keys, owner = hashes[valid], item_of[:len(hashes)][valid]
        order = np.argsort(keys, kind="stable")  # items stay in order within a hash: the first one owns it
        keys, owner = keys[order], owner[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        return keys[first], owner[first]

    @classmethod
    def from_config(cls, cfg: DecontamConfig) -> NgramIndex:
        """Index of `cfg.eval_files` and `cfg.benchmark_dirs()`."""
        return cls(cfg.eval_files, cfg.ngram, cfg.benchmark_dirs())

    def __len__(self) -> int:
        """Number of distinct n-grams indexed."""
        return len(self.keys)

    def describe(self) -> dict[str, dict[str, int]]:
        """Items indexed per benchmark and subject."""
        out: dict[str, dict[str, int]] = {}
        for bench, subject, _f, _k in self.refs:
            out.setdefault(bench, {}).setdefault(subject, 0)
            out[bench][subject] += 1
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_filter"}  # rebuilt where it is used

    def _maybe_indexed(self, h: np.ndarray) -> np.ndarray:
        """Cheap pre-check (a bit per top-27-bit hash prefix, 16 MB): False means surely not indexed, so most of
        a clean text's n-grams skip the binary search in `keys`."""
        shift = np.uint64(64 - _FILTER_BITS)
        if getattr(self, "_filter", None) is None:
            prefix = self.keys >> shift
            bits = np.zeros(1 << (_FILTER_BITS - 3), dtype=np.uint8)
            np.bitwise_or.at(bits, prefix >> np.uint64(3), np.left_shift(1, prefix & np.uint64(7)).astype(np.uint8))
            self._filter = bits
        prefix = h >> shift
        return ((self._filter[prefix >> np.uint64(3)] >> (prefix & np.uint64(7)).astype(np.uint8)) & 1).astype(bool)

    def overlaps(self, text: str) -> list[Overlap]:
        """Eval items sharing n-grams with `text` (each distinct n-gram counted once), by file and row."""
        s, codes = _normalised_codes(text)
        h = ngram_hashes(codes, self.n)
        if not len(h) or not len(self.keys):
            return []
        candidates = np.flatnonzero(self._maybe_indexed(h))
        if not len(candidates):
            return []
        uniq, first = np.unique(h[candidates], return_index=True)
        start = candidates[first]
        at = np.minimum(np.searchsorted(self.keys, uniq), len(self.keys) - 1)
        hit = self.keys[at] == uniq
        hits: dict[int, list[str]] = {}
        for k, i in zip(at[hit].tolist(), start[hit].tolist(), strict=True):
            pos = int(self.owner[k])
            g = s[i:i + self.n]
            if g in self.texts[pos]:
                hits.setdefault(pos, []).append(g)
        found = []
        for pos, gs in hits.items():
            bench, subject, f, k = self.refs[pos]
            found.append(Overlap(f, k, len(gs), min(gs), bench, subject))
        return sorted(found, key=lambda o: (o.eval_file, o.eval_item))


def is_contaminated(found: Iterable[Overlap], min_overlaps: int = 1) -> bool:
    """At least `min_overlaps` shared n-grams in all."""
    return sum(o.count for o in found) >= min_overlaps


def reject_reason(found: list[Overlap]) -> str:
    """`contaminated:<benchmark>/<subject>` of the item sharing most n-grams (`contaminated:<file name>` for a file)."""
    if not found:
        return "contaminated"
    top = max(found, key=lambda o: o.count)
    return f"contaminated:{top.benchmark}/{top.subject}" if top.subject else f"contaminated:{top.benchmark}"


class OverlapReport:
    """Overlaps per benchmark and subject: contaminated records, distinct eval items hit, shared n-grams and the
    first `max_examples` examples. `to_dict()` is JSON; per-task reports combine with `merge`."""

    def __init__(self, indexed: Mapping[str, Mapping[str, int]] | None = None, max_examples: int = 3) -> None:
        self.max_examples = max_examples
        self.indexed = {b: dict(s) for b, s in (indexed or {}).items()}
        self.checked = 0
        self.contaminated = 0
        self.subjects: dict[tuple[str, str], dict[str, Any]] = {}

    def _entry(self, bench: str, subject: str) -> dict[str, Any]:
        return self.subjects.setdefault((bench, subject), {"records": 0, "eval_items": set(), "ngrams": 0,
                                                           "examples": []})

    def add(self, record_id: Any, found: Iterable[Overlap], contaminated: bool | None = None) -> None:
        """Account one checked record; `contaminated` (was it rejected) defaults to 'has any overlap'."""
        found = list(found)
        self.checked += 1
        if contaminated if contaminated is not None else bool(found):
            self.contaminated += 1
        for bench, subject in dict.fromkeys((o.benchmark, o.subject) for o in found):
            self._entry(bench, subject)["records"] += 1
        for o in found:
            e = self._entry(o.benchmark, o.subject)
            e["eval_items"].add(f"{o.eval_file}#{o.eval_item}")
            e["ngrams"] += o.count
            if len(e["examples"]) < self.max_examples:
                e["examples"].append({"record": record_id, "eval_file": o.eval_file, "eval_item": o.eval_item,
                                      "example": o.example})

    @staticmethod
    def rows(record_id: Any, found: Iterable[Overlap]) -> list[dict[str, Any]]:
        """One JSON row per overlap, for an overlaps.jsonl next to the rejects."""
        return [{"id": record_id, "benchmark": o.benchmark, "subject": o.subject, "eval_file": o.eval_file,
                 "eval_item": o.eval_item, "ngrams": o.count, "example": o.example} for o in found]

    def merge(self, other: OverlapReport) -> OverlapReport:
        """Add `other`'s counts (another task's report, over other records) into this one."""
        self.checked += other.checked
        self.contaminated += other.contaminated
        for bench, subjects in other.indexed.items():
            self.indexed.setdefault(bench, dict(subjects))
        for key, o in sorted(other.subjects.items()):
            e = self._entry(*key)
            e["records"] += o["records"]
            e["eval_items"] |= o["eval_items"]
            e["ngrams"] += o["ngrams"]
            e["examples"] = (e["examples"] + o["examples"])[:self.max_examples]
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON: totals, then per benchmark (items indexed, records hit) and per subject (counts, examples)."""
        benchmarks: dict[str, Any] = {b: {"items_indexed": sum(s.values()), "records": 0, "subjects": {}}
                                      for b, s in sorted(self.indexed.items())}
        for (bench, subject), e in sorted(self.subjects.items()):
            b = benchmarks.setdefault(bench, {"items_indexed": 0, "records": 0, "subjects": {}})
            b["records"] += e["records"]
            b["subjects"][subject] = {"records": e["records"], "eval_items": len(e["eval_items"]),
                                      "eval_item_ids": sorted(e["eval_items"]), "ngrams": e["ngrams"],
                                      "examples": e["examples"]}
        return {"records_checked": self.checked, "records_contaminated": self.contaminated,
                "max_examples": self.max_examples, "benchmarks": benchmarks}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OverlapReport:
        """Inverse of `to_dict` (a report another task wrote), for `merge`."""
        rep = cls(max_examples=int(data.get("max_examples", 3)))
        rep.checked, rep.contaminated = int(data["records_checked"]), int(data["records_contaminated"])
        for bench, b in data["benchmarks"].items():
            if b.get("items_indexed"):
                rep.indexed[bench] = {"": int(b["items_indexed"])}
            for subject, e in b["subjects"].items():
                rep.subjects[(bench, subject)] = {"records": int(e["records"]), "eval_items": set(e["eval_item_ids"]),
                                                  "ngrams": int(e["ngrams"]), "examples": list(e["examples"])}
        return rep


def decontaminate_records(records: Iterable[Mapping[str, Any]], index: NgramIndex, min_overlaps: int = 1,
                          summary: OverlapReport | None = None,
                          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Split records (documents with `text` or chats with `messages`) into (kept, rejects, overlap rows); each
    record is also accounted in `summary` (per benchmark and subject) when one is given."""
    from .records import record_text

    kept: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    report: list[dict[str, Any]] = []
    for k, rec in enumerate(records):
        found = index.overlaps(record_text(rec))
        bad = bool(found) and is_contaminated(found, min_overlaps)
        if summary is not None:
            summary.add(rec.get("id", k), found, contaminated=bad)
        if bad:
            rejects.append({**rec, "reason": reject_reason(found)})
            report += [{"record": rec.get("id", k), "benchmark": o.benchmark, "subject": o.subject,
                        "eval_file": o.eval_file, "eval_item": o.eval_item, "ngrams": o.count, "example": o.example}
                       for o in found]
        else:
            kept.append(dict(rec))
    return kept, rejects, report
