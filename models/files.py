"""Writing outputs so that a failed run never loses or damages a file.

Every output is written to a temporary file beside its target (same folder, so the final rename stays
on one file system; the name is unique per process), flushed to the disk, and renamed over the target
(os.replace, atomic on POSIX) only when complete. An exception, Ctrl-C or SIGTERM (raised as Ctrl-C by
`models.errors.exit_on_user_error`) removes the temporary file and leaves an earlier file at the
target as it was; two runs writing one path each produce a whole file, and the last rename wins.
A write error (disk full, quota, read-only, permission, I/O) becomes a one-line UserError.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
import sys

from models.errors import WRITE_ERRNOS, UserError, from_os_error


def temp_path(path: str) -> str:
    """A hidden name beside `path`, unique to this process and call."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.part")


def check_folder_writable(folder: str, shown: str, option: str = "--out", create: bool = False) -> None:
    """Refuse, before any work, an output whose folder is missing, is a file, or cannot take a new file.
    `create`: the writer will create missing folders, so the nearest existing one is checked.

    The check creates and removes a file there instead of asking os.access: access() says yes to root
    on any folder and cannot see a quota or a read-only mount's state as a write would."""
    folder = os.path.abspath(folder or ".")
    while create and not os.path.exists(folder) and folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"output path {shown} is inside {folder}, which is a file, not a folder.", f"choose another {option}")
    if not os.path.isdir(folder):
        raise UserError(f"output folder {folder} does not exist.", f"create it or choose another {option}")
    probe = temp_path(os.path.join(folder, "write-test"))
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        what, _ = WRITE_ERRNOS.get(e.errno, (e.strerror, ""))
        raise UserError(f"output path {shown} is not writable ({what} in {folder}).",
                        f"choose a {option} in a folder you can write to") from None
    os.unlink(probe)


def _kept(path: str, existed: bool) -> str:
    return f"{path} was left as it was" if existed else f"{path} was not written"


def reraise_with_note(e: BaseException, note: str | None, path: str | None = None):
    """Re-raise what stopped writing `path` with `note` (what became of the output) in its one line."""
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
        raise from_os_error(e, path, note or "") from None
    if note is None:
        raise e
    if isinstance(e, UserError):
        raise UserError(f"{e.problem} ({note}).", e.fix) from None
    if isinstance(e, KeyboardInterrupt):  # exit_on_user_error prints the note after "interrupted"
        raise type(e)(note) from None
    # a bug: its traceback follows, so the note is a line of its own before it
    print(f"note: {note}.", file=sys.stderr)
    raise e


class AtomicFile:
    """A binary file object on a temporary file, renamed to `path` by `commit()`; `abort()` (or
    leaving the `with` block by an exception) removes it and keeps what was at `path`."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = temp_path(path)
        self.existed = os.path.exists(path)
        try:
            # 0o666 & ~umask, like a plain open(); the mode of an earlier file is copied at commit
            self.file = os.fdopen(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")
        except OSError as e:
            raise from_os_error(e, path, _kept(path, self.existed)) from None

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())  # a full disk or quota can surface only here (delayed allocation)
            self.file.close()
            if self.existed:
                try:
                    os.chmod(self.tmp, stat.S_IMODE(os.stat(self.path).st_mode))
                except OSError:
                    pass  # the earlier file went away meanwhile: keep the default mode
            os.replace(self.tmp, self.path)
        except BaseException as e:
            self.abort()
            reraise_with_note(e, _kept(self.path, self.existed), self.path)

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass  # the buffered rest could not be written either; the file goes anyway
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            self.commit()
            return False
        self.abort()
        reraise_with_note(exc, _kept(self.path, self.existed), self.path)


def write_bytes(path: str, data: bytes) -> None:
    with AtomicFile(path) as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


class AtomicFolder:
    """A temporary folder beside `path`, renamed to `path` when the `with` block ends normally.

    `next_free`: when `path` already holds something, use the first free of `path-2`, `path-3`, ...
    (a rename never replaces a folder that has files, so a run never overwrites another's). Without
    it an occupied `path` is a UserError. `self.path` is the folder the output ended up in."""

    def __init__(self, path: str, next_free: bool = False, option: str = "--out"):
        self.path, self.next_free, self.option = path, next_free, option
        self.tmp = temp_path(path)

    def __enter__(self) -> str:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            os.mkdir(self.tmp)
        except OSError as e:
            raise from_os_error(e, self.path) from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            try:
                self._publish()
                return False
            except BaseException as e:
                exc = e
        shutil.rmtree(self.tmp, ignore_errors=True)
        reraise_with_note(exc, f"nothing was written to {self.path}", self.path)

    def _publish(self) -> None:
        base, n = self.path, 1
        while True:
            try:
                # replaces only a missing or empty folder; one with files (or a file) raises
                os.rename(self.tmp, self.path)
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                if not self.next_free:
                    raise UserError(f"{self.path} already exists and is not an empty folder.",
                                    f"pass a new folder with {self.option}, or delete {self.path}") from None
                n += 1
                self.path = f"{base}-{n}"
