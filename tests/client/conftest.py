"""Fixtures shared by the runner-side client tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.client import (
    CountingSource,
    EchoServer,
    SessionServer,
    start_echo_server,
    start_session_server,
)


@pytest.fixture
def server() -> Iterator[EchoServer]:
    """An Echo server behind the recording bearer check, on 127.0.0.1:0."""
    srv = start_echo_server()
    yield srv
    srv.stop()


@pytest.fixture
def source() -> CountingSource:
    """A refreshable fake token source: ``tok-1``, then ``tok-2`` once invalidated..."""
    return CountingSource()


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[SessionServer]:
    """The reference SessionService (SQLite in ``tmp_path``) with one session."""
    srv = start_session_server(str(tmp_path / "sessions.db"))
    yield srv
    srv.close()
