"""The single-writer lock of a store directory: ``STORE/.zooscope.lock`` holding the writer's pid, host and start.

The lock file appears atomically with its full content (written to a private temporary file, then hard-linked
into place, which fails if a lock exists), so a reader of the lock never sees a half-written one. A lock whose
holder is a dead process on this host is stale and is taken over with a warning; takeovers are serialised by an
``fcntl.flock`` on a side file so that two contenders cannot both win. Readers of the store need no lock.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import uuid
import warnings
from pathlib import Path

LOCK_NAME = ".zooscope.lock"


class StoreLockedError(RuntimeError):
    """Another live writer holds the store's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WriterLock:
    """An acquired writer lock on the directory ``root``; ``release()`` removes it if it is still ours."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.path = Path(root) / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.info = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "token": self.token}
        self._acquire()

    def _write_tmp(self) -> Path:
        tmp = self.path.with_name(f"{LOCK_NAME}.{self.token}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.info, fh)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def _acquire(self) -> None:
        tmp = self._write_tmp()
        try:
            try:
                os.link(tmp, self.path)
                return
            except FileExistsError:
                pass
            with open(self.path.with_name(LOCK_NAME + ".takeover"), "w") as guard:
                fcntl.flock(guard, fcntl.LOCK_EX)
                holder = read_lock(self.path)
                if holder is None:  # released meanwhile
                    try:
                        os.link(tmp, self.path)
                        return
                    except FileExistsError:  # and taken by a newcomer that did not need the guard
                        holder = read_lock(self.path) or {}
                if not holder or not _is_stale(holder):
                    raise StoreLockedError(
                        f"store {self.path.parent} is locked by another writer: pid {holder.get('pid')} on "
                        f"{holder.get('host')} since {holder.get('started')} ({self.path}). Wait for it to "
                        f"finish; if no zooscope writer is running there, delete the lock file.")
                warnings.warn(f"taking over the stale lock of {self.path.parent}: pid {holder.get('pid')} on "
                              f"{holder.get('host')} (started {holder.get('started')}) is no longer running",
                              RuntimeWarning, stacklevel=4)
                os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock file if it still holds this writer's token."""
        holder = read_lock(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)


def read_lock(path: str | os.PathLike) -> dict | None:
    """The holder recorded in the lock file ``path`` (None when there is none); unparsable content raises."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreLockedError(f"unreadable lock file {path}; delete it if no zooscope writer is running") from exc


def _is_stale(holder: dict) -> bool:
    """True when the holder ran on this host and its process is gone (another host's lock is never stale)."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)
