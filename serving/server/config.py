"""The settings of one `segrec serve` (ServeConfig) and the parser of its
`--version-labels` flag. Read by every other module of serving.server; imports none."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Settings of one `segrec serve`.

    model_base_path holds <model_name>/<N>/. rest_port / metrics_port 0 = off.
    version_labels: label -> version. max_batch_size: rows of one model call
    (and of one request); batch_timeout_ms: with batch_threads > 1, how long
    the oldest queued request waits for others while the model is busy (a
    request that finds the model idle runs at once); batch_threads: model
    calls that may run at the same time; max_queue: requests waiting before
    RESOURCE_EXHAUSTED. fault_delay_ms: latency added inside every model
    call (fault drills and tests only). text_cache_size: user texts whose
    encoder vectors each loaded version keeps (LRU; 0 = no cache; text
    exports only: text_cache.py).
    token: bearer token every call must carry (None = no auth). tls_cert /
    tls_key: PEM files for a TLS port. max_message_bytes: gRPC receive limit
    (and the largest REST body).
    """

    model_base_path: str
    model_name: str = "segrec"
    host: str = "127.0.0.1"
    port: int = 8500
    poll_seconds: float = 2.0
    max_batch_size: int = 64
    batch_timeout_ms: float = 5.0
    max_queue: int = 256
    rest_port: int = 0
    metrics_port: int = 0
    version_labels: tuple = ()  # ((label, version), ...) so the dataclass stays hashable
    max_string_bytes: int = 10 * 1024 * 1024
    max_message_bytes: int = 64 * 1024 * 1024
    grpc_workers: int = 16
    token: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    grace_seconds: float = 10.0
    batch_threads: int = 1
    fault_delay_ms: float = 0.0
    text_cache_size: int = 100_000

    @property
    def labels(self) -> dict:
        return dict(self.version_labels)


def parse_labels(text: str) -> tuple:
    """"stable=1,canary=2" -> (("stable", 1), ("canary", 2))."""
    out = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        label, sep, version = part.partition("=")
        if not sep or not label.strip() or not version.strip().isdigit():
            raise ValueError(f"--version-labels: {part!r} is not LABEL=VERSION (e.g. stable=1,canary=2)")
        out.append((label.strip(), int(version)))
    return tuple(out)
