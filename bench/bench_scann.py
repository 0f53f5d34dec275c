"""ScaNN vs brute-force retrieval: queries/s, recall@10 and build time, same run.

    python -m bench.bench_scann [--sizes 100000,1000000] [--queries 1000]

Synthetic clustered catalogs (unit vectors, d=64, drawn around `--centers`
random unit Gaussian centers with per-dimension noise `--noise`, then
renormalised); queries are drawn the same way (other samples). For each
catalog size both `serving.export.index` indexes are built (BruteForceIndex: TF
matmul + top_k; ScannIndex with ScannParams.for_catalog), the ScaNN index is
tuned with `tune_leaves` to recall@10 >= `--target-recall` on separate tuning
queries, then both are timed on the same `--queries` test queries, batched
(`--batch`) and one query per call (`--single-queries` of them), through the
traced `search` a SavedModel would hold. Recall@10 is measured on the test
queries against exact numpy top-10. Results (with ScaNN qps / brute-force qps)
go to bench/results/scann.md and scann.json. Not a test: nothing asserts on
time.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import time

import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from bench import machine
from serving.export import index as ix

RESULTS = os.path.join(os.path.dirname(__file__), "results")
K = 10


def clustered(n: int, centers: np.ndarray, noise: float, rng: np.random.Generator, chunk: int = 100_000) -> np.ndarray:
    """n unit vectors around random rows of `centers`, float32, built in chunks."""
    out = np.empty((n, centers.shape[1]), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = centers[rng.integers(0, len(centers), m)] + rng.normal(0, noise, (m, centers.shape[1])).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s : s + m] = x
    return out


def exact_top(queries: np.ndarray, emb: np.ndarray, k: int, chunk: int = 64) -> np.ndarray:
    """ix.exact_top_k in query chunks (a 1000 x 1M score matrix would be 4 GB)."""
    return np.concatenate([ix.exact_top_k(queries[s : s + chunk], emb, k) for s in range(0, len(queries), chunk)])


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(g.tolist()) & set(t.tolist())) for g, t in zip(got, truth))
    return hits / float(truth.size)


def traced(index, dim: int):
    return tf.function(index.search, input_signature=[tf.TensorSpec([None, dim], tf.float32),
                                                      tf.TensorSpec([], tf.int32)])


def time_search(search, queries: np.ndarray, batch: int, limit: int = None, repeats: int = 1) -> tuple:
    """(queries/s, indices [Q, K], seconds) over queries[:limit] in batches of `batch` (after one warm-up
    call); with repeats > 1 the pass is repeated and the median pass counts."""
    q = queries[:limit] if limit else queries
    k = tf.constant(K, tf.int32)
    search(tf.constant(q[:batch]), k)  # warm-up
    passes = []
    for _ in range(max(1, repeats)):
        got = []
        start = time.perf_counter()
        for s in range(0, len(q), batch):
            _, idx = search(tf.constant(q[s : s + batch]), k)
            got.append(idx.numpy())
        passes.append(time.perf_counter() - start)
    seconds = float(np.median(passes))
    return len(q) / seconds, np.concatenate(got), seconds


def bench_size(n: int, args, rng, centers) -> dict:
    t0 = time.perf_counter()
    emb = clustered(n, centers, args.noise, rng)
    test_q = clustered(args.queries, centers, args.noise, rng)
    tune_q = clustered(args.tune_queries, centers, args.noise, rng)
    truth = exact_top(test_q, emb, K)
    print(f"[{n:,}] data + exact top-{K}: {time.perf_counter() - t0:.1f}s", flush=True)

    res = {"items": n}
    start = time.perf_counter()
    bf = ix.BruteForceIndex(emb)
    res["brute_force_build_s"] = round(time.perf_counter() - start, 2)
    bf_search = traced(bf, emb.shape[1])
    bf_qps, bf_got, _ = time_search(bf_search, test_q, args.batch, repeats=args.repeats)
    bf_qps1, bf_got1, _ = time_search(bf_search, test_q, 1, args.single_queries)
    res["brute_force"] = {"qps_batched": round(bf_qps, 1), "qps_single": round(bf_qps1, 1),
                          "recall_at_10": round(recall(bf_got, truth), 4)}
    print(f"[{n:,}] brute force: {bf_qps:,.0f} q/s batched, {bf_qps1:,.0f} q/s single", flush=True)
    del bf, bf_search
    gc.collect()

    params = ix.ScannParams.for_catalog(n, k_max=100)
    start = time.perf_counter()
    sc = ix.ScannIndex(emb, params)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    tune_recall = ix.tune_leaves(sc, tune_q, emb, args.target_recall, k=K)
    tune_s = time.perf_counter() - start
    leaves = int(sc.leaves_to_search.numpy())
    print(f"[{n:,}] ScaNN build {build_s:.1f}s ({params.describe()}), tuned to {leaves} leaves "
          f"(tuning recall {tune_recall:.4f}) in {tune_s:.1f}s", flush=True)
    sc_search = traced(sc, emb.shape[1])
    sc_qps, sc_got, _ = time_search(sc_search, test_q, args.batch, repeats=args.repeats)
    sc_qps1, sc_got1, _ = time_search(sc_search, test_q, 1, args.single_queries)
    sc_recall = recall(sc_got, truth)
    res["scann"] = {
        "params": params.describe(), "num_leaves": params.num_leaves, "leaves_to_search": leaves,
        "build_s": round(build_s, 2), "tune_s": round(tune_s, 2), "tune_recall_at_10": round(tune_recall, 4),
        "qps_batched": round(sc_qps, 1), "qps_single": round(sc_qps1, 1),
        "recall_at_10": round(sc_recall, 4),
        "recall_at_10_single": round(recall(sc_got1, truth[: len(sc_got1)]), 4),
    }
    res["ratio_batched"] = round(sc_qps / bf_qps, 2)
    res["ratio_single"] = round(sc_qps1 / bf_qps1, 2)
    res["target_met"] = bool(sc_recall >= args.target_recall and res["ratio_batched"] >= args.target_ratio)
    print(f"[{n:,}] ScaNN: {sc_qps:,.0f} q/s batched ({res['ratio_batched']}x), {sc_qps1:,.0f} q/s single "
          f"({res['ratio_single']}x), recall@10 {sc_recall:.4f}", flush=True)
    # For reference (not what tune_leaves picks): recall and batched q/s at other leaves_to_search.
    sweep = []
    for leaves_s in sorted({max(1, params.num_leaves // d) for d in (200, 100, 50, 20, 10, 5)}):
        sc.leaves_to_search.assign(leaves_s)
        qps, got, _ = time_search(sc_search, test_q, args.batch, repeats=args.repeats)
        sweep.append({"leaves_to_search": leaves_s, "recall_at_10": round(recall(got, truth), 4),
                      "qps_batched": round(qps, 1), "ratio_batched": round(qps / bf_qps, 2)})
        print(f"[{n:,}]   sweep: {sweep[-1]}", flush=True)
    sc.leaves_to_search.assign(leaves)
    res["scann_leaves_sweep"] = sweep
    del sc, sc_search, emb
    gc.collect()
    return res


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated catalog sizes")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--centers", type=int, default=1000, help="Gaussian cluster centers of the synthetic data")
    parser.add_argument("--noise", type=float, default=0.1, help="per-dimension std around a center")
    parser.add_argument("--queries", type=int, default=1000, help="test queries (recall and batched qps)")
    parser.add_argument("--single-queries", type=int, default=200, help="queries timed one per call")
    parser.add_argument("--tune-queries", type=int, default=500, help="separate queries for tune_leaves")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="batched passes over the test queries; median counts")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--target-ratio", type=float, default=20.0, help="issue target: ScaNN qps / brute-force qps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", default=RESULTS)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    centers = rng.normal(size=(args.centers, args.dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    runs = [bench_size(int(n), args, rng, centers) for n in args.sizes.split(",")]
    total = round(time.perf_counter() - started, 1)
    result = {"benchmark": "ScaNN vs brute force", "date": datetime.date.today().isoformat(),
              "data": f"clustered unit vectors: {args.centers} Gaussian centers, noise std {args.noise}/dim, "
                      f"d={args.dim}; queries drawn the same way",
              "queries": args.queries, "single_queries": args.single_queries, "tune_queries": args.tune_queries,
              "batch": args.batch, "k": K, "target": {"recall": args.target_recall, "ratio": args.target_ratio},
              "tf_threads": {"intra": tf.config.threading.get_intra_op_parallelism_threads(),
                             "inter": tf.config.threading.get_inter_op_parallelism_threads()},
              "machine": machine.describe(), "seconds": total,
              "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)}, "runs": runs}
    lines = [
        "# ScaNN vs brute-force retrieval", "",
        f"`python -m bench.bench_scann`, {result['date']}, {total}s in all. Data: {result['data']}. "
        f"{args.queries} test queries (batched, batch {args.batch}, median of {args.repeats} passes), the first {args.single_queries} of them also "
        f"one per call; recall@{K} against exact numpy top-{K} on the test queries. ScaNN tuned with "
        f"`tune_leaves` to recall@{K} >= {args.target_recall} on {args.tune_queries} separate queries. "
        "Both indexes through their traced `search` (what the SavedModel runs); brute force is TF matmul + top_k.",
        "", machine.markdown(result["machine"]) + f"; 1-min load average {result['load_average_1m']['before']} "
        f"before, {result['load_average_1m']['after']} after (other work on the 2 cores skews absolute q/s).", "",
        "| items | index | build s | leaves searched | recall@10 | q/s batched | q/s single | "
        "ratio batched | ratio single |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        b, s = r["brute_force"], r["scann"]
        lines.append(f"| {r['items']:,} | brute force | {r['brute_force_build_s']} | all | {b['recall_at_10']:.4f} | "
                     f"{b['qps_batched']:,.0f} | {b['qps_single']:,.0f} | 1.00x | 1.00x |")
        lines.append(f"| {r['items']:,} | ScaNN | {s['build_s']} (+{s['tune_s']} tuning) | "
                     f"{s['leaves_to_search']}/{s['num_leaves']} | {s['recall_at_10']:.4f} | {s['qps_batched']:,.0f} | "
                     f"{s['qps_single']:,.0f} | {r['ratio_batched']:.2f}x | {r['ratio_single']:.2f}x |")
    lines += ["", f"Issue target: recall@10 >= {args.target_recall} at >= {args.target_ratio:g}x brute-force "
                  "queries/s (batched) at 1M items on this machine."]
    for r in runs:
        s = r["scann"]
        lines.append(f"- {r['items']:,} items: recall@10 {s['recall_at_10']:.4f} at {r['ratio_batched']:.2f}x "
                     f"(single-query {r['ratio_single']:.2f}x): **{'met' if r['target_met'] else 'not met'}**.")
    lines += ["", "## For reference: other leaves_to_search (same index, batched, test queries)", "",
              "For reference beside what `tune_leaves` picked; "
              "recall here is on the test queries themselves.", "",
              "| items | leaves searched | recall@10 | q/s batched | ratio vs brute force |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        for w in r["scann_leaves_sweep"]:
            lines.append(f"| {r['items']:,} | {w['leaves_to_search']}/{r['scann']['num_leaves']} | "
                         f"{w['recall_at_10']:.4f} | {w['qps_batched']:,.0f} | {w['ratio_batched']:.2f}x |")
    machine.write_results(args.results_dir, "scann", result, lines)
    return result


if __name__ == "__main__":
    main()
