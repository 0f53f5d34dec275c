"""Serving overhead and throughput: gRPC `segrec serve` vs in-process SavedModel, same run.

    python -m bench.bench_serving [--requests 200] [--threads 16] [--per-thread 25]

Builds a small run with the pretrained MiniLM encoder (`segrec generate`,
`preprocess --max-examples-per-user 2 --text-history 0`, `train --encoder
minilm --sequence-length 64`, 1 epoch) and exports it with a ScaNN index
(`--work-dir` keeps and reuses it). Then, with the same user inputs:

  (a) latency of ONE user's Predict: `--requests` sequential calls (after
      warm-up) of the SavedModel's serving_default in this process, and of
      RecommenderClient.recommend against `segrec serve` (a subprocess on a
      free 127.0.0.1 port) -> p50/p99 and the overhead ratio gRPC / in-process;
  (b) throughput: `--threads` client threads x `--per-thread` requests each
      against the server with batching on (--max-batch-size 64
      --batch-timeout-ms 5) and off (--max-batch-size 1) -> requests/s and
      the ratio; with batching on also with mixed knobs (each request its own
      k in 5..20 and beta in {0, 0.5, 1}), which share batches since k and
      beta are per-row inputs;
  (c) today's path vs now: the same throughput against the run exported
      with fixed padding (every text padded to 64 tokens, no text cache:
      today's path), with length-aware padding, and with length-aware
      padding + the text cache, for returning users and for texts never
      sent before -> requests/s and the ratio to today's path.

(a) and (b) run with the text cache off, so they time the model path.

Latency is measured against both server configurations: the batcher is
adaptive (a request that finds the model idle runs at once), so a lone
request should not pay for batching. Servers are stopped with SIGTERM.
Results go to bench/results/serving.md and serving.json. Not a test: nothing
asserts on time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench import machine

RESULTS = os.path.join(os.path.dirname(__file__), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, BETA = 10, 0.5
TEXTS = ["loves hiking and camping in the mountains", "plays guitar in a band on weekends",
         "cooks dinner for the family every day", "reads science fiction and fantasy novels",
         "runs marathons and tracks every workout", "collects vintage vinyl records",
         "builds furniture in a home workshop", "travels for work and likes podcasts"]


def _cli(args: list, log) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "trainer.cli"] + args, check=True, cwd=ROOT, stdout=log,
                   stderr=subprocess.STDOUT, timeout=1800)
    return round(time.perf_counter() - start, 1)


def build(work: str, users: int, items: int, interactions: int, index: str = "scann") -> tuple:
    """(version_dir, {step: seconds}) of a small generated MiniLM run exported with `index` (scann or
    brute_force) as version 1 under <work>/models; reused when done. bench_soak builds the same way."""
    version_dir = os.path.join(work, "models", "segrec", "1")
    done = os.path.join(work, "build.json")
    if os.path.exists(done):
        with open(done, encoding="utf-8") as f:
            return version_dir, dict(json.load(f), reused=True)
    raw, ds, run = (os.path.join(work, d) for d in ("raw", "ds", "run"))
    steps = {}
    with open(os.path.join(work, "build.log"), "w", encoding="utf-8") as log:
        steps["generate"] = _cli(["generate", "--output-dir", raw, "--size", "small", "--users", str(users),
                                  "--items", str(items), "--interactions", str(interactions)], log)
        steps["preprocess"] = _cli(["preprocess", "--input-dir", raw, "--output-dir", ds,
                                    "--max-examples-per-user", "2", "--text-history", "0"], log)
        steps["train"] = _cli(["train", "--dataset-dir", ds, "--output-dir", run, "--encoder", "minilm",
                               "--sequence-length", "64", "--epochs", "1", "--warmup-epochs", "0", "--quiet"], log)
        steps["export"] = _cli(["export", "--run-dir", run, "--base-path", os.path.join(work, "models"),
                                "--index", index, "--version", "1"], log)
    with open(done, "w", encoding="utf-8") as f:
        json.dump(steps, f)
    return version_dir, steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(target: str) -> bool:
    import grpc

    with grpc.insecure_channel(target) as ch:
        try:
            return ch.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=1) == b"\x08\x01"
        except grpc.RpcError:
            return False


def start_server(base: str, batch: int, timeout_ms: float, log_path: str, text_cache_size: int = 0):
    """`segrec serve` on a free port; the text cache is off unless asked (parts (a), (b) time the model)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "trainer.cli", "serve", "--model-base-path", base, "--host", "127.0.0.1",
           "--port", str(port), "--max-batch-size", str(batch), "--batch-timeout-ms", str(timeout_ms),
           "--text-cache-size", str(text_cache_size)]
    log = open(log_path, "w", encoding="utf-8")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    target = f"127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"segrec serve exited {proc.returncode}; see {log_path}")
        if _healthy(target):
            return proc, log, target
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"segrec serve not healthy in 180 s; see {log_path}")


