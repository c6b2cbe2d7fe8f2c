"""The one exception type for mistakes in what a user gave (paths, files, arguments).

Command-line entry points catch `UserError` and print its one-line message; anything else is a
bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input: the message says what and where, in one line."""
