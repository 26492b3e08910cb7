"""The one exception type users see.

Anything the user can fix (a config key, a value, a data file, a checkpoint, the launcher environment)
raises `UserError` with a one-line message naming the problem and the fix. The CLI prints it as
`error: ...` and exits with `EXIT_USER_ERROR`; tracebacks are kept for real bugs.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem in the user's input, with a message that says how to fix it."""
