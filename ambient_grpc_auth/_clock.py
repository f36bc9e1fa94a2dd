"""An injectable clock so that expiry logic is tested without sleeping (the
manually advanced one for tests is :class:`ambient_grpc_auth.testing.FakeClock`)."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock"]


class Clock(Protocol):
    """Wall time for token expiry (``time``) and monotonic time for backoff,
    cooldowns and file-poll intervals (``monotonic``). Both in seconds."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK: Clock = SystemClock()
