"""Soak drill for `segrec serve`: minutes of mixed traffic, two hot swaps, memory and cache watched.

    python -m bench.bench_soak [--minutes 10] [--clients 4] [--work-dir D]

Builds a small run with the pretrained MiniLM encoder (`segrec generate`,
`preprocess --max-examples-per-user 2 --text-history 0`, `train --encoder
minilm --sequence-length 64`, 1 epoch) and exports it with a brute-force
index (`--work-dir` keeps and reuses it). The drill (`soak()`, which takes
any prepared version dir, so tests/test_bench_soak.py runs it on a tiny
export):

  * copies the version dir to a fresh base path as version 1 and stages the
    next versions as hidden copies (`segrec/.tmp-<N>`, which the server's poll
    skips), each published at its time by `os.rename` into `segrec/<N>`, as
    `segrec export` publishes (serving/export/layout.py);
  * starts `segrec serve --text-cache-size 10000 --poll-seconds 1` on free
    127.0.0.1 ports (serving/server/launch.py's ServerProcess: gRPC, REST and
    Prometheus metrics) and waits until it is healthy;
  * runs `--clients` threads of closed-loop traffic for the duration (each
    with its own RecommenderClient, retries=0 so that no failure is hidden,
    and its own channel for raw Predict calls), a short `--think-ms` pause
    between requests: serving_default through the client with varied k
    (1..20) and beta (0..1), recommend_many (2-4 users, texts may repeat),
    recommend_defaults (raw), user_embedding (raw), serving_exclude through
    the client (when the export has it), GetModelStatus + GetModelMetadata
    (client.model_status). User texts come from a pool of 200 (repeated, so
    the text cache hits) or are new (a counter makes each unique);
  * at `--bad-rate` sends deliberately bad requests, counted apart: k as
    float32, user_text of rank 2, a missing input -> INVALID_ARGUMENT; an
    unknown signature -> INVALID_ARGUMENT (TF Serving's code) or NOT_FOUND.
    Any other outcome (including success) is an unexpected error;
  * publishes version 2, 3, ... at 1/(swaps+1), 2/(swaps+1), ... of the
    duration and finds, from each response's model_spec.version, when the
    server first answered from the new version and how many requests failed
    around the swap;
  * samples the server's RSS (psutil) every `--rss-every` seconds, scrapes
    the Prometheus metrics at the end (text cache hits, misses, entries;
    requests by code) and stops the server with SIGTERM (exit code recorded).

Records requests in all and per kind, unexpected errors (target 0), the bad
requests and their codes, p50/p99 latency overall and per kind, RSS after
warm-up (at min(60 s, 1/5 of the run)) vs at the end (target: < 10% growth),
the swaps and the cache hit rate. Targets are recorded, not asserted.
Writes bench/results/soak.{md,json} (`--results-name`). Not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import itertools
import json
import os
import random
import shutil
import tempfile
import time
import urllib.request

import numpy as np

from bench import machine
from bench.bench_serving import build  # the same small MiniLM run bench_serving measures

RESULTS = os.path.join(os.path.dirname(__file__), "results")
MODEL = "segrec"
TEXT_CACHE_SIZE = 10000
POLL_SECONDS = 1.0

ACTIVITIES = ["loves hiking and camping in the mountains", "plays guitar in a band on weekends",
              "cooks dinner for the family every day", "reads science fiction and fantasy novels",
              "runs marathons and tracks every workout", "collects vintage vinyl records",
              "builds furniture in a home workshop", "travels for work and likes podcasts",
              "watches old westerns on sundays", "grows tomatoes and herbs on a balcony"]
PEOPLE = ["student", "retired teacher", "nurse", "software engineer", "farmer", "artist", "lawyer",
          "mechanic", "chef", "librarian", "pilot", "parent of two", "musician", "photographer",
          "carpenter", "scientist", "writer", "accountant", "designer", "firefighter"]
WORDS = ["jazz", "cats", "chess", "baking", "cycling", "horror films", "opera", "gardening", "poetry",
         "surfing", "comics", "astronomy", "yoga", "football", "knitting", "history", "robots", "sailing"]

# kind -> relative weight of the good traffic (exclude only when the export has serving_exclude).
MIX = {"serving_default": 0.35, "recommend_many": 0.10, "recommend_defaults": 0.10, "user_embedding": 0.15,
       "serving_exclude": 0.25, "model_status": 0.05}
# deliberate bad request -> the codes that count as right.
BAD = {"k wrong dtype": ("INVALID_ARGUMENT",), "user_text wrong shape": ("INVALID_ARGUMENT",),
       "missing input": ("INVALID_ARGUMENT",), "unknown signature": ("INVALID_ARGUMENT", "NOT_FOUND")}


# --- the run and its export ------------------------------------------------------------------------
def stage_versions(version_dir: str, base: str, versions: int) -> list:
    """A fresh <base>/segrec/1 (a copy of version_dir) and hidden copies .tmp-2 .. .tmp-<versions>,
    ready to publish; returns the hidden dirs in order."""
    model_dir = os.path.join(base, MODEL)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.makedirs(model_dir)
    shutil.copytree(version_dir, os.path.join(model_dir, "1"))
    staged = []
    for v in range(2, versions + 1):
        tmp = os.path.join(model_dir, f".tmp-{v}")
        shutil.copytree(version_dir, tmp)
        staged.append(tmp)
    return staged


def publish(tmp: str) -> int:
    """Renames a staged .tmp-<N> dir into place as version N (atomic, as `segrec export` publishes)."""
    version = int(os.path.basename(tmp).rsplit("-", 1)[1])
    os.rename(tmp, os.path.join(os.path.dirname(tmp), str(version)))
    return version


# --- traffic -----------------------------------------------------------------------------------------
class Traffic:
    """What one client thread sends: good requests of every kind, and the deliberate bad ones."""

    def __init__(self, target: str, ids: list, signatures: set, bad_rate: float, seed: int, counter):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        from serving.client import RecommenderClient

        self.client = RecommenderClient(target, timeout=60, retries=0)
        self.channel = grpc.insecure_channel(target)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.ids, self.bad_rate = ids, bad_rate
        self.rng = random.Random(seed)
        self.counter = counter
        mix = {k: w for k, w in MIX.items() if k != "serving_exclude" or "serving_exclude" in signatures}
        self.kinds, self.weights = list(mix), list(mix.values())

    def close(self) -> None:
        self.client.close()
        self.channel.close()

    # user inputs
    def text(self) -> tuple:
        """(text, repeated?): 75% from the pool of 200 (cache hits), 25% never sent before."""
        r = self.rng
        if r.random() < 0.75:
            i = r.randrange(200)
            return f"{PEOPLE[i % len(PEOPLE)]} who {ACTIVITIES[i // len(PEOPLE)]}", True
        n = next(self.counter)
        return f"{r.choice(PEOPLE)} who {r.choice(ACTIVITIES)} and likes {r.choice(WORDS)} (visitor {n})", False

    def history(self, most: int = 5) -> list:
        return self.rng.sample(self.ids, self.rng.randint(0, most))

    def k_beta(self) -> tuple:
        return self.rng.randint(1, 20), self.rng.choice([0.0, 0.25, 0.5, 0.75, 1.0])

    def _request(self, signature: str, texts: list, hists: list, k=None, beta=None):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        from serving.client import _padded
        from trainer import features as F

        req = predict_pb2.PredictRequest()
        req.model_spec.name = MODEL
        req.model_spec.signature_name = signature
        req.inputs[F.USER_TEXT].CopyFrom(tf.make_tensor_proto(np.array(texts, dtype=object)))
        req.inputs[F.HISTORY_ITEM_IDS].CopyFrom(tf.make_tensor_proto(_padded(hists)))
        if k is not None:
            req.inputs[F.K].CopyFrom(tf.make_tensor_proto(np.full(len(texts), k, np.int32)))
            req.inputs[F.BETA].CopyFrom(tf.make_tensor_proto(np.full(len(texts), beta, np.float32)))
        return req

    def good(self) -> tuple:
        """Sends one good request: (kind, model version answered or None, texts sent, of them repeated)."""
        kind = self.rng.choices(self.kinds, self.weights)[0]
        c = self.client
        if kind == "model_status":
            c.model_status()
            return kind, None, 0, 0
        if kind == "recommend_many":
            users = [(self.text(), self.history()) for _ in range(self.rng.randint(2, 4))]
            k, beta = self.k_beta()
            recs = c.recommend_many([(t, h) for (t, _), h in users], k=k, beta=beta)
            return kind, recs[0].model_version, len(users), sum(rep for (_, rep), _ in users)
        (text, rep), hist = self.text(), self.history()
        if kind == "serving_default":
            k, beta = self.k_beta()
            return kind, c.recommend(text, hist, k=k, beta=beta).model_version, 1, rep
        if kind == "serving_exclude":
            k, beta = self.k_beta()
            exclude = self.rng.sample(self.ids, self.rng.randint(1, 30))
            return kind, c.recommend(text, hist, k=k, beta=beta, exclude=exclude).model_version, 1, rep
        req = self._request(kind, [text], [hist])  # recommend_defaults, user_embedding: raw Predict
        response = self.stub.Predict(req, timeout=60)
        return kind, response.model_spec.version.value, 1, rep

    def bad(self) -> tuple:
        """Sends one deliberately bad request: (case, the gRPC code it got, or "OK" if it succeeded)."""
        import grpc
        import tensorflow as tf

        from trainer import features as F

        case = self.rng.choice(list(BAD))
        (text, _), hist = self.text(), self.history()
        req = self._request("serving_default", [text, text], [hist, hist], k=5, beta=0.5)
        if case == "k wrong dtype":
            req.inputs[F.K].CopyFrom(tf.make_tensor_proto(np.array([5.0, 5.0], np.float32)))
        elif case == "user_text wrong shape":
            req.inputs[F.USER_TEXT].CopyFrom(tf.make_tensor_proto(np.array([[text], [text]], dtype=object)))
        elif case == "missing input":
            req.inputs.pop(F.HISTORY_ITEM_IDS)
        else:
            req.model_spec.signature_name = "no_such_signature"
        try:
            self.stub.Predict(req, timeout=60)
            return case, "OK"
        except grpc.RpcError as err:
            return case, err.code().name


def _error_code(err: Exception) -> str:
    code = getattr(err, "code", None)
    code = code() if callable(code) else code
    return getattr(code, "name", None) or type(err).__name__


def client_loop(traffic: Traffic, t0: float, stop_at: float, think_s: float, records: list) -> None:
    """Closed loop until stop_at: each record (kind, start s since t0, latency s, version, outcome, texts, repeated)."""
    while True:
        start = time.perf_counter()
        if start >= stop_at:
            return
        if traffic.rng.random() < traffic.bad_rate:
            case, code = traffic.bad()
            records.append(("bad:" + case, start - t0, time.perf_counter() - start, None, code, 0, 0))
        else:
            try:
                kind, version, texts, repeated = traffic.good()
                records.append((kind, start - t0, time.perf_counter() - start, version, "OK", texts, repeated))
            except Exception as err:  # noqa: BLE001  (every failure is counted and reported)
                records.append(("error", start - t0, time.perf_counter() - start, None,
                                f"{_error_code(err)}: {str(err)[:300]}", 0, 0))
        if think_s:
            time.sleep(think_s)


# --- watching the server -------------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    try:
        import psutil

        return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    except ImportError:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def scrape(url: str) -> dict:
    """The Prometheus text exposition -> {"name{labels}": value} (comments dropped)."""
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def _pct(lat) -> dict:
    a = np.asarray(lat, dtype=float) * 1000.0
    if not len(a):
        return {"n": 0}
    return {"n": int(len(a)), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "max_ms": round(float(a.max()), 2)}


# --- the drill -------------------------------------------------------------------------------------------
def soak(version_dir: str, work: str, seconds: float, clients: int = 4, swaps: int = 2, think_ms: float = 20.0,
         bad_rate: float = 0.02, rss_every: float = 5.0, warmup_s: float = None, server_args=(),
         log=print) -> dict:
    """The drill over a prepared export version dir; returns the results dict (nothing written)."""
    from serving.export import layout
    from serving.server.launch import ServerProcess

    warmup_s = min(60.0, seconds / 5) if warmup_s is None else warmup_s
    base = os.path.join(work, "soak_base")
    staged = stage_versions(version_dir, base, swaps + 1)
    info = layout.read_export_info(version_dir)
    signatures = set(info.get("signatures") or [])
    loaded = layout.load_exported(version_dir)
    ids = [x.decode() for x in loaded.item_id_table.numpy() if x]
    del loaded

    flags = ["--text-cache-size", TEXT_CACHE_SIZE, "--poll-seconds", POLL_SECONDS, *server_args]
    server = ServerProcess(base, log_path=os.path.join(work, "soak-serve.log"), extra_args=flags)
    started = time.perf_counter()
    server.start()
    startup_s = round(time.perf_counter() - started, 1)
    pid = server.proc.pid
    log(f"server up in {startup_s}s (pid {pid}, {server.target}); {clients} clients for {seconds:.0f}s")
    counter = itertools.count()  # numbers the new texts; next() on it is atomic under the GIL
    traffics = [Traffic(server.target, ids, signatures, bad_rate, seed=i, counter=counter) for i in range(clients)]
    records = [[] for _ in range(clients)]
    rss, swap_log, metrics, exit_code = [], [], {}, None
    try:
        for tr in traffics:  # connected and warm before the clock starts
            tr.client.recommend(ACTIVITIES[0], [], k=5, beta=0.5)
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        swap_at = [seconds * (i + 1) / (swaps + 1) for i in range(swaps)]
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(client_loop, tr, t0, stop_at, think_ms / 1000.0, rec)
                       for tr, rec in zip(traffics, records)]
            next_rss = 0.0
            while time.perf_counter() < stop_at:
                now = time.perf_counter() - t0
                if now >= next_rss:
                    rss.append((round(now, 1), rss_mb(pid)))
                    next_rss += rss_every
                if swap_at and now >= swap_at[0]:
                    swap_at.pop(0)
                    tmp = staged[len(swap_log)]
                    at = time.perf_counter() - t0
                    version = publish(tmp)
                    swap_log.append({"version": version, "published_s": round(at, 2)})
                    log(f"{at:.1f}s: published version {version}")
                time.sleep(0.2)
            for f in futures:
                f.result()
        rss.append((round(time.perf_counter() - t0, 1), rss_mb(pid)))
        metrics = scrape(server.metrics_url)
    finally:
        for tr in traffics:
            tr.close()
        exit_code = server.stop(60) if server.running() else (server.proc.returncode if server.proc else None)
    log(f"server stopped: exit code {exit_code}")
    return summarise([r for part in records for r in part], rss, swap_log, metrics, exit_code, dict(
        seconds=seconds, clients=clients, swaps=swaps, think_ms=think_ms, bad_rate=bad_rate,
        warmup_s=warmup_s, rss_every_s=rss_every, startup_s=startup_s, text_cache_size=TEXT_CACHE_SIZE,
        poll_seconds=POLL_SECONDS, server_flags=[str(a) for a in flags], signatures=sorted(signatures),
        index=info.get("index"), num_items=info.get("num_items"), text_input=info.get("text_input"),
        serving_exclude="serving_exclude" in signatures))


def summarise(records: list, rss: list, swap_log: list, metrics: dict, exit_code, config: dict) -> dict:
    good = [r for r in records if r[4] == "OK" and not r[0].startswith("bad:")]
    bad = [r for r in records if r[0].startswith("bad:")]
    errors = [r for r in records if r[0] == "error"]
    bad_wrong = [r for r in bad if r[4] not in BAD[r[0][4:]]]
    kinds = sorted({r[0] for r in good})
    per_kind = {k: {"requests": sum(1 for r in good if r[0] == k), "latency": _pct([r[2] for r in good if r[0] == k])}
                for k in kinds}
    bad_codes: dict = {}
    for r in bad:
        bad_codes.setdefault(r[0][4:], {}).setdefault(r[4], 0)
        bad_codes[r[0][4:]][r[4]] += 1
    error_kinds: dict = {}
    for r in errors:
        error_kinds[r[4].split(":")[0]] = error_kinds.get(r[4].split(":")[0], 0) + 1

    versioned = sorted((r[1] + r[2], r[3]) for r in good if r[3])  # (answered at, version)
    swaps = []
    for i, s in enumerate(swap_log):
        v, at = s["version"], s["published_s"]
        first = next((t for t, ver in versioned if ver >= v and t >= at), None)
        until = swap_log[i + 1]["published_s"] if i + 1 < len(swap_log) else float("inf")
        window_end = (first if first is not None else at) + 10.0
        in_window = [r for r in records if at - 5.0 <= r[1] <= window_end and r[1] < until]
        swaps.append(dict(s, first_answer_s=None if first is None else round(first, 2),
                          lag_s=None if first is None else round(first - at, 2),
                          requests_around=len(in_window),
                          failed_around=sum(1 for r in in_window if r[0] == "error"),
                          older_answers_after=sum(1 for t, ver in versioned if first is not None and t > first
                                                  and ver < v and t < until)))
    versions_seen = sorted({ver for _, ver in versioned})
    # RSS around each swap: the last sample before it is published vs the last before the next (or the end).
    for i, s in enumerate(swaps):
        until = swaps[i + 1]["published_s"] if i + 1 < len(swaps) else float("inf")
        before = [m for t, m in rss if t <= s["published_s"]]
        settled = [m for t, m in rss if s["published_s"] < t < until]
        if before and settled:
            s.update(rss_before_mb=before[-1], rss_settled_mb=settled[-1],
                     rss_step_mb=round(settled[-1] - before[-1], 1))

    end_s = max([r[1] + r[2] for r in records], default=0.0)
    warm = next(((t, m) for t, m in rss if t >= config["warmup_s"]), rss[-1] if rss else (None, None))
    last = rss[-1] if rss else (None, None)
    growth = round(100.0 * (last[1] - warm[1]) / warm[1], 2) if warm[1] else None
    # Growth that no swap explains: the end minus the warm-up sample minus the steps of the swaps after it.
    steps = [s["rss_step_mb"] for s in swaps if "rss_step_mb" in s and warm[0] is not None
             and s["published_s"] >= warm[0]]
    steady = round(100.0 * (last[1] - warm[1] - sum(steps)) / warm[1], 2) if warm[1] else None
    hits = metrics.get("segrec_text_cache_hits_total", 0.0)
    misses = metrics.get("segrec_text_cache_misses_total", 0.0)
    texts = sum(r[5] for r in good)
    repeated = sum(r[6] for r in good if r[0] in ("serving_default", "serving_exclude", "recommend_many",
                                                    "recommend_defaults"))
    cached_kinds = sum(r[5] for r in good if r[0] in ("serving_default", "serving_exclude", "recommend_many",
                                                       "recommend_defaults"))
    return {
        "config": config,
        "requests": len(records), "requests_good": len(good), "requests_bad_deliberate": len(bad),
        "requests_per_s": round(len(records) / end_s, 2) if end_s else None,
        "per_kind": per_kind,
        "unexpected_errors": len(errors) + len(bad_wrong),
        "errors": {"failed_good_requests": len(errors), "by_code": error_kinds,
                   "examples": [r[4] for r in errors[:5]],
                   "bad_requests_with_wrong_code": len(bad_wrong),
                   "wrong_code_examples": [f"{r[0][4:]}: {r[4]}" for r in bad_wrong[:5]]},
        "bad_requests": {"sent": len(bad), "codes": bad_codes, "expected": {k: list(v) for k, v in BAD.items()},
                         "latency": _pct([r[2] for r in bad])},
        "latency": _pct([r[2] for r in good]),
        "swaps": swaps, "versions_seen": versions_seen,
        "final_version": versioned[-1][1] if versioned else None,
        "rss_mb": {"samples": rss, "after_warmup": {"t_s": warm[0], "mb": warm[1]},
                   "end": {"t_s": last[0], "mb": last[1]}, "max": max((m for _, m in rss), default=None),
                   "growth_pct": growth, "swap_steps_mb": steps, "growth_pct_without_swap_steps": steady},
        "text_cache": {"hits": hits, "misses": misses,
                       "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
                       "entries_at_end": metrics.get("segrec_text_cache_entries"),
                       "rows_sent_through_cache": cached_kinds, "of_them_from_repeated_pool": repeated,
                       "user_texts_sent": texts},
        "server_metrics": {k: v for k, v in metrics.items() if k.startswith(("segrec_requests_total",
                                                                            "segrec_loaded_version",
                                                                            "segrec_text_cache"))},
        "sigterm_exit_code": exit_code,
        "targets": {"unexpected_errors": 0, "rss_growth_pct_below": 10.0,
                    "met": {"unexpected_errors": len(errors) + len(bad_wrong) == 0,
                            "rss_growth": growth is not None and growth < 10.0,
                            "sigterm_exit_0": exit_code == 0}},
    }


# --- the report -------------------------------------------------------------------------------------------
def markdown(result: dict, args) -> list:
    c, lat, rssd, tcache = result["config"], result["latency"], result["rss_mb"], result["text_cache"]
    build_s = result["build_seconds"]
    swaps = "; ".join(f"version {s['version']} published at {s['published_s']}s, first answered at "
                      f"{s['first_answer_s']}s (lag {s['lag_s']}s), {s['failed_around']} of "
                      f"{s['requests_around']} requests around it failed" for s in result["swaps"])
    lines = [
        "# Soak drill: `segrec serve` under mixed traffic and hot swaps", "",
        "## What was run", "",
        f"`python -m bench.bench_soak --minutes {args.minutes:g} --clients {args.clients}"
        + (f" --swaps {args.swaps}" if args.swaps != 2 else "") + (f" --think-ms {args.think_ms:g}" if args.think_ms != 20
                                                                    else "")
        + (f" --results-name {args.results_name}" if args.results_name != "soak" else "") + f"`, {result['date']}, "
        f"{result['seconds']}s in all (build: "
        + ", ".join(f"{k} {v}s" for k, v in build_s.items() if k != "reused")
        + ("; reused from an earlier run's --work-dir" if build_s.get("reused") else "") + "). "
        f"A small MiniLM run (pretrained encoder, sequence length 64, 1 epoch; {args.users} users, {args.items} "
        f"items, {args.interactions:,} interactions generated, preprocessed with --max-examples-per-user 2 "
        f"--text-history 0) exported with a brute-force index ({c['num_items']} items), copied to a fresh base "
        f"path as version 1, with versions 2..{c['swaps'] + 1} staged as hidden `.tmp-<N>` copies and published by "
        "`os.rename` during the run (as `segrec export` publishes). "
        f"`segrec serve {' '.join(c['server_flags'])}` ran as a subprocess on 127.0.0.1 (free gRPC, REST and "
        f"metrics ports; up and healthy in {c['startup_s']}s). {c['clients']} client threads sent closed-loop "
        f"traffic for {c['seconds']:.0f}s with {c['think_ms']:g} ms between requests: serving_default and "
        "serving_exclude through RecommenderClient (retries off, so nothing is hidden) with k 1..20 and beta "
        "0..1, recommend_many (2-4 users), recommend_defaults and user_embedding as raw Predict calls, "
        "model_status (GetModelStatus + GetModelMetadata); 75% of user texts from a pool of 200 (the text cache "
        f"hits), 25% new; {100 * c['bad_rate']:g}% deliberately bad requests (k as float32, user_text of rank 2, "
        "a missing input, an unknown signature). The server's RSS was sampled every "
        f"{c['rss_every_s']:g}s (psutil), its Prometheus metrics scraped at the end, and it was stopped with "
        "SIGTERM. The machine was busy: 2 cores shared with a long quality benchmark running at the same time, "
        "so latencies and the request rate are those of a loaded machine, not of this server alone.", "",
        machine.markdown(result["machine"]) + f"; 1-min load average {result['load_average_1m']['before']} "
        f"before, {result['load_average_1m']['after']} after.", "",
        "## Results", "",
        "| what | value | target |", "| --- | ---: | --- |",
        f"| requests | {result['requests']:,} ({result['requests_per_s']}/s) | |",
        f"| good requests | {result['requests_good']:,} | |",
        f"| unexpected errors | {result['unexpected_errors']} | 0 |",
        f"| deliberate bad requests | {result['bad_requests']['sent']} (all with the expected code: "
        f"{'yes' if not result['errors']['bad_requests_with_wrong_code'] else 'no'}) | INVALID_ARGUMENT |",
        f"| latency p50 / p99 (good requests) | {lat.get('p50_ms')} / {lat.get('p99_ms')} ms | |",
        f"| RSS after warm-up ({rssd['after_warmup']['t_s']}s) -> end ({rssd['end']['t_s']}s) | "
        f"{rssd['after_warmup']['mb']} -> {rssd['end']['mb']} MiB (max {rssd['max']}) | |",
        f"| RSS growth after warm-up | {rssd['growth_pct']}% | < 10% |",
        f"| of it, the steps at the swaps | {' + '.join(f'{x:g}' for x in rssd['swap_steps_mb']) or '-'} MiB; "
        f"growth without them {rssd['growth_pct_without_swap_steps']}% | |",
        f"| text cache hit rate | {tcache['hit_rate']} ({tcache['hits']:.0f} hits, {tcache['misses']:.0f} misses, "
        f"{tcache['entries_at_end']:.0f} entries at the end) | |",
        f"| versions answered | {result['versions_seen']} (last: {result['final_version']}) | |",
        f"| SIGTERM exit code | {result['sigterm_exit_code']} | 0 |", "",
        "## Per kind", "",
        "| kind | requests | p50 ms | p99 ms | max ms |", "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, d in result["per_kind"].items():
        lt = d["latency"]
        lines.append(f"| {kind} | {d['requests']:,} | {lt['p50_ms']} | {lt['p99_ms']} | {lt['max_ms']} |")
    bl = result["bad_requests"]["latency"]
    lines.append(f"| deliberate bad requests | {result['bad_requests']['sent']} | {bl.get('p50_ms')} | "
                 f"{bl.get('p99_ms')} | {bl.get('max_ms')} |")
    lines += ["", "## Deliberate bad requests", "", "| case | codes received | expected |", "| --- | --- | --- |"]
    for case, codes in sorted(result["bad_requests"]["codes"].items()):
        got = ", ".join(f"{code} x{n}" for code, n in sorted(codes.items()))
        lines.append(f"| {case} | {got} | {' or '.join(BAD[case])} |")
    lines += ["", "## Hot swaps", "",
              "| version | published at | first answered at | lag | requests around (-5 s .. +10 s) | failed | "
              "older-version answers after | RSS before -> settled (MiB) |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in result["swaps"]:
        lines.append(f"| {s['version']} | {s['published_s']}s | {s['first_answer_s']}s | {s['lag_s']}s | "
                     f"{s['requests_around']} | {s['failed_around']} | {s['older_answers_after']} | "
                     f"{s.get('rss_before_mb')} -> {s.get('rss_settled_mb')} ({s.get('rss_step_mb', 0):+g}) |")
    lines += ["", f"Swaps: {swaps}. The lag is the server's poll ({c['poll_seconds']:g}s) plus loading the "
              "version off the request path; requests in flight at the swap finish on the old version.", "",
              "## Server RSS (MiB) over time", "",
              " ".join(f"{t:g}s:{m:g}" for t, m in rssd["samples"]), ""]
    if result["errors"]["examples"] or result["errors"]["wrong_code_examples"]:
        lines += ["## Unexpected errors", ""] + [f"- {e}" for e in result["errors"]["examples"]
                                                 + result["errors"]["wrong_code_examples"]] + [""]
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--swaps", type=int, default=2)
    parser.add_argument("--think-ms", type=float, default=20.0, help="each client's pause between requests")
    parser.add_argument("--bad-rate", type=float, default=0.02, help="share of deliberately bad requests")
    parser.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--work-dir", default=None, help="keep (and reuse) the run and export here")
    parser.add_argument("--users", type=int, default=600)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--interactions", type=int, default=15000)
    parser.add_argument("--results-dir", default=RESULTS)
    parser.add_argument("--results-name", default="soak", help="writes <results-dir>/<name>.{md,json}")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    started = time.perf_counter()
    work = args.work_dir or tempfile.mkdtemp(prefix="segrec-bench-soak-")
    os.makedirs(work, exist_ok=True)
    version_dir, build_s = build(work, args.users, args.items, args.interactions, index="brute_force")
    print(f"build: {build_s}", flush=True)
    drill = soak(version_dir, work, args.minutes * 60.0, args.clients, args.swaps, args.think_ms, args.bad_rate,
                 args.rss_every, log=lambda m: print(m, flush=True))
    result = {"benchmark": "serving soak drill", "date": datetime.date.today().isoformat(),
              "machine": machine.describe(), "build_seconds": build_s, **drill,
              "seconds": round(time.perf_counter() - started, 1),
              "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)}}
    machine.write_results(args.results_dir, args.results_name, result, markdown(result, args))
    print(json.dumps({k: result[k] for k in ("requests", "unexpected_errors", "latency", "swaps",
                                             "sigterm_exit_code")}, default=str), flush=True)
    print(f"rss: {result['rss_mb']['after_warmup']} -> {result['rss_mb']['end']} ({result['rss_mb']['growth_pct']}%)"
          f"; text cache: {result['text_cache']}", flush=True)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
