"""The one exception type for mistakes in what a user gave (paths, files, arguments).

Command-line entry points catch `UserError` and print its one-line message; anything else is a
bug and keeps its traceback.
"""

import warnings


class UserError(ValueError):
    """Bad input: the message says what and where, in one line."""


def warn_default(message: str) -> None:
    """How the library reports what it skipped (a bad data line, an unreadable image) when the
    caller gives no `warn` callback: a Python warning. The commands print one line instead."""
    warnings.warn(message, UserWarning, stacklevel=3)
