"""The one way fineweb_gpt writes a file, and the one way it replaces a link.

Every file a command writes (checkpoints, the metrics CSV, the run's summary and result, the
Hydra record, evaluation results, reports, token shards) is written to a new temporary file
beside its name, flushed to disk, renamed over the name, and the folder's entry is made
durable too. So a reader, a kill or a full disk at any moment leaves the old file or the new
one, whole, under the name; a write that fails removes its temporary, and one that is killed
leaves `.<name>.<random>.tmp` beside it, which the next run in a run folder removes. A name that
is already a link is refused (a planted `run_summary.json -> ~/.bashrc` stays untouched), and a
rename replaces whatever is at the name instead of writing through it.

The one file appended to rather than replaced, a run's log (Hydra's `<job>.log`), is opened by
LogFileHandler: never through a link, and only if it is a regular file. Every file a command
reads that a user or a run folder names is checked by regular_file first: a named pipe, a
device or a socket would make the reader wait for ever (or read without end).
"""

import errno
import logging
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path

from fineweb_gpt.errors import ConfigError, DiskFull

TEMPORARY_SUFFIX = ".tmp"


def check_target(folder: Path, name: str) -> Path:
    """The path `name` in `folder` if a file may be written there; a one-line ConfigError if it
    is a link, not a plain file name, or resolves outside the folder."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ConfigError(f"{name!r} is not a file name; files are written as plain files in a folder")
    folder = Path(folder)
    target = folder / name
    if target.is_symlink():
        raise ConfigError(
            f"{target} is a link (to {os.readlink(target)}); fineweb_gpt never writes through a link: "
            "delete the link, or give another path"
        )
    if os.path.lexists(target) and not target.is_file():
        raise ConfigError(f"{target} exists and is not a regular file; move it away, or give another path")
    if target.resolve().parent != folder.resolve():
        raise ConfigError(f"{target} resolves outside {folder.resolve()}; give another path")
    return target


# What a path is, when it is not a regular file, by the kind its mode says.
KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class NotARegularFile(ConfigError):
    """A path that exists but is a named pipe, a device, a socket or a folder."""


def kind_of(mode: int) -> str:
    return next((name for is_kind, name in KINDS if is_kind(mode)), "not a regular file")


def regular_file(path: str | Path, fix: str, name: str | None = None) -> Path:
    """`path` if it is a regular file (or a link to one), checked before anything opens it; else a
    one-line ConfigError saying what it is (NotARegularFile) or that it does not exist, then `fix`.
    `name`: how the message names it (ckpt=<path>), the path itself by default."""
    path = Path(path)
    name = name or str(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ConfigError(f"{name} does not exist; {fix}") from None
    except OSError as err:
        raise ConfigError(f"{name} cannot be read ({err.strerror}); {fix}") from None
    if stat.S_ISDIR(mode):
        raise NotARegularFile(f"{name} is a folder; {fix}")
    if not stat.S_ISREG(mode):
        raise NotARegularFile(f"{name} is not a regular file ({kind_of(mode)}); {fix}")
    return path


def is_regular_file(path: str | Path) -> bool:
    """True for a regular file or a link to one; False for anything else, missing or unreadable."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


class AtomicFile:
    """A file written beside `path` and put in place by commit(); discard() (or an exception
    inside `with`) removes it. For writers that stream (token shards); write_atomically is the
    one-call form."""

    def __init__(self, path: str | Path, mode: str = "wb"):
        self.path = Path(path)
        check_target(self.path.parent, self.path.name)
        self.folder = self.path.parent.resolve()
        try:
            descriptor, self.temporary = tempfile.mkstemp(
                dir=self.folder, prefix=f".{self.path.name}.", suffix=TEMPORARY_SUFFIX
            )
        except OSError as err:  # a disk too full for even a new name
            full = disk_full_error(err, self.path)
            if full is not None:
                raise full from err
            raise
        self.file = os.fdopen(descriptor, mode, **({} if "b" in mode else {"newline": ""}))

    def commit(self) -> Path:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())  # a full disk may only say so here
            self.file.close()
            os.chmod(self.temporary, 0o644)
            os.replace(self.temporary, self.folder / self.path.name)
        except BaseException as err:
            self.discard()
            full = disk_full_error(err, self.path)
            if full is not None:
                raise full from err
            raise
        sync_folder(self.folder)
        return self.path

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        if os.path.lexists(self.temporary):
            os.remove(self.temporary)

    def __enter__(self):
        return self.file

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
            return
        self.discard()
        full = disk_full_error(value, self.path)
        if full is not None:
            raise full from value