def stop_server(proc, log) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait(10)
    log.close()
    return rc


def _pct(lat: list) -> dict:
    a = np.asarray(lat) * 1000.0
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "mean_ms": round(float(a.mean()), 2), "n": len(a)}


def time_calls(fn, n: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    lat = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - start)
    return _pct(lat)


def in_process_latency(version_dir: str, user: tuple, n: int, warmup: int) -> dict:
    import tensorflow as tf

    from serving.export import exporter as ex

    fn = ex.load_exported(version_dir).signatures["serving_default"]
    text, hist = user
    inputs = dict(user_text=tf.constant([text]), history_item_ids=tf.constant([hist], tf.string),
                  k=tf.constant([K], tf.int32), beta=tf.constant([BETA], tf.float32))

    def call():
        out = fn(**inputs)
        return {k: v.numpy() for k, v in out.items()}

    return time_calls(call, n, warmup)


def grpc_latency(target: str, user: tuple, n: int, warmup: int) -> dict:
    from serving.client import RecommenderClient

    with RecommenderClient(target, timeout=30) as client:
        return time_calls(lambda: client.recommend(user[0], user[1], k=K, beta=BETA), n, warmup)


def throughput(target: str, users: list, threads: int, per_thread: int, mixed: bool = False) -> dict:
    """mixed: request i asks for its own k (5..20) and beta (0, 0.5, 1) instead of K and BETA."""
    from serving.client import RecommenderClient

    def knobs(n: int) -> tuple:
        return (5 + n % 16, (0.0, 0.5, 1.0)[n % 3]) if mixed else (K, BETA)

    clients = [RecommenderClient(target, timeout=60) for _ in range(threads)]
    try:
        for c in clients:  # warm-up: channel connected, model warm
            c.recommend(users[0][0], users[0][1], k=K, beta=BETA)

        def worker(i):
            lat, errors = [], 0
            for j in range(per_thread):
                n = i * per_thread + j
                text, hist = users[n % len(users)]
                k, beta = knobs(n)
                start = time.perf_counter()
                try:
                    clients[i].recommend(text, hist, k=k, beta=beta)
                except Exception:  # noqa: BLE001  (counted, reported)
                    errors += 1
                lat.append(time.perf_counter() - start)
            return lat, errors

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(worker, range(threads)))
        seconds = time.perf_counter() - start
    finally:
        for c in clients:
            c.close()
    lat = [x for p, _ in parts for x in p]
    errors = sum(e for _, e in parts)
    total = threads * per_thread
    return {"requests": total, "errors": errors, "seconds": round(seconds, 2),
            "requests_per_s": round(total / seconds, 1), "latency": _pct(lat)}


def fixed_padding_export(work: str) -> str:
    """Today's path: the same run's weights with the encoder padding every text to sequence_length,
    exported (ScaNN) as version 1 of <work>/models-fixed; reused when done."""
    from bench.bench_text_tower import fixed_padding_run

    base = os.path.join(work, "models-fixed")
    if not os.path.exists(os.path.join(base, "segrec", "1", "export.json")):
        run = fixed_padding_run(os.path.join(work, "run"), os.path.join(work, "run-fixed-padding"))
        with open(os.path.join(work, "build.log"), "a", encoding="utf-8") as log:
            _cli(["export", "--run-dir", run, "--base-path", base, "--index", "scann", "--version", "1"], log)
    return base


# (c): today's path against the length-aware export, without and with the text cache.
PATHS = (("today: fixed padding, no cache", "fixed", 0), ("length-aware padding, no cache", "now", 0),
         ("length-aware padding + text cache", "now", 100_000))


def distinct_users(ids: list, n: int, seed: int = 1) -> list:
    """n requests, each with a text never sent before (a cache cannot help) and 3 history ids."""
    rng = np.random.default_rng(seed)
    return [(f"{TEXTS[i % len(TEXTS)]}, member {i}", [str(x) for x in rng.choice(ids, size=3, replace=False)])
            for i in range(n)]


