"""Ctrl-C as a flag as well as an exception. Python swallows a KeyboardInterrupt raised inside a
``__del__`` or a weakref callback (it prints "Exception ignored"), so a run checks the flag at its
safe points too: it stops at the next one instead of finishing as if never interrupted."""
from __future__ import annotations

import signal
import threading

requested = threading.Event()


def _on_sigint(signum, frame) -> None:
    requested.set()
    signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt, as without this handler


def install() -> None:
    """Called by the command line in its main thread: Ctrl-C sets `requested`, then interrupts as usual."""
    requested.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed, wherever its first exception went."""
    if requested.is_set():
        raise KeyboardInterrupt
