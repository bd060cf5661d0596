"""The base of the kernels' own errors (``kernels`` imports nothing from ``mugcp``).

A ``KernelError`` means a bad choice by the caller (an unknown backend, one not installed here), so
``mugcp``'s command runner reports it as one line; it recognises it by this class without any other
import. This module imports nothing, so importing it costs nothing.
"""


class KernelError(ValueError):
    """An unknown or unavailable kernel or attention backend."""
