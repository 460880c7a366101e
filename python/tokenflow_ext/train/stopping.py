"""Graceful stops of a training run: SIGTERM (a scheduler's preemption, torchrun passing on its own
SIGTERM), SIGINT (Ctrl-C) and, under torchrun, the death of the launcher (a SIGKILLed torchrun leaves its
workers running otherwise).

The handlers only set a flag; the step loop reads it between steps (all ranks agree on it, see
``Trainer.run``), finishes the step in flight, saves a checkpoint on every rank together and returns. A second
Ctrl-C interrupts at once (``KeyboardInterrupt``).
"""

from __future__ import annotations

import os
import signal
import threading

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


class StopRequests:
    """A context that catches SIGTERM / SIGINT while a run trains; :meth:`poll` says why to stop (the signal's
    name, ``"launcher exit"``) or ``None``. Outside the main thread no handler can be installed: signals then
    keep their default behaviour and only the launcher check works."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, object] = {}
        self._launcher = os.getppid() if launched_by_torchrun() else None

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for number in _SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        if self.reason is not None and number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        if self.reason is None:
            self.reason = signal.Signals(number).name

    def poll(self) -> str | None:
        if self.reason is None and self._launcher is not None and os.getppid() != self._launcher:
            self.reason = "launcher exit"
        return self.reason
