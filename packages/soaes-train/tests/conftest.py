"""Shared helpers for soaes-train tests: a private copy of the tiny Qwen2 and small datasets."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SOAES_PROGRESS", "0")


@pytest.fixture()
def tiny_model_copy(tiny_qwen2_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny Qwen2 directory (safe to train from)."""
    dst = tmp_path / "tiny-base"
    shutil.copytree(tiny_qwen2_dir, dst)
    return dst


def write_chat_jsonl(path: Path, n: int = 24, seed: int = 0) -> Path:
    """`n` short synthetic-but-real chat records (varied lengths) in JSONL."""
    import random

    rng = random.Random(seed)
    words = "state asset enterprise register capital report audit policy law fund board share".split()
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(2, 8)))
            a = " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))
            fh.write(json.dumps({"id": i, "messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}]}) + "\n")
    return path


def write_text_jsonl(path: Path, n: int = 20, seed: int = 0) -> Path:
    """`n` documents of varied length in JSONL (`text`)."""
    import random

    rng = random.Random(seed)
    words = "the state owned enterprise shall register changes of capital within thirty days".split()
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": i, "text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))})
                     + "\n")
    return path


@pytest.fixture()
def chat_jsonl(tmp_path: Path) -> Path:
    return write_chat_jsonl(tmp_path / "chat.jsonl")


@pytest.fixture()
def text_jsonl(tmp_path: Path) -> Path:
    return write_text_jsonl(tmp_path / "docs.jsonl")
