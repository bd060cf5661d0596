"""Stopping a training run on a signal at the end of a step, with a checkpoint it resumes from exactly.

Slurm stops a job with SIGTERM (``scancel``, the time limit, pre-emption, a requeue; the Slurm task
also sends it before a requeue) and kills it ``KillWait`` seconds later (30 s by default). Inside the
training loop ``StopOnSignal`` turns that signal into a request: the step in flight finishes, every
process agrees to stop at the same step, rank 0 saves a checkpoint of that step and the run ends with
``RunStopped``; ``--resume`` continues with the next batch of the same epoch. Outside the loop (data
loading, model building, evaluation) the signal interrupts at once, as Ctrl-C does: there is no step to
finish, and what was done is already saved or cheap to redo.
"""
from __future__ import annotations

import random
import signal
import threading
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch


class SignalInterrupt(KeyboardInterrupt):
    """A stop signal outside the training loop: handled like Ctrl-C, exit status 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.exit_code = 128 + int(signum)


class RunStopped(KeyboardInterrupt):
    """The run saved the checkpoint of its last step and stopped (``RunFolder`` adds how to continue)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class StopOnSignal:
    """``with StopOnSignal() as stop: train(..., stop=stop)``: SIGTERM (or ``signals``) stops the run cleanly.

    ``mugcp.train`` watches SIGINT too, so Ctrl-C keeps the step in flight as SIGTERM does; a second
    SIGINT while the step finishes interrupts at once.

    Handlers are installed only in the main thread (Python delivers signals there alone) and the
    previous ones are restored on exit.
    """

    def __init__(self, *signals: int):
        self.signals = signals or (signal.SIGTERM,)
        self.received: Optional[int] = None
        self._deferred = False
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        first = self.received is None
        if first:
            self.received = signum
        # Outside the loop there is no step to finish; a second Ctrl-C means "now", as Ctrl-C does elsewhere.
        if not self._deferred or (not first and signum == signal.SIGINT):
            raise SignalInterrupt(signum)

    @contextmanager
    def deferred(self):
        """Inside: a signal is only noted, for the loop to act on at the end of its step."""
        self._deferred = True
        try:
            yield self
        finally:
            self._deferred = False

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        return False


class NeverStop:
    """The loop's stop request when no signal is watched (library callers, tests)."""

    requested = False
    received = None

    @contextmanager
    def deferred(self):
        yield self


# -- every random generator of a process, for a resume in the middle of an epoch ------------------
def rng_state() -> dict:
    """Tensors and plain containers only: trainer states are read with ``torch.load(weights_only=True)``."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
