"""The base of the errors that mean bad input: a command prints them as one line and exits with status 2."""
from __future__ import annotations


class UserError(Exception):
    """Bad input a user can fix (a file, a value); the message names it and the fix."""
