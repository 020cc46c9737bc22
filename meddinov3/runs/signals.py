"""SIGTERM / SIGINT during a run: a clean stop (checkpoint, state "stopped"), never a half-written run folder."""

from __future__ import annotations

import signal


class RunStopped(Exception):
    """SIGTERM / SIGINT outside the training loop (start-up, final save): raised from the signal handler."""

    def __init__(self, signal_name: str):
        super().__init__(f"stopped by {signal_name}")
        self.signal = signal_name


class StopRequest:
    """SIGTERM / SIGINT during a training or pretraining run: remembered, so the loop saves and stops cleanly.

    `immediate`: raise `RunStopped` from the handler instead, for the start-up (dataset checks, caches), which
    has no point at which it could look at a flag; temporary files are removed as the exception unwinds.
    """

    def __init__(self, immediate: bool = False):
        self.requested = False
        self.signal = ""
        self.immediate = immediate
        self._previous: dict = {}

    def __call__(self, signum, frame) -> None:
        self.requested = True
        self.signal = signal.Signals(signum).name
        if self.immediate:
            raise RunStopped(self.signal)

    def install(self) -> "StopRequest":
        self._previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
