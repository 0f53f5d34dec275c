"""Prometheus metrics of `segrec serve`, in a registry of their own (so two
servers in one process, as in tests, do not collide)."""

from __future__ import annotations

from serving.server import model_manager as mm


class Metrics:
    def __init__(self):
        import prometheus_client as pc

        self.registry = pc.CollectorRegistry()
        self.requests = pc.Counter("segrec_requests", "gRPC/REST calls by method and status code",
                                   ["method", "code"], registry=self.registry)
        self.latency = pc.Histogram("segrec_request_latency_seconds", "call latency", ["method"],
                                    buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                    registry=self.registry)
        self.batch_rows = pc.Histogram("segrec_batch_rows", "rows of each model call",
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.batch_requests = pc.Histogram("segrec_batch_requests", "requests merged into each model call",
                                           buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.in_model = pc.Gauge("segrec_requests_in_model", "requests inside a model call now",
                                 registry=self.registry)
        self.queued = pc.Gauge("segrec_queued_requests", "requests waiting for a model call",
                               registry=self.registry)
        self.version = pc.Gauge("segrec_loaded_version", "the version served by default (0 = none)",
                                registry=self.registry)
        self.version_state = pc.Gauge("segrec_version_state", "ModelVersionStatus.State of each version seen",
                                      ["version"], registry=self.registry)
        self.text_cache_entries = pc.Gauge("segrec_text_cache_entries",
                                           "user texts whose vectors the loaded versions' text caches hold",
                                           registry=self.registry)
        self.text_cache_hits = pc.Counter("segrec_text_cache_hits", "rows whose user_text vector came from the cache",
                                          registry=self.registry)
        self.text_cache_misses = pc.Counter("segrec_text_cache_misses", "rows whose user_text had to be encoded",
                                            registry=self.registry)
        self._server = None

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def observe_batch(self, rows: int, requests: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)

    def observe_in_model(self, delta: int) -> None:
        self.in_model.inc(delta)

    def track_queue(self, queued) -> None:
        """queued() -> the number of requests waiting, read at each scrape."""
        self.queued.set_function(queued)

    def track_text_cache(self, entries) -> None:
        """entries() -> the entries of every loaded version's text cache, read at each scrape."""
        self.text_cache_entries.set_function(entries)

    def observe_text_cache(self, hits: int, misses: int) -> None:
        self.text_cache_hits.inc(hits)
        self.text_cache_misses.inc(misses)

    def observe_versions(self, snapshot: mm.Snapshot) -> None:
        self.version.set(max(snapshot.loaded) if snapshot.loaded else 0)
        for v, s in snapshot.states.items():
            self.version_state.labels(str(v)).set(s.state)

    def serve(self, host: str, port: int) -> None:
        import prometheus_client as pc

        self._server = pc.start_http_server(port, addr=host, registry=self.registry)
