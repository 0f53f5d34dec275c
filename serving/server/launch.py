"""Start and stop `segrec serve` in a subprocess: for the demo, the notebooks and
the tests, which all need a real gRPC server on a free localhost port.

    with ServerProcess(base_path) as server:     # waits until health is SERVING
        client = RecommenderClient(server.target)
        ...
    # leaving the block sends SIGTERM and waits for a clean exit

`stop()` returns the server's exit code (0 after a graceful drain).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the server binds it right after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def health_status(target: str, timeout: float = 1.0, tls_ca: Optional[bytes] = None,
                  token: Optional[str] = None) -> bool:
    """True when the server at `target` answers the standard gRPC health check with SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls_ca is not None:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=tls_ca))
    else:
        channel = grpc.insecure_channel(target)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout,
                                                                 metadata=metadata)
            return response.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False


class ServerProcess:
    """`segrec serve` over `model_base_path` in a child process.

    Args:
      model_base_path: holds segrec/<version>/ (what `segrec export` wrote).
      port, rest_port, metrics_port: None picks a free port (REST and metrics
        are always on, so callers can use them); give 0 to turn REST or metrics off.
      extra_args: more `segrec serve` flags (e.g. ["--max-batch-size", "16"]).
      log_path: where the server's stdout/stderr go (default: a temp file);
        its tail is quoted when the server fails to start.
      tls_ca, token: what the health check needs when the server uses TLS
        (PEM bytes of the root certificate) or a bearer token.
      env: extra environment variables for the child.
    """

    def __init__(self, model_base_path: str, port: Optional[int] = None, rest_port: Optional[int] = None,
                 metrics_port: Optional[int] = None, extra_args: Sequence[str] = (),
                 log_path: Optional[str] = None, startup_timeout: float = 120.0, host: str = "127.0.0.1",
                 tls_ca: Optional[bytes] = None, token: Optional[str] = None, env: Optional[dict] = None):
        self.model_base_path = str(model_base_path)
        self.host = host
        self.port = free_port(host) if port is None else int(port)
        self.rest_port = free_port(host) if rest_port is None else int(rest_port)
        self.metrics_port = free_port(host) if metrics_port is None else int(metrics_port)
        self.extra_args = [str(a) for a in extra_args]
        self.startup_timeout = startup_timeout
        self.tls_ca = tls_ca
        self.token = token
        self.env = dict(env or {})
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="segrec-serve-", suffix=".log")
            os.close(fd)
        self.log_path = str(log_path)
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    # --- addresses ---------------------------------------------------------------------
    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def rest_url(self) -> Optional[str]:
        return f"http://{self.host}:{self.rest_port}" if self.rest_port else None

    @property
    def metrics_url(self) -> Optional[str]:
        return f"http://{self.host}:{self.metrics_port}/metrics" if self.metrics_port else None

    def command(self) -> list:
        return [sys.executable, "-m", "trainer.cli", "serve", "--model-base-path", self.model_base_path,
                "--host", self.host, "--port", str(self.port), "--rest-port", str(self.rest_port),
                "--metrics-port", str(self.metrics_port), *self.extra_args]

    # --- life cycle -------------------------------------------------------------------
    def start(self) -> "ServerProcess":
        """Starts the server and waits until it is healthy; RuntimeError (with the log's tail) if it is not."""
        if self.proc is not None:
            raise RuntimeError("this server was already started")
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env})
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._close_log()
                raise RuntimeError(f"segrec serve exited with code {self.proc.returncode} while starting; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            if health_status(self.target, tls_ca=self.tls_ca, token=self.token):
                return self
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"segrec serve was not healthy after {self.startup_timeout:.0f} s; "
                           f"log {self.log_path}:\n{self.log_tail()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful drain), wait up to `timeout` s, then kill; returns the exit code."""
        if self.proc is None:
            raise RuntimeError("the server was never started")
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_log()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.running():
            self.stop()
        else:
            self.kill()
