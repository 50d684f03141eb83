"""Readers: every format gives the known text; encodings detected; bad inputs are clear errors."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import make_samples
import pytest

from soaes_core.errors import DataError
from soaes_data.readers import FieldMap, content_id, decode_bytes, iter_documents, iter_records, read_document
from soaes_data.samples import sample_path


def test_gb18030_html_docx_pdf_known_strings() -> None:
    gb = read_document(sample_path("corpus/notice_gb18030.txt"))
    assert gb.meta["encoding"] == "gb18030" and make_samples.KNOWN_GB18030 in gb.text
    html = read_document(sample_path("corpus/news.html"))
    assert make_samples.KNOWN_HTML in html.text
    assert "网站地图" not in html.text and "新闻中心" not in html.text  # boilerplate removed
    docx = read_document(sample_path("corpus/guideline.docx"))
    assert make_samples.KNOWN_DOCX in docx.text and "产权转让\t国资委审批" in docx.text
    pdf = read_document(sample_path("corpus/briefing.pdf"))
    assert make_samples.KNOWN_PDF in pdf.text and pdf.meta["pages"] == 3
    for doc in (gb, html, docx, pdf):
        assert doc.id == content_id(doc.text) and len(doc.id) == 16


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le-bom", "utf-16-be-bom", "gb18030",
                                      "gbk"])
def test_decode_encodings(encoding: str) -> None:
    text = "国有资产监督管理委员会负责监管企业国有资产，推动国有企业改革和重组。" * 3
    if encoding == "utf-16-le-bom":
        data = codecs.BOM_UTF16_LE + text.encode("utf-16-le")
    elif encoding == "utf-16-be-bom":
        data = codecs.BOM_UTF16_BE + text.encode("utf-16-be")
    else:
        data = text.encode(encoding)
    decoded, _ = decode_bytes(data)
    assert decoded == text


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b"  \n ")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "corrupt.pdf").write_bytes(b"%PDF-1.4\n garbage garbage \n%%EOF")
    (tmp_path / "corrupt.docx").write_bytes(b"PK\x03\x04 not a zip")
    (tmp_path / "x.xyz").write_text("hi")
    for name, message in [("empty.txt", "empty file"), ("blank.txt", "empty file"), ("binary.txt", "undecodable"),
                          ("corrupt.pdf", "PDF"), ("corrupt.docx", "corrupt or unreadable DOCX"),
                          ("x.xyz", "unsupported file type"), ("missing.txt", "no such file")]:
        with pytest.raises(DataError, match=message) as err:
            read_document(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)


def test_jsonl_field_mapping_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join([json.dumps({"body": "正文一", "doc_id": 7, "src": "a"}, ensure_ascii=False),
                            "{broken",
                            json.dumps({"title": "no body"}),
                            json.dumps({"body": "   "}),
                            json.dumps({"body": "正文二", "src": "b"}, ensure_ascii=False)]) + "\n", encoding="utf-8")
    fields = FieldMap(text="body", id="doc_id", meta_fields=("src",))
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        list(iter_records(p, fields))
    items = list(iter_records(p, fields, on_error="skip"))
    docs = [i for i in items if not isinstance(i, DataError)]
    errors = [i for i in items if isinstance(i, DataError)]
    assert [d.text for d in docs] == ["正文一", "正文二"] and docs[0].id == "7" and docs[1].id == content_id("正文二")
    assert docs[0].meta == {"src": "a", "line": 1}
    assert sorted((e.line, e.field) for e in errors) == [(2, None), (3, "body"), (4, "body")]


def test_json_file_and_directory_walk(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"data": [{"text": "甲文档"}, {"text": 3}]}, ensure_ascii=False),
                                     encoding="utf-8")
    (tmp_path / "b.md").write_text("# 乙\n\n乙文档内容", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("skip me")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    items = list(iter_documents(tmp_path, on_error="skip"))
    texts = [i.text for i in items if not isinstance(i, DataError)]
    assert texts == ["甲文档", "# 乙\n\n乙文档内容"]
    errs = [i for i in items if isinstance(i, DataError)]
    assert len(errs) == 1 and "record 1" in str(errs[0])
    with pytest.raises(DataError, match="no such file"):
        list(iter_documents(tmp_path / "nope"))
