"""Progress bars for long passes. Library code never prints; this is the one display it has.

Bars go to stderr through tqdm. By default they show only when stderr is a terminal; the
command line turns them off entirely with ``--quiet``. Where stderr is not a terminal (a log
file, a batch job) a long pass is logged instead: an INFO line at most every
``LOG_EVERY_S`` seconds with how far it got, and one when it ends, for passes that took that
long (``-v`` shows them).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
_enabled: bool | None = None  # None: only on a terminal
LOG_EVERY_S = 30.0
logger = logging.getLogger(__name__)


class _Logged:
    """A bar nobody sees: what it counts goes to the log, at most every ``LOG_EVERY_S``."""

    def __init__(self, iterable, total: int | None, desc: str, unit: str):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc or "work", unit
        self.n = 0
        self.postfix = ""
        self.closed = False
        self.start = self.last = time.monotonic()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()  # as tqdm does at the end of its iterable

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= LOG_EVERY_S:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            logger.info(
                "%s: %d%s %s(s) after %.0f s%s",
                self.desc,
                self.n,
                of,
                self.unit,
                now - self.start,
                self.postfix,
            )

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = "".join(f", {k} {v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        took = time.monotonic() - self.start
        if took >= LOG_EVERY_S:
            logger.info(
                "%s: %d %s(s) in %.0f s%s", self.desc, self.n, self.unit, took, self.postfix
            )


def set_enabled(enabled: bool | None) -> None:
    """True forces bars on, False off, None shows them only when stderr is a terminal."""
    global _enabled
    _enabled = enabled


def bar(
    iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "batch"
) -> tqdm | _Logged:
    disable = None if _enabled is None else not _enabled
    if disable is None and not sys.stderr.isatty():
        return _Logged(iterable if iterable is not None else (), total, desc, unit)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=False,
        disable=disable,
        file=sys.stderr,
    )
