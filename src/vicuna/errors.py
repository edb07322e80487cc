"""The user-facing error base class.

Each area raises a subclass carrying a message that says what is wrong and what
to do; the CLI prints it (no traceback unless --debug) and exits with its code.
"""


class VicunaError(Exception):
    """An error whose message is meant for the user."""

    exit_code = 1  # 1: the work failed; 2: bad usage or input


class UsageError(VicunaError):
    """Bad command-line usage or bad input data."""

    exit_code = 2
