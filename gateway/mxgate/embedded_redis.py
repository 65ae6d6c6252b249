"""A redis-server child process: the embedded Redis of ``mxgate dev`` and of the test suite.

It runs the real ``redis-server`` binary (Debian's ``redis-server`` package) on loopback with the
persistence mxgate relies on: an append-only file fsynced every second (``--appendonly yes
--appendfsync everysec``), so a message acknowledged with ``250`` survives a crash of any mxgate
process and a kill -9 of Redis itself (Redis writes the AOF before replying). What ``everysec`` can
lose is spelt out in docs/architecture.md; ``appendfsync="always"`` closes those gaps.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from mxgate.errors import ConfigError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_redis_server() -> str:
    path = os.environ.get("MXGATE_REDIS_SERVER") or shutil.which("redis-server")
    if not path:
        raise ConfigError("redis-server not found on PATH: install it (Debian: apt-get install redis-server) "
                          "or point MXGATE_REDIS_SERVER at the binary")
    return path


class EmbeddedRedis:
    """Start ``redis-server`` in ``data_dir``; ``stop()`` (or leaving the context) ends it."""

    def __init__(self, data_dir: Path, *, port: int | None = None, host: str = "127.0.0.1",
                 appendfsync: str = "everysec", log_file: Path | None = None) -> None:
        self.data_dir = data_dir
        self.host = host
        self.port = port or free_port(host)
        self.appendfsync = appendfsync
        self.log_file = log_file or data_dir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, *, timeout: float = 10.0) -> EmbeddedRedis:
        binary = find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            binary, "--port", str(self.port), "--bind", self.host, "--dir", str(self.data_dir),
            "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
            "--daemonize", "no", "--protected-mode", "yes", "--logfile", str(self.log_file),
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(f"redis-server exited with status {self.process.returncode}; "
                                  f"see {self.log_file}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise ConfigError(f"redis-server did not answer on {self.host}:{self.port} within {timeout}s")

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