def write_atomically(path: str | Path, content: str | bytes) -> Path:
    """Write `content` to `path` whole or not at all (see the module's docstring)."""
    data = content.encode() if isinstance(content, str) else content
    with AtomicFile(path) as file:
        file.write(data)
    return Path(path)


def replace_folder(staging: str | Path, target: str | Path) -> Path:
    """Put `staging`, a folder written in full beside `target`, in its place: its files flushed to
    disk first; a folder already at `target` is moved aside and removed only once the new one is
    in place (a folder cannot be renamed over a full one). A `target` that is a link is refused."""
    staging, target = Path(staging), Path(target)
    if target.is_symlink():
        raise ConfigError(
            f"{target} is a link (to {os.readlink(target)}); fineweb_gpt never writes through a link: "
            "delete the link, or give another path"
        )
    for file in staging.iterdir():
        if file.is_file():
            descriptor = os.open(file, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
    sync_folder(staging)
    old = None
    if os.path.lexists(target):
        old = target.with_name(f".{target.name}.{os.getpid()}.old{TEMPORARY_SUFFIX}")
        os.replace(target, old)
    os.replace(staging, target)
    sync_folder(target.parent)
    if old is not None:
        shutil.rmtree(old)
    return target


class LogFileHandler(logging.FileHandler):
    """A log file appended to (hydra.job_logging's handler for `<job>.log`), opened only if it is a
    regular file or new, never through a link. A run folder copied with a planted `train.log ->
    ~/.bashrc` gets nothing written there: the handler writes nothing and keeps the refusal, which
    the command reports in one line before it does anything else (refused_log_files)."""

    def __init__(self, filename, mode: str = "a", encoding=None, delay: bool = False, errors=None):
        self.refusal: ConfigError | None = None
        super().__init__(filename, mode, encoding, delay=True, errors=errors)
        if not delay:
            self.stream = self._open()

    def _open(self):
        path = Path(self.baseFilename)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            descriptor = os.open(path, flags, 0o644)
        except OSError as err:  # a link (O_NOFOLLOW), a pipe without a reader (O_NONBLOCK), no permission
            return self.refuse(path, os.lstat(path).st_mode if os.path.lexists(path) else None, err.strerror)
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            os.close(descriptor)
            return self.refuse(path, mode, "")
        os.set_blocking(descriptor, True)
        return open(descriptor, "a", encoding=self.encoding, errors=self.errors)

    def refuse(self, path: Path, mode: int | None, reason: str):
        if mode is not None and stat.S_ISLNK(mode):
            what = f"is a link (to {os.readlink(path)}); fineweb_gpt never writes through a link"
        elif mode is not None and not stat.S_ISREG(mode):
            what = f"is not a regular file ({kind_of(mode)}); fineweb_gpt writes only regular files"
        else:
            what = f"cannot be written ({reason})"
        self.refusal = ConfigError(f"the run's log {path} {what}: delete it, or give another hydra.run.dir")
        return open(os.devnull, "a")

    def emit(self, record: logging.LogRecord) -> None:
        if self.refusal is None:
            super().emit(record)


def refused_log_files() -> list[ConfigError]:
    """The refusals of the log files this process was to append to (LogFileHandler)."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    handlers = [handler for logger in loggers for handler in getattr(logger, "handlers", [])]
    return [h.refusal for h in handlers if isinstance(h, LogFileHandler) and h.refusal is not None]


def replace_with_link(link: Path, target: str) -> None:
    """Make `link` a symlink to `target` (relative to the link's folder) atomically: a new link
    under another name renamed over the old one, so a reader always finds the old or the new."""
    link = Path(link)
    temporary = link.with_name(f".{link.name}.{os.getpid()}.{threading.get_ident()}{TEMPORARY_SUFFIX}")
    if os.path.lexists(temporary):
        os.remove(temporary)
    os.symlink(target, temporary)
    os.replace(temporary, link)
    sync_folder(link.parent)


def sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (its directory entry), where the system allows it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def disk_full(err: BaseException | None) -> OSError | None:
    """The "no space" or "quota" error behind `err` (torch.save reports it as a RuntimeError of its
    zip writer, with the OSError as its context), or None."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        err = err.__cause__ or err.__context__
    return None


def disk_full_error(err: BaseException | None, path: Path) -> DiskFull | None:
    """A one-line DiskFull for a write of `path` that found no space, or None for other errors."""
    if isinstance(err, DiskFull):
        return None
    full = disk_full(err)
    if full is None:
        return None
    return DiskFull(
        f"{full.strerror} writing {path}: nothing of it is left, and the file before it is whole; free space"
    )
