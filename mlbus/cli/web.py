"""The uvicorn server of the HTTP services (model server, control-plane API), ticking once
a second instead of ten times.

uvicorn's main loop wakes every 100 ms to refresh its Date header (once a second) and to
look for a stop request: at idle that tick is most of a quiet server's CPU. Here the loop
sleeps a second between ticks, and a stop request (SIGTERM/SIGINT) wakes it at once, so
shutting down waits no longer than before."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from types import FrameType
from typing import Any

#: Seconds between two ticks (uvicorn's: 0.1); its Date header is refreshed on each.
TICK = 1.0


def server(config: Any, *, clean_exit: bool = False) -> Any:
    """A `uvicorn.Server` for `config` with the slow tick. `clean_exit`: SIGTERM/SIGINT is
    a clean stop (exit 0) instead of uvicorn's re-raising of the signal once shut down."""
    import uvicorn

    class Server(uvicorn.Server):
        _wake: asyncio.Event | None = None
        _loop: asyncio.AbstractEventLoop | None = None

        async def main_loop(self) -> None:
            self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
            # on_tick refreshes the Date header when the counter is a multiple of 10
            counter = 0
            should_exit = await self.on_tick(counter)
            while not should_exit:
                counter = (counter + 10) % 864000
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), TICK)
                should_exit = await self.on_tick(counter)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if clean_exit:
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True  # a second Ctrl-C: do not wait any longer
                else:
                    self.should_exit = True
            else:
                super().handle_exit(sig, frame)
            if self._loop is not None and self._wake is not None:
                # a signal handler runs between two bytecodes of the loop's thread: hand
                # the wake-up to the loop rather than touching the event from here
                self._loop.call_soon_threadsafe(self._wake.set)

    return Server(config)
