"""Stopping cleanly on SIGTERM and SIGINT. Python's default for SIGTERM is to die without
running any cleanup, which leaves multi-GB temp folders behind; `stop_on_signals` turns both
signals into an `Interrupted` exception in the main thread, so every `except BaseException`
cleanup (temp folders) and every resume point (finished stages, index chunks) runs on the way
out. Code that keeps resumable work says so with `note_kept`; the CLI prints what was kept."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt, so `except Exception`
    handlers in stages do not swallow it. `kept` lists the resumable work left on disk."""

    def __init__(self, signum: int):
        self.signum = signum
        self.kept: list[str] = []
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT

    def summary(self) -> str:
        kept = "; ".join(self.kept)
        if not kept:
            return f"interrupted by {self}: temp folders removed, nothing to resume"
        return f"interrupted by {self}: temp folders removed; kept {kept}; rerun the same command to resume"


INTERRUPTIONS = (Interrupted, KeyboardInterrupt)  # library callers without the handlers get KeyboardInterrupt


def note_kept(exc: BaseException, what: str) -> None:
    """Record resumable work left on disk while `exc` (an interruption) propagates."""
    if isinstance(exc, Interrupted):
        exc.kept.append(what)
    if isinstance(exc, INTERRUPTIONS):
        log.info("kept %s for the next run", what)


def _raise_interrupted(signum: int, _frame) -> None:
    # A second signal during cleanup stops at once (the signal's default action); the next run
    # on the same output removes what this process could not.
    for other in SIGNALS:
        signal.signal(other, signal.SIG_DFL)
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Raise `Interrupted` on SIGTERM/SIGINT while inside; the previous handlers come back on
    exit. Outside the main thread (signals cannot be handled there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
