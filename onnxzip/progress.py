"""Progress bars for long passes. Library code never prints; this is the one display it has.

Bars go to stderr through tqdm. By default they show only when stderr is a terminal; the
command line turns them off entirely with ``--quiet``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
_enabled: bool | None = None  # None: only on a terminal


def set_enabled(enabled: bool | None) -> None:
    """True forces bars on, False off, None shows them only when stderr is a terminal."""
    global _enabled
    _enabled = enabled


def bar(
    iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "batch"
) -> tqdm:
    disable = None if _enabled is None else not _enabled
    if disable is None and not sys.stderr.isatty():
        disable = True
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=False,
        disable=disable,
        file=sys.stderr,
    )
