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
