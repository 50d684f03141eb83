"""Readers: raw files (txt/md, jsonl/json, html, pdf, docx) → `Document(id, source, text, meta)`.

Text files are decoded with BOM handling, strict UTF-8, then charset-normalizer detection (GB2312/GBK
guesses are decoded as their superset GB18030). Every failure is a `DataError` naming the file (and line),
so the pipeline can put it in its rejects file.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from soaes_core import iter_jsonl
from soaes_core.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".json", ".html", ".htm", ".pdf", ".docx")
_GB_FAMILY = {"gb2312", "gbk", "gb18030", "hz", "cp936"}
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


@dataclass
class Document:
    """One document: content-derived `id`, the `source` it came from, its `text` and free-form `meta`."""

    id: str
    source: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "text": self.text, "meta": self.meta}


@dataclass(frozen=True)
class FieldMap:
    """Which JSON fields hold a record's text, id and metadata (`meta_fields` empty: all other fields)."""

    text: str = "text"
    id: str | None = None
    meta_fields: tuple[str, ...] = ()


def content_id(text: str) -> str:
    """Stable id from content: first 16 hex digits of sha256(UTF-8 text)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def decode_bytes(data: bytes, path: str = "<bytes>") -> tuple[str, str]:
    """Decode text bytes; returns (text, encoding). Raises `DataError` for empty or undecodable input."""
    if not data.strip():
        raise DataError("empty file", path=path)
    for bom, enc in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(enc).lstrip("\ufeff"), enc
            except UnicodeDecodeError as err:
                raise DataError(f"undecodable: has a {enc} byte-order mark but {err.reason}", path=path) from None
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None or best.encoding is None:
        raise DataError("undecodable: not UTF-8 and no text encoding detected (binary file?)", path=path)
    enc = best.encoding.lower().replace("-", "").replace("_", "")
    if enc in _GB_FAMILY or enc.startswith("gb"):
        enc = "gb18030"
    else:
        enc = best.encoding
    try:
        text = data.decode(enc)
    except (UnicodeDecodeError, LookupError) as err:
        raise DataError(f"undecodable as detected {enc}: {err}", path=path) from None
    bad = sum(1 for ch in text if ch == "\x00" or (ord(ch) < 32 and ch not in "\t\n\r\f"))
    if bad > 0.01 * len(text):
        raise DataError(f"undecodable: decoding as {enc} gives control characters (binary file?)", path=path)
    return text, enc


def read_text_file(path: Path) -> Document:
    text, enc = decode_bytes(path.read_bytes(), str(path))
    return _doc(path, text, {"format": path.suffix.lstrip(".") or "txt", "encoding": enc})


def read_html(path: Path) -> Document:
    """Main text of a web page (trafilatura; boilerplate such as navigation and footers removed)."""
    import trafilatura

    html, enc = decode_bytes(path.read_bytes(), str(path))
    text = trafilatura.extract(html, include_comments=False, include_tables=True, favor_precision=False)
    title = None
    meta = trafilatura.extract_metadata(html)
    if meta is not None:
        title = meta.title
    if not text or not text.strip():
        raise DataError("no main text found in HTML", path=str(path))
    return _doc(path, text, {"format": "html", "encoding": enc, "title": title})


def read_pdf(path: Path) -> Document:
    """Text of every page (pypdf), pages separated by a blank line."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    if path.stat().st_size == 0:
        raise DataError("empty file", path=str(path))
    try:
        reader = PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError, OSError, AssertionError) as err:
        raise DataError(f"corrupt or unreadable PDF: {type(err).__name__}: {err}", path=str(path)) from None
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise DataError("PDF has no extractable text (scanned images need OCR)", path=str(path))
    return _doc(path, text, {"format": "pdf", "pages": len(pages)})


def read_docx(path: Path) -> Document:
    """Paragraphs and table cells of a Word document (python-docx), in document order."""
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    if path.stat().st_size == 0:
        raise DataError("empty file", path=str(path))
    try:
        document = docx.Document(io.BytesIO(path.read_bytes()))
    except (PackageNotFoundError, ValueError, KeyError, OSError) as err:
        raise DataError(f"corrupt or unreadable DOCX: {type(err).__name__}: {err}", path=str(path)) from None
    except Exception as err:  # zipfile.BadZipFile, lxml errors
        raise DataError(f"corrupt or unreadable DOCX: {type(err).__name__}: {err}", path=str(path)) from None
    parts = [p.text for p in document.paragraphs if p.text.strip()]
    for table in document.tables:
        for row in table.rows:
            cells = [c.text.strip() for c in row.cells]
            if any(cells):
                parts.append("\t".join(cells))
    text = "\n".join(parts)
    if not text.strip():
        raise DataError("DOCX has no text", path=str(path))
    return _doc(path, text, {"format": "docx"})


