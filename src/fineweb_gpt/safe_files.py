"""The one way fineweb_gpt writes a file, and the one way it replaces a link.

Every file a command writes (checkpoints, the metrics CSV, the run's summary and result, the
Hydra record, evaluation results, reports, token shards) is written to a new temporary file
beside its name, flushed to disk, renamed over the name, and the folder's entry is made
durable too. So a reader, a kill or a full disk at any moment leaves the old file or the new
one, whole, under the name; a write that fails removes its temporary, and one that is killed
leaves `.<name>.<random>.tmp` beside it, which the next run in a run folder removes. A name that
is already a link is refused (a planted `run_summary.json -> ~/.bashrc` stays untouched), and a
rename replaces whatever is at the name instead of writing through it.
"""

import errno
import os
import shutil
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


class AtomicFile:
    """A file written beside `path` and put in place by commit(); discard() (or an exception
    inside `with`) removes it. For writers that stream (token shards); write_atomically is the
    one-call form."""

    def __init__(self, path: str | Path, mode: str = "wb"):
        self.path = Path(path)
        check_target(self.path.parent, self.path.name)
        self.folder = self.path.parent.resolve()
        descriptor, self.temporary = tempfile.mkstemp(
            dir=self.folder, prefix=f".{self.path.name}.", suffix=TEMPORARY_SUFFIX
        )
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
