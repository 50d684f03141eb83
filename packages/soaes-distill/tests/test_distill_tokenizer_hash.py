"""One tokenizer hash across soaes (issue 17): a teacher-logit store and a soaes-data packed dataset made with
the same tokenizer carry the same fingerprint, so each can be checked against the other."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from soaes_core import tokenizer_fingerprint
from soaes_core.errors import IntegrityError
from soaes_data.packed_io import read_packed_meta
from soaes_data.tokenize_pack import pack_sft_file
from soaes_distill import token_data
from soaes_distill.dump import DumpConfig, run_dump
from soaes_distill.store import TeacherLogitStore


def test_store_and_packed_dataset_share_the_fingerprint(tmp_path: Path, token_dataset: Path, tiny_qwen2: Any,
                                                        embedded_tokenizer: Any) -> None:
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "国有资产"},
                                             {"role": "assistant", "content": "由国资委监管。"}]},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    packed = read_packed_meta(pack_sft_file(chat, tmp_path / "packed", embedded_tokenizer, 256))
    run_dump(DumpConfig(dataset=str(token_dataset), output_dir=str(tmp_path / "store"), top_k=4,
                        temperatures=[1.0], examples_per_shard=6), model=tiny_qwen2, tokenizer=embedded_tokenizer)
    store = TeacherLogitStore(tmp_path / "store")
    assert store.settings.tokenizer_sha256 == packed["tokenizer_sha256"] == tokenizer_fingerprint(embedded_tokenizer,
                                                                                              ids_only=True)
    store.require(tokenizer_sha256=packed["tokenizer_sha256"])  # the packed data's hash checks the store
    with pytest.raises(IntegrityError, match="tokenizer_sha256: store has 'tokids1:"):
        store.require(tokenizer_sha256="0" * 64)  # a hash of the old distill-only algorithm is named, not accepted
    assert not hasattr(token_data, "tokenizer_sha256")  # no second implementation
