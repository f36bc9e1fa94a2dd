"""Waiting for SIGINT/SIGTERM in asyncio servers (shared by the CLI servers)."""

from __future__ import annotations

import asyncio
import contextlib
import signal

__all__ = ["wait_for_stop_signal"]


async def wait_for_stop_signal() -> None:
    """Return once SIGINT or SIGTERM arrives; the handlers are removed again.

    Where handlers cannot be installed (not the main thread, or a platform
    without ``add_signal_handler``) this waits until cancelled.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
