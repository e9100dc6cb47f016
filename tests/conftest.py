"""Fixtures shared by every test folder: a private ``redis-server`` on loopback (reliability.md §6).

The server is started by :class:`coordinator.redis_server.RedisServer` on a free port with a
temporary ``--dir``, AOF on and ``appendfsync always``, and stopped by PID after the module.
Tests that use it carry the ``integration`` marker.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from coordinator.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A started ``redis-server`` for one test module; stopped (and its dir removed) after it."""
    with RedisServer.start(appendfsync="always") as server:
        yield server


@pytest.fixture(scope="module")
def redis_url(redis_server: RedisServer) -> str:
    """``redis://127.0.0.1:<port>/0`` of the module's :func:`redis_server`."""
    return redis_server.url
