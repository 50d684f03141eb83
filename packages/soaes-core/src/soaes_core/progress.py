"""Progress bars for long work: tqdm on stderr, off when `SOAES_PROGRESS=0` or when not a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    """True unless `SOAES_PROGRESS=0`; `SOAES_PROGRESS=1` forces bars on even without a terminal."""
    flag = os.environ.get("SOAES_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "no", "")
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str | None = None, total: int | None = None,
             unit: str = "it", disable: bool | None = None) -> Iterator[T]:
    """Wrap `iterable` in a tqdm bar (or pass it through when bars are disabled)."""
    if disable is None:
        disable = not progress_enabled()
    return iter(tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True))


def progress_bar(total: int | None = None, desc: str | None = None, unit: str = "it",
                 disable: bool | None = None) -> tqdm:
    """A manual tqdm bar (`.update(n)`, `.close()`), honouring the same switch as `progress`."""
    if disable is None:
        disable = not progress_enabled()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)
