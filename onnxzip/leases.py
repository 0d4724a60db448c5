"""Input files a run reads lazily, held against change for as long as the run lasts.

A model's external data file is memory-mapped, not read: a tensor's bytes are read from the
file when they are used. If another process truncated that file during a run, the next read
of a mapped page would kill the process with SIGBUS (no message, no cleanup). On Linux the
command line therefore takes a read *lease* (``fcntl(F_SETLEASE, F_RDLCK)``) on every external
data file it loads: a process that then opens the file for writing or truncates it is held by
the kernel (its non-blocking open fails; a blocking one waits, at most
``/proc/sys/fs/lease-break-time`` seconds), and this process gets SIGIO, on which the run
stops: ``InputChanged`` unwinds it like SIGTERM (temporary folders removed, the target left as
it was) and the command exits 2 with one line naming the file; the held writer proceeds once
the process is gone. The open descriptor also keeps the file's data alive if it is deleted.

Where leases cannot be taken (another OS, a file system without them such as NFS, a file owned
by another user, a file already open for writing) the file is read as before, unprotected.
Leases are taken only while ``holding`` is active (the command line), never for a library
caller: SIGIO's default action would end the caller's process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from onnxzip.errors import EXIT_INPUT

logger = logging.getLogger(__name__)

_F_SETLEASE = 1024  # Linux fcntl commands (not exported by Python's fcntl module everywhere)
_F_SETSIG = 10

_held: dict[tuple[int, int], tuple[int, Path]] = {}  # (device, inode) -> (descriptor, path)
_active = False


class InputChanged(BaseException):
    """An input file was opened for writing by another process during the run (SIGIO of a
    lease). Not an ``Exception``: nothing may catch it by accident; exit code 2."""

    exit_code = EXIT_INPUT


def _on_sigio(signum, frame):
    names = ", ".join(str(path) for path in held()) or "an input file"
    raise InputChanged(
        f"{names}: opened for writing by another process during the run; stopped before "
        "reading changed data"
    )


@contextlib.contextmanager
def holding():
    """Files passed to ``hold`` within the block are leased; released at its end."""
    global _active
    if not sys.platform.startswith("linux") or _active:
        yield
        return
    try:
        previous = signal.signal(signal.SIGIO, _on_sigio)
    except ValueError:  # not the main thread: no signal handler, so no leases
        yield
        return
    _active = True
    try:
        yield
    finally:
        _active = False
        release()
        signal.signal(signal.SIGIO, previous)


def hold(path: str | os.PathLike) -> bool:
    """Takes a read lease on ``path`` (see the module docstring); True when it is held."""
    if not _active:
        return False
    import fcntl

    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False  # reported where it is read
    try:
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino)
        if key in _held:
            os.close(fd)
            return True
        fcntl.fcntl(fd, _F_SETSIG, 0)  # SIGIO
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:  # EACCES (not the owner), EAGAIN (open for writing), EINVAL (NFS)
        os.close(fd)
        logger.debug("no lease on %s: %s", path, exc.strerror or exc)
        return False
    _held[key] = (fd, path)
    return True


def release() -> None:
    """Gives every lease back (the held writers proceed)."""
    while _held:
        _key, (fd, _path) = _held.popitem()
        with contextlib.suppress(OSError):
            os.close(fd)


def held() -> list[Path]:
    return [path for _fd, path in _held.values()]
