"""bench/bench_soak.py's drill, short: 20 s of mixed traffic from 2 clients against
`segrec serve` over the tiny export, one hot swap. No unexpected errors, the
deliberate bad requests get INVALID_ARGUMENT (NOT_FOUND allowed for the unknown
signature), the answers move to the new version, the text cache hits, SIGTERM
exits 0, and the results dict has every field the report reads."""

from __future__ import annotations

import pytest
from test_server import build_tiny_export

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_generated):
    return build_tiny_export(tmp_path_factory, tiny_generated)


def test_soak_drill_swaps_without_errors(export_dir, tmp_path):
    from bench import bench_soak

    r = bench_soak.soak(export_dir, str(tmp_path), seconds=20, clients=2, swaps=1, think_ms=10, bad_rate=0.15,
                        rss_every=2, log=lambda m: None)

    for key in ("config", "requests", "requests_good", "requests_bad_deliberate", "requests_per_s", "per_kind",
                "unexpected_errors", "errors", "bad_requests", "latency", "swaps", "versions_seen",
                "final_version", "rss_mb", "text_cache", "server_metrics", "sigterm_exit_code", "targets"):
        assert key in r, key
    assert r["unexpected_errors"] == 0, r["errors"]
    assert r["requests_good"] > 20 and r["latency"]["p50_ms"] > 0 and r["latency"]["p99_ms"] >= r["latency"]["p50_ms"]
    assert {"serving_default", "serving_exclude", "user_embedding"} <= set(r["per_kind"])

    codes = r["bad_requests"]["codes"]
    assert r["bad_requests"]["sent"] > 0 and codes
    for case, got in codes.items():
        allowed = ("INVALID_ARGUMENT", "NOT_FOUND") if case == "unknown signature" else ("INVALID_ARGUMENT",)
        assert set(got) <= set(allowed), (case, got)

    (swap,) = r["swaps"]
    assert swap["version"] == 2 and swap["first_answer_s"] is not None and swap["failed_around"] == 0
    assert swap["first_answer_s"] >= swap["published_s"] and r["final_version"] == 2
    assert r["versions_seen"] == [1, 2]

    assert r["text_cache"]["hits"] > 0 and 0 < r["text_cache"]["hit_rate"] <= 1
    rss = r["rss_mb"]
    assert rss["after_warmup"]["mb"] > 0 and rss["end"]["mb"] > 0 and rss["growth_pct"] is not None
    assert r["sigterm_exit_code"] == 0
    # The swapped-out version was freed (nothing in the server kept it: serving/server/memory.py).
    log = (tmp_path / "soak-serve.log").read_text()
    assert "unloaded version 1" in log and "memory of the unloaded version(s) released" in log, log[-3000:]
    assert "still referenced" not in log
