"""Reading a ``torch.save`` file that someone else wrote, weights-only, in either of torch's formats.

Two formats exist: the zip archive of torch >= 1.6 and the older one (``_use_new_zipfile_serialization=False``,
still what some released checkpoints are): a magic-number pickle, a protocol pickle, a system-info
pickle, the object's pickle, then the raw tensor bytes. torch's weights-only loader reads both, but
its listing of the classes a file refers to reads only zip archives; for the older format the
object's pickle is listed here with :mod:`pickletools`, which only parses and never runs anything.

Classes torch's weights-only loader does not allow (a Dassl scheduler) are read as inert stand-ins,
so no code from the file runs. torch's own refusals are not passed on: their text suggests
``weights_only=False``, which would run the file's code; the messages here say what is wrong instead.
"""
from __future__ import annotations

import logging
import pickletools
import zipfile
from pathlib import Path

import torch

from mugcp.config import ConfigError

log = logging.getLogger("mugcp.torch_files")

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # the first pickle of the older format holds this number
# Modules torch's weights-only loader refuses even for a class the caller allows: nothing of theirs is ever read.
SYSTEM_MODULES = ("os", "posix", "nt", "sys")


def _stand_in(name: str) -> type:
    """An inert class standing for ``module.Qualified`` (e.g. Dassl's scheduler): never runs its code."""
    module, _, qualname = name.rpartition(".")

    def init(self, *args, **kwargs):
        self.args = args

    return type(qualname, (), {"__module__": module, "__qualname__": qualname, "__init__": init,
                               "__setstate__": lambda self, state: None})


def _pickle_ops(handle):
    return list(pickletools.genops(handle))  # one pickle: genops stops at its STOP opcode


def legacy_globals(path: Path) -> set[str]:
    """The ``module.name`` of every class or function the object's pickle of an older-format file refers to."""
    with open(path, "rb") as handle:
        magic = _pickle_ops(handle)
        if not any(arg == LEGACY_MAGIC_NUMBER for _, arg, _ in magic):
            raise ValueError("no torch magic number")
        _pickle_ops(handle)  # protocol version
        _pickle_ops(handle)  # system info (byte order, type sizes)
        ops = _pickle_ops(handle)
    # pickletools gives GLOBAL's argument as "module name". The weights-only loader reads no STACK_GLOBAL at all.
    return {arg.replace(" ", ".", 1) for op, arg, _ in ops if op.name == "GLOBAL"}


def _allowed_globals() -> set[str]:
    # The allowlist torch.serialization.get_unsafe_globals_in_checkpoint compares zip archives with (torch is
    # pinned in setup.py; tests/test_convert.py reads older-format files through this).
    from torch import _weights_only_unpickler as unpickler

    return set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())


def unsafe_globals(path: Path, expected: str) -> list[str]:
    """Classes and functions ``path`` refers to that torch's weights-only loader does not allow by itself."""
    if zipfile.is_zipfile(path):
        try:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception as err:
            raise ConfigError(f"{path} is not a torch checkpoint: a zip archive, but not one torch.save wrote "
                              f"({type(err).__name__}); expected {expected}.") from None
    try:
        found = legacy_globals(path)
    except Exception:  # pickletools' errors on arbitrary bytes: ValueError, EOFError, UnicodeDecodeError...
        raise ConfigError(f"{path} is not a torch checkpoint (neither a zip archive nor the older format torch.save "
                          f"writes); expected {expected}.") from None
    return sorted(found - _allowed_globals())


def read_weights_only(path: Path, expected: str):
    """The object ``torch.save`` wrote to ``path``, read with ``weights_only=True`` in either format; other
    classes become inert stand-ins. ``expected`` says what the file should be, for the messages."""
    unsafe = unsafe_globals(path, expected)
    system = [name for name in unsafe if name.split(".", 1)[0] in SYSTEM_MODULES]
    if system:
        raise ConfigError(f"{path} refers to {', '.join(system)} (the operating system or interpreter); a checkpoint "
                          "holds tensors and plain values only. Refused: nothing in the file was run.")
    if unsafe:
        log.debug("reading %d non-tensor object types as inert stand-ins: %s", len(unsafe), ", ".join(unsafe))
    try:
        with torch.serialization.safe_globals([_stand_in(name) for name in unsafe]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's text would suggest weights_only=False, i.e. running the file's code: say what we know instead.
        raise ConfigError(f"{path}: cannot read it weights-only ({type(err).__name__}): the file is cut short or "
                          "damaged, or holds objects no checkpoint needs. Nothing in it was run; "
                          f"expected {expected}.") from None
