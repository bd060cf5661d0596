"""The one base class of every error that means bad input.

A ``UserError`` is the user's to fix (a config value, a file, a folder, a class list): the command
runner prints it as one line and exits with status 2, without a traceback. Every layer derives its
own errors from it (``ConfigError``, ``CheckpointError``, ``CacheError``, ...), so the runner needs to
know this class alone. This module imports nothing, so every layer can use it.
"""


class UserError(Exception):
    """Bad input: the message names the file or field and the fix."""
