"""Preprocess throughput: DirectRunner single-process vs multi-process, same run.

    python -m bench.bench_preprocess [--interactions 1000000] [--workers 2]

Generates the synthetic dataset once, runs `segrec preprocess` over it with
the in-process DirectRunner and with the multi-process DirectRunner, and
records input rows/s of both and their ratio in bench/results/preprocess.md
(plus a JSON twin). Not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import tempfile
import time

import trainer  # noqa: F401
from beam_pipelines import preprocess
from beam_pipelines.sources import readers, synthetic
from bench import machine
from trainer.data import examples as ex

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def run_once(raw: str, out: str, beam_args: list) -> tuple:
    sources = readers.generic_sources(os.path.join(raw, "interactions.csv"), os.path.join(raw, "items.csv"),
                                      os.path.join(raw, "users.csv"))
    config = preprocess.PreprocessConfig(sources=tuple(sources), output_dir=out, policy=ex.ExamplePolicy(), overwrite=True)
    start = time.perf_counter()
    summary = preprocess.run(config, beam_args)
    seconds = time.perf_counter() - start
    return seconds, summary.stats


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--results-dir", default=RESULTS)
    args = parser.parse_args(argv)

    work = args.work_dir or tempfile.mkdtemp(prefix="segrec-bench-")
    raw = os.path.join(work, "raw")
    n = args.interactions
    synthetic.generate(synthetic.GenerateConfig(output_dir=raw, size="large", num_interactions=n,
                                                num_users=max(50, n // 40), num_items=max(60, n // 100)))
    runs = {}
    for name, beam_args in (
        ("single-process", []),
        (f"multi-process ({args.workers} workers)",
         ["--direct_num_workers", str(args.workers), "--direct_running_mode", "multi_processing"]),
    ):
        seconds, stats = run_once(raw, os.path.join(work, "out"), beam_args)
        rows = stats["rows"]["interactions"]["read"]
        runs[name] = {"seconds": round(seconds, 2), "rows": rows, "rows_per_s": round(rows / seconds, 1)}
        print(f"{name}: {rows:,} rows in {seconds:.1f}s = {rows / seconds:,.0f} rows/s", flush=True)
    base = runs["single-process"]["rows_per_s"]
    for r in runs.values():
        r["ratio_vs_single"] = round(r["rows_per_s"] / base, 3)
    result = {"benchmark": "preprocess throughput", "date": datetime.date.today().isoformat(),
              "interactions": n, "machine": machine.describe(), "runs": runs}
    lines = [
        "# Preprocess throughput (DirectRunner)", "",
        f"{n:,} generated interactions (plus items and users), `python -m bench.bench_preprocess`, {result['date']}.",
        machine.markdown(result["machine"]), "",
        "| runner | seconds | input rows/s | ratio vs single-process |", "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {k} | {v['seconds']} | {v['rows_per_s']:,.0f} | {v['ratio_vs_single']:.2f}x |" for k, v in runs.items()]
    machine.write_results(args.results_dir, "preprocess", result, lines)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
