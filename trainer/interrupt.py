"""A checkpoint on Ctrl-C: the first SIGINT (or SIGTERM, as a scheduler sends before it
preempts a job) lets the current step finish, saves a checkpoint and stops training; a second
one interrupts at once. ``--resume`` then continues from that checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

from transformers import TrainerCallback

_LOG = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint; the message names it."""


class InterruptCallback(TrainerCallback):
    """Turns a signal caught by :meth:`catching` into a checkpoint at the end of the step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.signal = signum
        # A second signal gets the previous behaviour (KeyboardInterrupt for Ctrl-C).
        signal.signal(signum, self._previous[signum])
        _LOG.warning(
            "%s: saving a checkpoint at the end of this step, then stopping (again to abort)",
            signal.Signals(signum).name,
        )

    @contextlib.contextmanager
    def catching(self) -> Iterator[InterruptCallback]:
        """Catch the signals while the block runs (main thread only), then restore them."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, handler)

    @property
    def interrupted(self) -> bool:
        return self.signal is not None

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
        return control
