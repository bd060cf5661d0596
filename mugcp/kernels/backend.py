"""The one switch that picks how every op in ``kernels`` runs: ``reference`` (PyTorch) or ``triton``.

The default comes from the ``MUGCP_KERNELS`` environment variable (``reference`` when unset); a
run's config calls :func:`set_backend`, and code that needs one backend for a while uses
:func:`use_backend`. Every op also takes ``backend=`` (``None`` means this global choice).

Triton is imported only when a Triton path is first asked for, because whether its kernels are
compiled or interpreted is fixed when they are defined: ``TRITON_INTERPRET=1`` must be set by then.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

from .errors import KernelError

BACKENDS = ("reference", "triton")
ENV_VAR = "MUGCP_KERNELS"


class KernelBackendError(KernelError, RuntimeError):
    """A kernel backend was asked for that does not exist or cannot run here; the message says how to fix it."""


def _validated(name: object, where: str) -> str:
    if name not in BACKENDS:
        raise KernelBackendError(
            f"unknown kernel backend {name!r} ({where}); choose one of {', '.join(BACKENDS)}"
        )
    return name  # type: ignore[return-value]


def _default_from_environment() -> str:
    value = os.environ.get(ENV_VAR, "reference").strip().lower() or "reference"
    return _validated(value, f"environment variable {ENV_VAR}")


_current: str = _default_from_environment()


def get_backend() -> str:
    return _current


def set_backend(name: str) -> None:
    """Make ``name`` the backend of every op called with ``backend=None``."""
    global _current
    _current = _validated(name, "kernels.set_backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Use ``name`` as the global backend inside the ``with`` block, then restore the previous one."""
    previous = get_backend()
    set_backend(name)
    try:
        yield name
    finally:
        set_backend(previous)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str | None, *tensors: torch.Tensor) -> str:
    """The backend an op call will use, checked against where its tensors live.

    Raises :class:`KernelBackendError` when Triton is asked for but can run neither compiled
    (Triton installed and the tensors on a CUDA device) nor interpreted (``TRITON_INTERPRET=1``).
    """
    name = get_backend() if backend is None else _validated(backend, "backend= argument")
    if name == "triton":
        _check_triton_can_run(tensors)
    return name


def _check_triton_can_run(tensors: tuple[torch.Tensor, ...]) -> None:
    fix = (
        "set the environment variable TRITON_INTERPRET=1 before the first Triton call to run the "
        "kernels in the Triton interpreter (slow, for testing), or use `kernels: reference` in the "
        f"config (or {ENV_VAR}=reference, or backend='reference')"
    )
    if importlib.util.find_spec("triton") is None:
        raise KernelBackendError(f"kernel backend 'triton' needs the triton package, which is not installed; {fix}")
    if interpreter_enabled():
        return
    if not torch.cuda.is_available():
        raise KernelBackendError(f"kernel backend 'triton' needs a CUDA GPU and none is available; {fix}")
    on_cpu = [t for t in tensors if t.device.type != "cuda"]
    if on_cpu:
        raise KernelBackendError(
            f"kernel backend 'triton' got tensors on {on_cpu[0].device}, but compiled Triton kernels "
            f"run only on CUDA tensors; move the inputs to a CUDA device, or {fix}"
        )
