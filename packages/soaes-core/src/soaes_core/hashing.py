"""Checksums of files and directories (sha256), used by manifests and caches."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def sha256_tree(root: str | os.PathLike[str], exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Map each file under `root` (relative POSIX path) to its sha256, skipping names in `exclude`."""
    root = Path(root)
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in exclude:
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


TOKENIZER_FINGERPRINT_VERSION = "tokfp1"
# Backend settings that are per-call state (transformers sets them on every encode), not the tokenizer.
_VOLATILE_BACKEND_KEYS = ("truncation", "padding")
# Special tokens that decide ids or sequence boundaries; the pad token only fills batches, so it is left out
# (trainers often set pad = eos, and that must not make a dataset or a draft model look foreign).
_FINGERPRINT_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "cls_token", "mask_token",
                         "additional_special_tokens")


def tokenizer_fingerprint(tokenizer: Any, *, with_chat_template: bool = True, ids_only: bool = False) -> str:
    """The one tokenizer hash of soaes: equal fingerprints mean identical token ids for identical text.

    Covers the vocabulary with merges, normaliser, pre-tokenizer, post-processor and added tokens (the fast
    backend's JSON, or the vocabulary for slow tokenizers), the special tokens with their ids, the
    `add_bos_token`/`add_eos_token` switches and, unless `with_chat_template=False` (e.g. comparing a draft
    model with its target, where only ids matter), the chat template. Returns `"tokfp1:<sha256 hex>"`; the
    version prefix lets a reader tell a hash made by an older algorithm from a different tokenizer.

    `ids_only=True` hashes only the token <-> id mapping (vocabulary with added tokens) and the special tokens,
    as `"tokids1:<sha256 hex>"`: what a speculative draft must share with its target, which only ever sees ids
    (a copy reloaded with another normaliser or pre-tokenizer class is still a valid draft).
    """
    if ids_only:
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        ids_payload = {"vocab": vocab, "special": _special_tokens(tokenizer)}
        data = json.dumps(ids_payload, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
        return f"tokids1:{hashlib.sha256(data).hexdigest()}"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body: Any = json.loads(backend.to_str())
        for key in _VOLATILE_BACKEND_KEYS:
            body.pop(key, None)
    else:
        body = {"vocab": sorted(tokenizer.get_vocab().items())}
    specials = _special_tokens(tokenizer)
    settings = {k: getattr(tokenizer, k) for k in ("add_bos_token", "add_eos_token")
                if isinstance(getattr(tokenizer, k, None), bool)}
    payload = {"backend": body, "special": specials, "settings": settings}
    if with_chat_template:
        payload["chat_template"] = getattr(tokenizer, "chat_template", None)
    data = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return f"{TOKENIZER_FINGERPRINT_VERSION}:{hashlib.sha256(data).hexdigest()}"


def _special_tokens(tokenizer: Any) -> dict[str, Any]:
    """The fingerprinted special tokens of `tokenizer` with their ids."""
    specials: dict[str, Any] = {}
    for name in _FINGERPRINT_SPECIALS:
        value = getattr(tokenizer, "special_tokens_map", {}).get(name)
        if value is None:
            continue
        tokens = [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value)
        specials[name] = [tokens, tokenizer.convert_tokens_to_ids(tokens)]
    return specials


def tokenizer_mismatch(stored: str | None, tokenizer: Any, *, with_chat_template: bool = True,
                       ids_only: bool = False) -> str | None:
    """None when `tokenizer` has the fingerprint `stored`; otherwise one sentence saying how they differ
    (a different tokenizer, or a hash from an older soaes whose algorithm cannot be compared)."""
    current = tokenizer_fingerprint(tokenizer, with_chat_template=with_chat_template, ids_only=ids_only)
    if stored == current:
        return None
    prefix = current.split(":", 1)[0]
    if not isinstance(stored, str) or not stored.startswith(f"{prefix}:"):
        return (f"tokenizer hash {str(stored)[:16]!r}… was made by an older soaes with another hashing algorithm "
                f"and cannot be compared with {current[:19]}…; rebuild it with this version")
    return f"made with a different tokenizer (fingerprint {stored[:19]}…, this tokenizer {current[:19]}…)"


class FileHashCache:
    """sha256 of files remembered by (device, inode) with size, mtime_ns and ctime_ns, so an unchanged file is
    hashed once; kept in a small JSON file (`path`; None: in memory only). A stat change means a rehash."""

    VERSION = 1
    MAX_ENTRIES = 100_000

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, list[Any]] = {}
        self._used: set[str] = set()
        self._dirty = False
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = None  # a damaged cache is only a cache: start again
            if isinstance(data, dict) and data.get("version") == self.VERSION and isinstance(data.get("files"), dict):
                self._entries = {k: v for k, v in data["files"].items() if isinstance(v, list) and len(v) == 4}

    @staticmethod
    def _key_and_stamp(st: os.stat_result) -> tuple[str, list[int]]:
        return f"{st.st_dev}:{st.st_ino}", [st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def sha256(self, path: str | os.PathLike[str]) -> str:
        """Hex sha256 of the file at `path` (from the cache when its stat is unchanged)."""
        key, stamp = self._key_and_stamp(os.stat(path))
        self._used.add(key)
        entry = self._entries.get(key)
        if entry is not None and entry[:3] == stamp:
            return str(entry[3])
        digest = sha256_file(path)
        after = self._key_and_stamp(os.stat(path))[1]
        if after == stamp:  # not written to while hashed
            self._entries[key] = [*stamp, digest]
            self._dirty = True
        return digest

    def remember(self, path: str | os.PathLike[str], digest: str) -> None:
        """Record `digest` as the sha256 of `path` as it is now (e.g. just computed for a manifest)."""
        key, stamp = self._key_and_stamp(os.stat(path))
        self._used.add(key)
        if self._entries.get(key) != [*stamp, digest]:
            self._entries[key] = [*stamp, digest]
            self._dirty = True

    def tree_sha256(self, root: str | os.PathLike[str]) -> str:
        """One sha256 over the relative paths and contents of every file under `root`, hidden names
        (`.name`, e.g. temps and caches) left out."""
        root = Path(root)
        listing = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.startswith("."):
                    p = Path(dirpath) / name
                    listing.append([p.relative_to(root).as_posix(), self.sha256(p)])
        listing.sort()
        return sha256_bytes(json.dumps(listing, ensure_ascii=False).encode("utf-8"))

    def save(self) -> None:
        """Write the cache (atomically) when something was added and its folder exists."""
        if self.path is None or not self._dirty or not self.path.parent.is_dir():
            return
        from .atomic import atomic_write_json

        entries = self._entries
        if len(entries) > self.MAX_ENTRIES:  # keep what this process used, then the rest up to the cap
            keep = [k for k in entries if k in self._used] + [k for k in entries if k not in self._used]
            entries = {k: entries[k] for k in keep[: self.MAX_ENTRIES]}
        try:
            atomic_write_json(self.path, {"version": self.VERSION, "files": entries}, indent=0)
        except OSError:
            return  # e.g. a read-only folder: the cache is an optimisation, never a failure
        self._dirty = False
