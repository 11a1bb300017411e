"""The one exception type users see.

Every problem a user can cause or fix (bad text, a missing file, a checkpoint that does not fit, an
engine built elsewhere) is raised as a `UserError` whose message names the problem and the fix on one
line. The command-line entry points print it without a traceback and exit with status 2.
"""


class UserError(Exception):
    """A problem the user can fix; `str(err)` is the one-line message to print."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}" + (f" Fix: {fix}" if fix else ""))


def exit_on_user_error(fn):
    """Command-line entry points: print a UserError as one line on stderr and exit 2 (no traceback)."""
    import functools
    import sys

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
