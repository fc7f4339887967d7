"""One run per output: an advisory lock file beside the output, held for the run's lifetime.

`fcntl.flock` locks belong to the open file, so the kernel drops them when the owner exits or is
killed: a dead run never blocks the next one. The file keeps the owner's pid for the message.
Remote (fsspec) outputs cannot be locked this way; they are left unlocked with a log line.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from typing import Iterator

from saeforge.errors import UserError
from saeforge.urls import is_local, local_path

log = logging.getLogger(__name__)


def lock_path(out: str) -> str:
    return local_path(out).rstrip("/") + ".lock"


@contextlib.contextmanager
def exclusive(out: str, what: str) -> Iterator[None]:
    """Hold `out`.lock for the block; a second process gets one line naming the running pid."""
    if not is_local(out):
        log.info("%s %s is remote: not locked against a concurrent run", what, out)
        yield
        return
    path = lock_path(out)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise UserError(f"{what} {out!r} is in use by another run (pid {owner}); wait for it to finish, or "
                            f"choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
