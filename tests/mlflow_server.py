"""A real `mlflow server` on loopback for tests: started in its own process group, killed with it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SERVER_START_DEADLINE_S = 90


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1:port, in its own process group (it spawns workers)."""

    def __init__(self, port: int, root: Path):
        self.port = port
        self.root = root
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        from mlflow.cli import server as server_command

        args = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", f"sqlite:///{self.root / 'srv.db'}",
                "--artifacts-destination", str(self.root / "artifacts")]
        if any(p.name == "workers" for p in server_command.params):
            args += ["--workers", "1"]
        # The background job runner (a dozen huey processes) is not needed for tracking.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        log = (self.root / f"server-{time.monotonic_ns()}.log").open("w")
        self.proc = subprocess.Popen(args, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        self._wait_healthy(log.name)
        return self

    def _wait_healthy(self, log: str) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
        deadline = time.monotonic() + SERVER_START_DEADLINE_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n{Path(log).read_text()[-3000:]}")
            try:
                with opener.open(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"mlflow server not healthy after {SERVER_START_DEADLINE_S} s:\n{Path(log).read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole group: a crash, not a shutdown."""
        self._signal_group(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None and not self._group_alive():
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)  # workers that outlived their parent
        self.proc.wait(timeout=30)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Starts servers (``servers(port=None)``); every one is stopped when the test ends."""
    started: list[Server] = []

    def start(port: int | None = None) -> Server:
        server = Server(port or _free_port(), tmp_path)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