def compare_paths(work: str, bases: dict, users: list, fresh: list, threads: int, per_thread: int) -> dict:
    """16-client throughput of each PATHS entry (batching on) with returning users and with new texts."""
    out = {}
    for name, which, cache in PATHS:
        proc, log, target = start_server(bases[which], 64, 5.0, os.path.join(work, f"serve-{which}-{cache}.log"),
                                         text_cache_size=cache)
        try:
            returning = throughput(target, users, threads, per_thread)
            new = throughput(target, fresh, threads, per_thread)
        finally:
            rc = stop_server(proc, log)
        out[name] = {"export": which, "text_cache_size": cache, "returning_users": returning, "new_texts": new,
                     "sigterm_exit_code": rc}
        print(f"{name}: returning {returning['requests_per_s']} req/s, new texts {new['requests_per_s']} req/s",
              flush=True)
    today = out[PATHS[0][0]]
    for r in out.values():
        for case in ("returning_users", "new_texts"):
            r[case]["ratio_vs_today"] = round(r[case]["requests_per_s"] / today[case]["requests_per_s"], 3)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=None, help="keep (and reuse) the run and export here")
    parser.add_argument("--users", type=int, default=600)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--interactions", type=int, default=15000)
    parser.add_argument("--requests", type=int, default=200, help="sequential single-user requests (latency)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--per-thread", type=int, default=25)
    parser.add_argument("--results-dir", default=RESULTS)
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    started = time.perf_counter()
    work = args.work_dir or tempfile.mkdtemp(prefix="segrec-bench-serving-")
    os.makedirs(work, exist_ok=True)
    version_dir, build_s = build(work, args.users, args.items, args.interactions)
    print(f"build: {build_s}", flush=True)
    base = os.path.join(work, "models")
    with open(os.path.join(version_dir, "model_card.md"), encoding="utf-8") as f:
        card = f.read()

    from serving.export import exporter as ex

    ids = [x.decode() for x in ex.load_exported(version_dir).item_id_table.numpy() if x]
    rng = np.random.default_rng(0)
    users = [(TEXTS[i % len(TEXTS)], [str(x) for x in rng.choice(ids, size=3, replace=False)]) for i in range(64)]
    one = users[0]

    result = {"benchmark": "serving overhead and throughput", "date": datetime.date.today().isoformat(),
              "machine": machine.describe(), "build_seconds": build_s, "k": K, "beta": BETA,
              "user": {"text": one[0], "history": one[1]}}
    result["in_process"] = in_process_latency(version_dir, one, args.requests, args.warmup)
    print(f"in-process serving_default: {result['in_process']}", flush=True)

    servers = {}
    for name, batch, timeout_ms in (("batching on (64, 5 ms)", 64, 5.0), ("batching off (1)", 1, 5.0)):
        proc, log, target = start_server(base, batch, timeout_ms, os.path.join(work, f"serve-{batch}.log"))
        try:
            lat = grpc_latency(target, one, args.requests, args.warmup)
            print(f"{name}: gRPC latency {lat}", flush=True)
            thr = throughput(target, users, args.threads, args.per_thread)
            print(f"{name}: throughput {thr}", flush=True)
            mixed = throughput(target, users, args.threads, args.per_thread, mixed=True) if batch > 1 else None
            if mixed:
                print(f"{name}: throughput, mixed k/beta {mixed}", flush=True)
        finally:
            rc = stop_server(proc, log)
        servers[name] = {"max_batch_size": batch, "batch_timeout_ms": timeout_ms, "latency": lat,
                         "throughput_mixed_knobs": mixed,
                         "latency_ratio_vs_in_process": round(lat["p50_ms"] / result["in_process"]["p50_ms"], 3),
                         "latency_p99_ratio_vs_in_process":
                             round(lat["p99_ms"] / result["in_process"]["p99_ms"], 3),
                         "throughput": thr, "sigterm_exit_code": rc}
    fresh = distinct_users(ids, args.threads * args.per_thread)
    result["paths"] = compare_paths(work, {"fixed": fixed_padding_export(work), "now": base}, users, fresh,
                                    args.threads, args.per_thread)
    on, off = servers["batching on (64, 5 ms)"], servers["batching off (1)"]
    result["servers"] = servers
    result["throughput_ratio_on_vs_off"] = round(on["throughput"]["requests_per_s"] /
                                                 off["throughput"]["requests_per_s"], 3)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_1m"] = {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)}
    result["index"] = [line for line in card.splitlines() if "ecall" in line or "ndex" in line][:4]

    ip = result["in_process"]
    lines = [
        "# Serving: gRPC overhead and server-side batching", "",
        f"`python -m bench.bench_serving`, {result['date']}, {result['seconds']}s in all (build: "
        + ", ".join(f"{k} {v}s" for k, v in build_s.items() if k != "reused")
        + ("; reused from an earlier run's --work-dir, not counted in the total" if build_s.get("reused") else "")
        + "). A small MiniLM run (pretrained encoder, "
        f"sequence length 64, 1 epoch; {args.users} users, {args.items} items, {args.interactions:,} "
        "interactions generated, preprocessed with --max-examples-per-user 2 --text-history 0) exported with "
        f"ScaNN. Requests: serving_default, k=[{K}], beta=[{BETA}] (per-row knobs), one user per request "
        "(text + 3 history ids). The batcher is adaptive: a request that finds the model idle runs at once, "
        "requests arriving while it is busy share the next call. "
        "Server: `segrec serve` subprocess on 127.0.0.1, stopped with SIGTERM; client: RecommenderClient "
        "(proto building and response parsing included).", "",
        machine.markdown(result["machine"]) + f"; 1-min load average {result['load_average_1m']['before']} "
        f"before, {result['load_average_1m']['after']} after.", "",
        f"## (a) One user, {args.requests} sequential requests after {args.warmup} warm-up", "",
        "| path | p50 ms | p99 ms | mean ms | p50 ratio vs in-process | p99 ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| in-process serving_default | {ip['p50_ms']} | {ip['p99_ms']} | {ip['mean_ms']} | 1.00x | 1.00x |",
    ]
    for name, s in servers.items():
        lat = s["latency"]
        lines.append(f"| gRPC, {name} | {lat['p50_ms']} | {lat['p99_ms']} | {lat['mean_ms']} | "
                     f"{s['latency_ratio_vs_in_process']:.2f}x | {s['latency_p99_ratio_vs_in_process']:.2f}x |")
    lines += ["", "Issue target: gRPC overhead <= 1.3x in-process (p50).", "",
              f"## (b) Throughput, {args.threads} client threads x {args.per_thread} requests", "",
              "| server | requests/s | ratio vs off | client p50 ms | client p99 ms | errors |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    rows = [(name, s["throughput"]) for name, s in servers.items()]
    rows += [(f"{name}, mixed k 5..20 / beta 0..1", s["throughput_mixed_knobs"]) for name, s in servers.items()
             if s["throughput_mixed_knobs"]]
    for name, t in rows:
        lines.append(f"| {name} | {t['requests_per_s']:,.1f} | "
                     f"{t['requests_per_s'] / off['throughput']['requests_per_s']:.2f}x | {t['latency']['p50_ms']} | "
                     f"{t['latency']['p99_ms']} | {t['errors']} |")
    n_req = args.threads * args.per_thread
    lines += ["", f"## (c) Today's path vs length-aware padding and the text cache, {args.threads} client threads "
              f"x {args.per_thread} requests, batching on (64, 5 ms)", "",
              "Today's path: the same weights exported with the encoder padding every text to the sequence length "
              "(64) and no text cache. Returning users: the 64 users above, cycled (8 distinct texts, so with the "
              f"cache nearly every request skips the encoder). New texts: {n_req} requests whose texts were never "
              "sent before (the cache cannot help; the gain is padding alone). Ratios are requests/s over today's "
              "path with the same traffic.", "",
              "| path | returning users req/s | ratio | p99 ms | new texts req/s | ratio | p99 ms | errors |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in result["paths"].items():
        ru, nt = r["returning_users"], r["new_texts"]
        lines.append(f"| {name} | {ru['requests_per_s']:,.1f} | {ru['ratio_vs_today']:.2f}x | {ru['latency']['p99_ms']} | "
                     f"{nt['requests_per_s']:,.1f} | {nt['ratio_vs_today']:.2f}x | {nt['latency']['p99_ms']} | "
                     f"{ru['errors'] + nt['errors']} |")
    lines += ["", "Issue target: 16-client throughput >= 2.5x today's path."]
    machine.write_results(args.results_dir, "serving", result, lines)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
