"""The one exception type users see.

Anything the user can fix (a config key, a value, a data file, a checkpoint, the launcher environment)
raises `UserError` with a one-line message naming the problem and the fix. The CLI prints it as
`error: ...` and exits with `EXIT_USER_ERROR`; tracebacks are kept for real bugs.
"""

EXIT_USER_ERROR = 2  # bad input: one `error: ...` line on stderr


class UserError(Exception):
    """A problem in the user's input, with a message that says how to fix it."""

# The exit codes of `pretrain train` (and remove-norms), read by launch/train.sbatch, launch/status.py and scripts.
EXIT_OK = 0
EXIT_UNSTABLE = 3  # stopped after train.max_bad_steps consecutive non-finite steps
EXIT_PREEMPTED = 75  # EX_TEMPFAIL, "try again": saved on SIGTERM/SIGUSR1; the SLURM script requeues on it
