"""The `segrec serve` process: one ModelManager and one Predictor behind a
gRPC port (grpc_api.py), an optional REST port (rest_api.py) and an optional
Prometheus port (prometheus.py); start, swap versions, drain, stop.

    Server(config).start()  first poll (so serving starts loaded), then the ports
    serve(config)           start, print the address, run until SIGTERM / SIGINT

Health (grpc.health.v1) follows the loaded versions: NOT_SERVING until every
port is up and a version is loaded, SERVING while one is. SIGTERM drains: new Predict calls
get UNAVAILABLE, health turns NOT_SERVING for good, the REST server stops
accepting, the in-flight and queued calls are answered (up to
grace_seconds), polling stops and `serve` returns 0.
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import threading

import grpc

from serving.server import grpc_api
from serving.server import model_manager as mm
from serving.server.config import ServeConfig
from serving.server.predictor import Predictor

_LOG = logging.getLogger("segrec.serve")


class Server:
    """Owns the manager, the predictor, the gRPC (and optional REST / metrics) servers."""

    def __init__(self, config: ServeConfig, loader=mm.load_version):
        from serving.server import prometheus as metrics_mod

        self.config = config
        self.metrics = metrics_mod.Metrics() if config.metrics_port else None
        self.health = grpc_api.Health()
        self.manager = mm.ModelManager(config.model_base_path, config.model_name, config.poll_seconds,
                                       labels=config.labels, loader=loader, on_change=self._on_versions,
                                       text_cache_size=config.text_cache_size)
        self.predictor = Predictor(config, self.manager, self.metrics)
        self._started = False
        self._draining = False
        self.grpc_server = None
        self.rest = None
        self.port = None

    def _on_versions(self, snapshot: mm.Snapshot) -> None:
        """After each swap (poll thread): health and the version gauges follow."""
        self.health.set_serving(self.is_serving())
        if self.metrics is not None:
            self.metrics.observe_versions(snapshot)

    def start(self) -> int:
        self.manager.start()
        c = self.config
        interceptors = [grpc_api.TokenInterceptor(c.token)] if c.token else []
        self.grpc_server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=c.grpc_workers, thread_name_prefix="segrec-grpc"),
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", c.max_message_bytes),
                     ("grpc.max_send_message_length", c.max_message_bytes)],
            maximum_concurrent_rpcs=c.max_queue + c.grpc_workers,
        )
        grpc_api.add_services(self.grpc_server, self.predictor, self.metrics, self.health)
        address = f"{c.host}:{c.port}"
        if c.tls_cert and c.tls_key:
            with open(c.tls_key, "rb") as k, open(c.tls_cert, "rb") as cert:
                creds = grpc.ssl_server_credentials([(k.read(), cert.read())])
            self.port = self.grpc_server.add_secure_port(address, creds)
        else:
            self.port = self.grpc_server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot bind gRPC to {address}")
        self.grpc_server.start()
        if c.rest_port:
            from serving.server import rest_api

            self.rest = rest_api.RestServer(self.predictor, c.host, c.rest_port, token=c.token,
                                            grace_seconds=c.grace_seconds)
            self.rest.start()
        if self.metrics is not None:
            self.metrics.serve(c.host, c.metrics_port)
            self.metrics.observe_versions(self.manager.snapshot)
        self._started = True  # health says SERVING only once every port is up
        self.health.set_serving(self.is_serving())
        return self.port

    def is_serving(self) -> bool:
        return self._started and not self._draining and bool(self.manager.snapshot.loaded)

    def stop(self) -> None:
        """Stop taking calls, answer the in-flight ones (up to grace_seconds), stop polling."""
        self.predictor.draining = True  # first: once health says NOT_SERVING, Predict is refused
        self._draining = True
        self.health.drain()
        if self.rest is not None:
            self.rest.stop()
        if self.grpc_server is not None:
            self.grpc_server.stop(self.config.grace_seconds).wait(self.config.grace_seconds + 1)
        self.predictor.stop()
        self.manager.stop()


def serve(config: ServeConfig, ready=None) -> int:
    """Runs until SIGTERM / SIGINT; returns 0 after draining."""
    server = Server(config)
    port = server.start()
    # Only the version numbers: a snapshot kept here would hold the first version for the server's life.
    loaded = sorted(server.manager.snapshot.loaded)
    extra = "".join([f", REST :{config.rest_port}" if config.rest_port else "",
                     f", metrics :{config.metrics_port}" if config.metrics_port else ""])
    print(f"segrec serve: model {config.model_name!r} versions {loaded or 'none yet'} on "
          f"{config.host}:{port}{extra}", flush=True)
    if ready is not None:
        ready(port)
    done = threading.Event()

    def on_signal(signum, frame):
        _LOG.info("signal %d: draining", signum)
        done.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not done.wait(0.5):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        server.stop()
    print("segrec serve: stopped", flush=True)
    return 0
