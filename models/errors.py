"""The one exception type users see.

Every problem a user can cause or fix (bad text, a missing file, a checkpoint that does not fit, an
engine built elsewhere, a full disk) is raised as a `UserError` whose message names the problem and
the fix on one line. The command-line entry points print it without a traceback and exit with status 2.
"""

import errno


class UserError(Exception):
    """A problem the user can fix; `str(err)` is the one-line message to print."""

    def __init__(self, problem: str, fix: str | None = None, param: str | None = None):
        self.problem = problem
        self.fix = fix
        self.param = param  # the request field at fault, where one is (an HTTP error names it)
        super().__init__(f"{problem}" + (f" Fix: {fix}" if fix else ""))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup that runs for Ctrl-C (temporary files
    removed, earlier outputs kept) also runs when a job scheduler or `kill` stops the process."""


# errno -> (what happened, how to fix it) for the errors writing a file can meet
WRITE_ERRNOS = {
    errno.ENOSPC: ("the disk is full", "free some disk space, or write to another disk"),
    errno.EDQUOT: ("the disk quota is used up", "free some space within your quota, or write to another disk"),
    errno.EROFS: ("the file system is read-only", "write to a folder on a writable disk"),
    errno.EACCES: ("permission denied", "write to a folder you may write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "write to a folder you may write to, or fix its permissions"),
    errno.EPIPE: ("its reader closed the pipe", "keep the reading program running until the output ends"),
    errno.EIO: ("an input/output error (a failing disk or a lost network mount)",
                "check the disk, or write to another one"),
}


def from_os_error(err: OSError, path: str | None = None, note: str = "", doing: str | None = "write") -> UserError:
    """A one-line UserError for an OSError met while writing `path` (default: the error's own file);
    `note` says what became of the output (e.g. that an earlier file was kept)."""
    what, fix = WRITE_ERRNOS.get(err.errno, (err.strerror or type(err).__name__, "check the path and try again"))
    where = path or err.filename or "a file"
    problem = f"cannot {doing} {where}: {what}." if doing else f"{where}: {what}."
    return UserError(problem + (f" {note}." if note else ""), fix)


def exit_on_user_error(fn):
    """Command-line entry points: print a UserError as one line on stderr and exit 2 (no traceback).

    Also one line for Ctrl-C and SIGTERM (exit 130 / 143, the shells' 128 + signal number) and for a
    write error (disk full, read-only, permission denied) that no caller turned into a UserError."""
    import functools
    import signal
    import sys
    import threading

    def terminate(signum, frame):
        raise Terminated()

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # only the main thread may install handlers (a test runner may call us on another one)
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM as Terminated; the args carry what was kept
            how = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
            note = "; ".join(str(a) for a in e.args if a)
            print(f"error: interrupted ({how})" + (f"; {note}." if note else "."), file=sys.stderr)
            sys.exit(143 if isinstance(e, Terminated) else 130)
        except OSError as e:
            if e.errno not in WRITE_ERRNOS:
                raise
            # raised outside the writers that know whether they were writing or reading
            print(f"error: {from_os_error(e, doing=None)}", file=sys.stderr)
            sys.exit(2)
        finally:
            if main_thread:
                # None: the previous handler was not installed from Python
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    return wrapper
