"""SIGTERM/SIGINT for the trainer: stop promptly, and with a checkpoint whenever the state is consistent.

- Inside a training step (model and optimizers half updated) the first signal is *deferred*: the step
  finishes, a checkpoint is written, the run exits with 130.
- Inside an ``interruptible()`` region (loading a batch, evaluation: code that changes no training state)
  the signal raises ``Interrupted`` at once, wherever the code is (a sleep, a retry loop, a slow read); the
  trainer then checkpoints the last completed step and exits with 130.
- A second signal always raises ``Interrupted`` at once; inside a step nothing is checkpointed (the last
  checkpoint stays the newest intact state).

``Interrupted`` derives from ``BaseException``, like ``KeyboardInterrupt``, so an ``except Exception`` that
skips a bad row or image does not swallow it. Code of its own with long loops (data loading, evaluation)
needs nothing more than not catching ``BaseException``; inside a step it may call ``check()`` to stop at a
point of its choosing.
"""

from __future__ import annotations

import contextlib
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class SignalGuard:
    """Installs handlers for SIGTERM and SIGINT until ``restore()`` (main thread only)."""

    def __init__(self) -> None:
        self.requested: int | None = None  # the first signal received
        self._interruptible = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        repeated = self.requested is not None
        self.requested = self.requested or signum
        if repeated or self._interruptible:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def interruptible(self):
        """A region that a signal may leave at once (it changes no training state)."""
        self.check()
        self._interruptible += 1
        try:
            yield
        finally:
            self._interruptible -= 1

    def check(self) -> None:
        """Raise ``Interrupted`` when a signal has been received."""
        if self.requested is not None:
            raise Interrupted(self.requested)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def saved_message(done: int, start: int, wrote: bool) -> str:
    """What a stop left behind: the checkpoint just written, or why none was (nothing new to save)."""
    if wrote:
        return f"state after step {done} checkpointed"
    if done == start:
        return ("no step completed in this run: nothing written" +
                (f"; the checkpoint of step {start} is the newest" if start else ""))
    return f"the checkpoint of step {done} is already the newest"
