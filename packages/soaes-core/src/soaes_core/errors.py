"""Typed errors: every failure a user can cause raises a `SoaesError`, so CLIs print one clear line."""

from __future__ import annotations


class SoaesError(Exception):
    """Base class of every error soaes raises on purpose; `str(err)` is a complete, one-line message."""


class ConfigError(SoaesError, ValueError):
    """A configuration file or value is invalid (message names the file and the field path)."""


class ModelLoadError(SoaesError):
    """A model or tokenizer spec cannot be resolved or loaded."""


class CacheError(SoaesError):
    """The on-disk model cache is unusable and could not be rebuilt."""


class DataError(SoaesError, ValueError):
    """Input data is malformed; message names the file and line (or record) and the field."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        where = ""
        if path is not None:
            where = str(path) + (f":{line}" if line is not None else "")
            if field is not None:
                where += f": field {field!r}"
            where += ": "
        elif field is not None:
            where = f"field {field!r}: "
        super().__init__(where + message)
        self.path, self.line, self.field = path, line, field


class InvalidArgumentError(SoaesError, ValueError):
    """A function argument is outside its valid range (e.g. top_p not in (0, 1])."""


class IntegrityError(SoaesError):
    """A stored artefact does not match its recorded checksum or capture settings."""
