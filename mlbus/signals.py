"""The graceful stop every long-running service shares: SIGTERM (from `mlbus up`, a
container runtime) and SIGINT (Ctrl-C) call the service's stop, and the previous handlers
come back when it returns."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable


def install_stop_handlers(
    on_signal: Callable[[signal.Signals], None],
) -> Callable[[], None] | None:
    """Route SIGTERM and SIGINT to `on_signal`; returns what puts the previous handlers
    back, or None off the main thread (where Python cannot install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {
        s: signal.signal(s, lambda signum, frame: on_signal(signal.Signals(signum)))
        for s in (signal.SIGTERM, signal.SIGINT)
    }

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    return restore
