"""Scale runs: preprocess at 10M rows and batch scoring's cost curve with the MiniLM export.

    python -m bench.bench_scale [--size 10m] [--score-users 1000,10000,100000] [--workers 2]
                                [--parts preprocess,score] [--work-dir DIR]

preprocess: `segrec generate --size <size>` (10M interactions by default),
then `segrec preprocess` over it on the multi-process DirectRunner
(`--direct_num_workers N --direct_running_mode multi_processing`) and on the
single-process one (`--preprocess-modes`). A run that fails is recorded
with its exit code and error, not hidden. Records
input rows/s, the peak RSS of the whole process tree (the CLI and its Beam
worker processes, summed, sampled every 0.5 s) and of its largest process,
and whether stats.json balances (every row read is accepted, filtered or
dead-lettered).

score: one MiniLM model (pretrained, frozen; bench_score's build: 3,000
generated users, 400 items) exported with a brute-force index, then
`segrec score` over generated raw input of each size in --score-users (same
generator and catalog, 8 interactions per user), on the same runner. Records
users/s, peak RSS and stats balance per size, and the growth of seconds and
RSS from each size to the next, so whether the cost grows linearly is read
off the table. Every command runs through the real CLI in a subprocess.

Results: bench/results/scale_preprocess.md and scale_score.md (plus JSON
twins). Not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from bench import machine

RESULTS = os.path.join(os.path.dirname(__file__), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20


class TreeRss:
    """Samples the RSS of a process and all its descendants (psutil) until stopped."""

    def __init__(self, pid: int, every: float = 0.5):
        import psutil

        self._proc = psutil.Process(pid)
        self._every = every
        self.peak_total = 0
        self.peak_single = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self._proc] + self._proc.children(recursive=True)
            except psutil.Error:
                break
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.Error:
                    pass
            if rss:
                self.peak_total = max(self.peak_total, sum(rss))
                self.peak_single = max(self.peak_single, max(rss))
                self.peak_processes = max(self.peak_processes, len(rss))
            self._stop.wait(self._every)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_tree_mib": round(self.peak_total / MIB, 1),
                "peak_rss_largest_process_mib": round(self.peak_single / MIB, 1),
                "processes": self.peak_processes}


def run_cli(args: list, log_path: str, check: bool = True) -> dict:
    """`python -m trainer.cli <args>` in a subprocess: seconds, peak RSS, exit code (raises if it fails and
    `check`; else the last error line is returned as "error")."""
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ segrec {' '.join(args)}\n")
        log.flush()
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "trainer.cli"] + args, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
        sampler = TreeRss(proc.pid)
        rc = proc.wait()
        seconds = time.perf_counter() - start
        rss = sampler.stop()
    out = {"seconds": round(seconds, 2), "exit_code": rc, **rss}
    if rc != 0:
        if check:
            raise RuntimeError(f"segrec {args[0]} exited {rc}; see {log_path}")
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = [x.strip() for x in f if x.strip()]
        out["error"] = next((x for x in reversed(lines) if "Error" in x or "error:" in x), lines[-1] if lines else "")[:1500]
    return out


def _beam(workers: int) -> list:
    return ["--direct_num_workers", str(workers), "--direct_running_mode", "multi_processing"]


MODES = {"multi": lambda w: ("multi-process", _beam(w)), "single": lambda w: ("single-process", [])}


def bench_preprocess(work: str, size: str, workers: int, modes: list, log: str) -> dict:
    raw = os.path.join(work, f"raw-{size}")
    if not os.path.exists(os.path.join(raw, "generator.json")):
        gen = run_cli(["generate", "--size", size, "--output-dir", raw], log)
    else:
        gen = {"reused": True}
    print(f"generate {size}: {gen}", flush=True)
    runs = {}
    for mode in modes:
        name, beam_args = MODES[mode](workers)
        if mode == "multi":
            name += f" ({workers} workers)"
        ds = os.path.join(work, f"ds-{size}-{mode}")
        run = run_cli(["preprocess", "--input-dir", raw, "--output-dir", ds, "--overwrite"] + beam_args, log,
                      check=False)
        out = {"beam_args": beam_args, **run, "raw_mib": round(_du(raw) / MIB, 1)}
        stats_path = os.path.join(ds, "stats.json")
        if run["exit_code"] == 0 and os.path.exists(stats_path):
            with open(stats_path, encoding="utf-8") as f:
                stats = json.load(f)
            out.update(rows=stats["rows"], examples=stats["examples"], users=stats["users"], items=stats["items"],
                       balanced=stats["balanced"], dataset_mib=round(_du(ds) / MIB, 1))
            read = stats["rows"]["interactions"]["read"]
        else:
            out["balanced"] = False
            read = sum(1 for _ in open(os.path.join(raw, "interactions.csv"), "rb")) - 1
        out["interaction_rows"] = read
        out["rows_per_s"] = round(read / run["seconds"], 1)
        runs[name] = out
        print(f"preprocess {size} {name}: exit {run['exit_code']}, {read:,} rows in {run['seconds']:.0f}s = "
              f"{out['rows_per_s']:,.0f} rows/s, peak RSS {run['peak_rss_tree_mib']:,.0f} MiB, "
              f"balanced {out['balanced']} {out.get('error', '')[:300]}", flush=True)
    return {"size": size, "generate": gen, "runs": runs}


def _du(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def bench_score_curve(work: str, sizes: list, workers: int, seed: int, log: str) -> dict:
    from beam_pipelines.sources import synthetic
    from bench import bench_score

    t0 = time.perf_counter()
    _, base = bench_score.build_model(os.path.join(work, "model"), 3000, "minilm", seed)
    print(f"model ready in {time.perf_counter() - t0:.0f}s: {base}", flush=True)
    curve = []
    for n in sizes:
        raw = os.path.join(work, f"score-raw-{n}")
        if not os.path.exists(os.path.join(raw, "generator.json")):
            synthetic.generate(synthetic.GenerateConfig(output_dir=raw, size="small", num_users=n, num_items=400,
                                                        num_interactions=n * 8, seed=seed))
        out = os.path.join(work, f"score-out-{n}")
        run = run_cli(["score", "--input-dir", raw, "--model-dir", base, "--output-dir", out, "--overwrite"]
                      + _beam(workers), log)
        with open(os.path.join(out, "stats.json"), encoding="utf-8") as f:
            stats = json.load(f)
        scored = stats["users"]["scored"]
        point = {"users": n, "scored": scored, "dead_lettered": stats["users"].get("dead_lettered"),
                 **run, "users_per_s": round(scored / run["seconds"], 1), "balanced": stats["balanced"],
                 "signature": stats.get("signature"), "text_cache": stats.get("text_cache")}
        curve.append(point)
        print(f"score {n:,} users: {scored:,} scored in {run['seconds']:.0f}s = {point['users_per_s']:,.1f} users/s, "
              f"peak RSS {run['peak_rss_tree_mib']:,.0f} MiB, balanced {stats['balanced']}", flush=True)
    for prev, cur in zip(curve, curve[1:]):
        factor = cur["users"] / prev["users"]
        cur["seconds_growth_vs_prev"] = round(cur["seconds"] / prev["seconds"], 2)
        cur["users_growth_vs_prev"] = round(factor, 2)
        cur["rss_growth_vs_prev"] = round(cur["peak_rss_tree_mib"] / prev["peak_rss_tree_mib"], 2)
    if len(curve) >= 2:  # marginal cost: seconds per extra user between the two largest sizes
        a, b = curve[-2], curve[-1]
        marginal = (b["seconds"] - a["seconds"]) / (b["users"] - a["users"])
        fixed = a["seconds"] - marginal * a["users"]
        projected = fixed + marginal * 1_000_000
    else:
        marginal = fixed = projected = None
    return {"model": base, "curve": curve,
            "marginal_seconds_per_user": None if marginal is None else round(marginal, 5),
            "fixed_seconds": None if fixed is None else round(fixed, 1),
            "projected_seconds_1m_users": None if projected is None else round(projected)}


def markdown(result: dict, argv_line: str) -> list:
    m = result["machine"]
    lines = ["# Scale runs: preprocess at 10M rows, batch scoring's cost curve", "",
             f"`{argv_line}`, {result['date']}, {result['seconds']:.0f}s in all. Every command ran through the "
             "real CLI (`python -m trainer.cli ...`) in a subprocess on the DirectRunner (multi-process: "
             f"{result['workers']} workers; single-process where the table says so). Peak RSS: the CLI process and "
             "every Beam worker it started, summed "
             "(sampled every 0.5 s), and the largest single process.", "", machine.markdown(m), ""]
    pre = result.get("preprocess")
    if pre:
        lines += [f"## Preprocess, `segrec generate --size {pre['size']}` -> `segrec preprocess`", "",
                  "| run | exit | seconds | input rows/s | peak RSS tree MiB | largest process MiB | processes | "
                  "balanced |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        gen = pre["generate"]
        if not gen.get("reused"):
            lines.append(f"| generate | 0 | {gen['seconds']} | | {gen['peak_rss_tree_mib']:,} | "
                         f"{gen['peak_rss_largest_process_mib']:,} | {gen['processes']} | |")
        for name, r in pre["runs"].items():
            lines.append(f"| preprocess, {name} | {r['exit_code']} | {r['seconds']} | {r['rows_per_s']:,.0f} | "
                         f"{r['peak_rss_tree_mib']:,} | {r['peak_rss_largest_process_mib']:,} | {r['processes']} | "
                         f"{r['balanced']} |")
        for name, r in pre["runs"].items():
            if r.get("rows"):
                lines += ["", f"{name}: rows by table", "",
                          "| table | read | accepted | filtered | dead-lettered | balanced |",
                          "| --- | ---: | ---: | ---: | ---: | --- |"]
                lines += [f"| {t} | {x['read']:,} | {x['accepted']:,} | {x['filtered']:,} | {x['dead_lettered']:,} | "
                          f"{x['balanced']} |" for t, x in r["rows"].items()]
                lines += ["", f"Examples written: {', '.join(f'{k} {v:,}' for k, v in r['examples'].items())}; "
                          f"{r['users']:,} users, {r['items']:,} items. Raw input {r['raw_mib']:,} MiB, dataset dir "
                          f"{r['dataset_mib']:,} MiB."]
            if r.get("error"):
                lines += ["", f"{name} failed: `{r['error']}`"]
        lines.append("")
    sc = result.get("score")
    if sc:
        lines += ["## Batch scoring with the MiniLM export, by number of users", "",
                  "`segrec score --input-dir <generated raw> --model-dir <export>`; the model: bench_score's "
                  "(MiniLM-L6 pretrained and frozen, 3,000 users, 400 items, brute-force index, length-aware "
                  "padding, text cache on: the default 100,000 entries). Generated users have distinct texts "
                  "(profile + 5 recent titles), so the cache rarely hits.", "",
                  "| users | scored | seconds | users/s | peak RSS tree MiB | largest process MiB | x users | x seconds | "
                  "x RSS | balanced |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for p in sc["curve"]:
            lines.append(f"| {p['users']:,} | {p['scored']:,} | {p['seconds']} | {p['users_per_s']:,.1f} | "
                         f"{p['peak_rss_tree_mib']:,} | {p['peak_rss_largest_process_mib']:,} | "
                         f"{p.get('users_growth_vs_prev', '')} | {p.get('seconds_growth_vs_prev', '')} | "
                         f"{p.get('rss_growth_vs_prev', '')} | {p['balanced']} |")
        if sc["marginal_seconds_per_user"] is not None:
            lines += ["", f"Between the two largest sizes each extra user costs {sc['marginal_seconds_per_user'] * 1000:.2f} ms "
                      f"({1 / sc['marginal_seconds_per_user']:,.0f} users/s at the margin) over a fixed "
                      f"{sc['fixed_seconds']:.0f} s (start-up, model loads); at that rate 1,000,000 users would take "
                      f"about {sc['projected_seconds_1m_users'] / 3600:.1f} h on this machine."]
        lines.append("")
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="10m", help="segrec generate --size for the preprocess run")
    parser.add_argument("--score-users", default="1000,10000,100000", help="comma-separated user counts")
    parser.add_argument("--parts", default="preprocess,score")
    parser.add_argument("--preprocess-modes", default="multi,single", help="comma-separated: multi, single")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--work-dir", default=None, help="keep (and reuse) data and models here")
    parser.add_argument("--results-dir", default=RESULTS)
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    work = args.work_dir or tempfile.mkdtemp(prefix="segrec-bench-scale-")
    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, "cli.log")
    start = time.perf_counter()
    result = {"benchmark": "scale runs", "date": datetime.date.today().isoformat(), "machine": machine.describe(),
              "workers": args.workers}
    argv_line = ("python -m bench.bench_scale " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    # One results file per part (scale_preprocess, scale_score), so the parts can be run apart.
    if "preprocess" in parts:
        modes = [m.strip() for m in args.preprocess_modes.split(",") if m.strip()]
        t0 = time.perf_counter()
        part = dict(result, preprocess=bench_preprocess(work, args.size, args.workers, modes, log))
        part["seconds"] = round(time.perf_counter() - t0, 1)
        machine.write_results(args.results_dir, "scale_preprocess", part, markdown(part, argv_line))
        result["preprocess"] = part["preprocess"]
    if "score" in parts:
        sizes = [int(s) for s in args.score_users.split(",") if s.strip()]
        t0 = time.perf_counter()
        part = dict(result, score=bench_score_curve(work, sizes, args.workers, args.seed, log))
        part["seconds"] = round(time.perf_counter() - t0, 1)
        machine.write_results(args.results_dir, "scale_score", part, markdown(part, argv_line))
        result["score"] = part["score"]
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"wrote scale_*.md in {args.results_dir}", flush=True)
    return result


if __name__ == "__main__":
    main()
