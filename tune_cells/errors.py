"""Errors that the CLI turns into exit codes (2: bad input, 1: runtime failure)."""


class UserInputError(Exception):
    """Bad input from the user: printed as one line on stderr, exit code 2, no traceback."""