def _doc(path: Path, text: str, meta: dict[str, Any]) -> Document:
    return Document(id=content_id(text), source=str(path), text=text, meta=meta)


def read_document(path: str | os.PathLike[str]) -> Document:
    """Read one single-document file (txt/md/html/pdf/docx) by its suffix."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", path=str(path))
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return read_text_file(path)
    if suffix in (".html", ".htm"):
        return read_html(path)
    if suffix == ".pdf":
        return read_pdf(path)
    if suffix == ".docx":
        return read_docx(path)
    raise DataError(f"unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)}", path=str(path))


def _record_doc(obj: Any, path: Path, line: int | None, fields: FieldMap) -> Document:
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=str(path), line=line)
    text = obj.get(fields.text)
    if not isinstance(text, str):
        why = "missing field" if text is None else f"expected a string, got {type(text).__name__}"
        raise DataError(why, path=str(path), line=line, field=fields.text)
    if not text.strip():
        raise DataError("empty text", path=str(path), line=line, field=fields.text)
    meta_keys = fields.meta_fields or tuple(k for k in obj if k not in (fields.text, fields.id))
    meta = {k: obj[k] for k in meta_keys if k in obj}
    meta["line"] = line
    doc_id = str(obj[fields.id]) if fields.id and obj.get(fields.id) is not None else content_id(text)
    return Document(id=doc_id, source=str(path), text=text, meta=meta)


Item = Document | DataError


def iter_records(path: str | os.PathLike[str], fields: FieldMap = FieldMap(),
                 on_error: Literal["raise", "skip"] = "raise") -> Iterator[Item]:
    """Documents from a JSONL file (one per line) or a JSON file (a list of objects, or `{"data": [...]}`).

    With `on_error="skip"`, bad lines/records are yielded as `DataError`s (for the rejects file) rather than
    raised.
    """
    path = Path(path)

    def fail(err: DataError) -> Iterator[Item]:
        if on_error == "raise":
            raise err
        yield err

    if path.suffix.lower() == ".jsonl":
        raw: list[Any] = []
        for rec in iter_jsonl(path, on_error=on_error, rejects=raw if on_error == "skip" else None):
            try:
                yield _record_doc(rec.data, path, rec.line, fields)
            except DataError as err:
                yield from fail(err)
        for r in raw:
            yield DataError(r.reason, path=r.path, line=r.line)
        return
    text, _ = decode_bytes(path.read_bytes(), str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        yield from fail(DataError(f"invalid JSON: {err}", path=str(path), line=err.lineno))
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        yield from fail(DataError("expected a list of objects (or {\"data\": [...]})", path=str(path)))
        return
    for k, obj in enumerate(data):
        try:
            doc = _record_doc(obj, path, None, fields)
            doc.meta["index"] = k
            yield doc
        except DataError as err:
            yield from fail(DataError(f"record {k}: {err}", path=str(path)))


def iter_documents(paths: str | os.PathLike[str] | list[str | os.PathLike[str]], fields: FieldMap = FieldMap(),
                   on_error: Literal["raise", "skip"] = "raise") -> Iterator[Item]:
    """Every document under `paths` (files or directories, walked in sorted order, hidden files skipped).

    Yields `Document`s, and with `on_error="skip"` a `DataError` for each unreadable file or record.
    """
    items = paths if isinstance(paths, list) else [paths]
    for p in items:
        p = Path(p)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(p).parts))
        elif p.exists():
            files = [p]
        else:
            raise DataError("no such file or directory", path=str(p))
        for f in files:
            suffix = f.suffix.lower()
            try:
                if suffix in (".jsonl", ".json"):
                    yield from iter_records(f, fields, on_error)
                elif suffix in SUFFIXES:
                    yield read_document(f)
                elif p.is_dir():
                    continue  # stray files in a directory (README, images) are not documents
                else:
                    yield read_document(f)
            except DataError as err:
                if on_error == "raise":
                    raise
                yield err
