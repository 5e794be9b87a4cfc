"""A lock file that says which process is writing in a folder (a run folder while it trains).

The lock is an ``flock`` on ``FOLDER/.lock``, which the kernel drops when its process dies, so a
crashed trainer never leaves a folder locked for good; the file's text (pid, host, command,
since when) names the holder, for the message a second writer gets. A lock file that is still
there but not held belongs to a process that died: it is taken over, and the taker says so.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from registry import VlframeError

NAME = ".lock"


class FolderBusy(VlframeError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """The lock of ``folder`` (which must exist); :meth:`acquire` then :meth:`release`."""

    def __init__(self, folder: Path, *, what: str = "training",
                 hint: str = "or use another folder (--run-dir)") -> None:
        self.path = Path(folder) / NAME
        self.what, self.hint = what, hint
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; return a line to show about it (the dead holder it was taken from, or a
        file system that cannot lock), None otherwise.

        Raises :class:`FolderBusy` naming the process that holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                found = _read(fd)
                for _ in range(20):  # a holder that has just locked writes who it is a moment later
                    if found and found.get("pid") not in (None, "?"):
                        break
                    time.sleep(0.05)
                    found = _read(fd)
                holder = _describe(found)
                os.close(fd)
                raise FolderBusy(f"{self.path.parent} is in use: {holder} is {self.what} there; wait for it to "
                                 f"finish (or stop it), {self.hint}") from None
            except OSError as exc:  # a file system without locks (some NFS or Lustre mounts)
                os.close(fd)
                return (f"cannot lock {self.path} ({exc.strerror}): on this file system a second process "
                        f"{self.what} in {self.path.parent} would not be detected")
            # The holder before us may have removed the file between our open and our lock: then
            # we hold a lock nobody else can see, so open it again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                  "command": " ".join(sys.argv)[:500]}).encode(), 0)
        self._fd = fd
        if previous:
            return f"took over {self.path} from {_describe(previous)}, which ended without releasing it"
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        # Removed while still held (a process that opened it meanwhile sees another inode and
        # retries), and only if the file there is still ours (the folder may have been removed).
        try:
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "null")
    except ValueError:
        return {"pid": "?"}
    return data if isinstance(data, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    host = holder.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    command = f" ({holder['command']})" if holder.get("command") else ""
    return f"process {holder.get('pid', '?')}{where}, since {when}{command}"
