"""One run at a time in a run folder: a POSIX lock on <run folder>/.lock.

The system drops the lock when its holder dies, so a killed run never leaves the folder locked
(on a local filesystem). The file keeps a line for each process that ever held the lock, the
newest last: a refused run names the holder, and ownership.py removes a folder only if no
process but its own ever held it.
"""

import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from fineweb_gpt.errors import ConfigError
from fineweb_gpt.run.names import LOCK_FILE

log = logging.getLogger("fineweb_gpt")
KEPT_HOLDERS = 20  # lines of history the lock file keeps


def this_process() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname()}


class FolderLock:
    """The lock on a run folder, held from acquire() until release() (or the process's end)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.descriptor: int | None = None
        self.holders: list[dict] = []  # every process that held it, this one last once acquired

    @property
    def held(self) -> bool:
        return self.descriptor is not None

    def acquire(self) -> "FolderLock":
        """Take the lock, or refuse in one line (ConfigError) naming the process that holds it."""
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            raise ConfigError(
                f"{self.path} cannot be opened as the run folder's lock ({err.strerror}); delete it"
            ) from err
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError) as err:
            holder = describe(read_holders(descriptor)[-1:])
            os.close(descriptor)
            raise ConfigError(
                f"run folder {self.run_dir} is in use by {holder}: wait for that run to end, or stop it; if it no "
                f"longer runs (a lock on a network filesystem can outlive a crashed node), delete {self.path} and "
                "run again"
            ) from err
        except OSError as err:  # a filesystem without locks
            log.warning(
                "Cannot lock %s (%s): nothing stops a second run in this folder at once", self.path, err.strerror
            )
        me = {**this_process(), "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": shlex.join(sys.argv)[:300]}
        self.holders = [*read_holders(descriptor), me][-KEPT_HOLDERS:]
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, "".join(json.dumps(h) + "\n" for h in self.holders).encode(), 0)
        self.descriptor = descriptor
        return self

    def only_this_process_held_it(self) -> bool:
        """True if every process that ever held this folder's lock is this one."""
        me = this_process()
        return all({"pid": h.get("pid"), "host": h.get("host")} == me for h in self.holders)

    def release(self) -> None:
        """Let go of the lock; the record of its holders stays."""
        if self.descriptor is not None:
            try:
                fcntl.lockf(self.descriptor, fcntl.LOCK_UN)
            except OSError:
                pass
            os.close(self.descriptor)
            self.descriptor = None


def read_holders(descriptor: int) -> list[dict]:
    """The holders a lock file records, oldest first (an older lock file holds one JSON object)."""
    try:
        text = os.pread(descriptor, 1 << 16, 0).decode(errors="replace")
    except OSError:
        return []
    holders = []
    for line in text.splitlines():
        try:
            holder = json.loads(line)
        except (ValueError, RecursionError):  # a damaged or crafted line
            continue
        if isinstance(holder, dict):
            holders.append(holder)
    return holders


def describe(holders: list[dict]) -> str:
    from fineweb_gpt.run.run_files import one_line_text

    try:
        holder = holders[-1]
        return one_line_text(
            f"process {holder['pid']} on {holder['host']} (since {holder['since']}: {holder['command']})", 400
        )
    except (IndexError, KeyError, TypeError):
        return "another process (it did not say which)"
