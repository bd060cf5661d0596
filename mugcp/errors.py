"""Errors a user can fix: bad input, a missing tool or extra. Commands print them as one line and exit 2."""


class UserError(Exception):
    """Bad input or a missing prerequisite; the message names the file/field/tool and the fix."""
