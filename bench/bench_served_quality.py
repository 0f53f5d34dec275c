"""The served model answers with the quality `segrec evaluate` reports: the test queries through gRPC.

    python -m bench.bench_served_quality --run-dir RUN [--dataset-dir DS] [--work-dir DIR]
        [--index brute_force|scann] [--batch 32] [--no-controls] [--results-dir bench/results]

1. Exports the run with the real CLI in a subprocess (`python -m trainer.cli
   export --run-dir RUN --base-path WORK/models --index INDEX --version 1
   --overwrite`).
2. In process: `trainer.evaluation.evaluate.run_evaluation` (segrec only, no
   baselines; its report goes to WORK/eval, never into the run dir): the
   numbers `segrec evaluate` reports, the queries it ranks (the test split's
   rows whose target is in the catalog and, under the "exclude" repeat rule,
   not already consumed), what each is ranked without, and each query's top
   items.
3. Served: `segrec serve` on the export (a subprocess on a free 127.0.0.1 port,
   text cache off, so every text goes through the exported encoder), and
   every one of those queries through `serving.client.RecommenderClient.
   recommend_many`, `--batch` users per call: the user's text, their history
   (most recent first, cut to what the model reads), the consumed items
   evaluate ranks the query without as `exclude` (serving_exclude), k = the
   largest metric cut-off (50) and beta = the run's beta (train_config.json:
   chosen on validation unless forced; the export's default).
4. Recall@10, Recall@50, NDCG@10 (and coverage@10) of the served top-k, by
   `trainer.evaluation.ranking.summarize` on a RankingResult built from it:
   the target's rank is read off the served list with evaluate's pessimistic
   tie rule (1 + items scored higher + other items scored equal); a target
   not in the served top-k ranks beyond k, which no metric here looks past.
   The served top-10 of every query is compared with evaluate's (as sets and
   in order).
5. Controls (unless --no-controls): the same queries served with a wrong beta
   and with the history only (no `exclude`), to show the comparison catches a
   request that differs from what evaluate ranks.

Results: bench/results/served_quality.md and .json. Not a test: nothing
asserts on time (tests/test_served_quality.py asserts the equality on a tiny
run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
import tempfile
import time

import numpy as np

from bench import machine
from bench.bench_serving import _cli, start_server, stop_server

RESULTS = os.path.join(os.path.dirname(__file__), "results")
METRICS = ("recall@10", "recall@50", "ndcg@10", "coverage@10")
KS = (10, 50)
TOP = 10  # top-k compared query by query
VERSION = 1


def _say(progress, message: str) -> None:
    if progress:
        progress(message)


def export_run(run_dir: str, work: str, index: str, progress=print) -> tuple:
    """`segrec export` of the run as version 1 of <work>/models (the CLI, in a subprocess).

    Returns (model base path, export.json, seconds)."""
    base = os.path.join(work, "models")
    os.makedirs(work, exist_ok=True)
    _say(progress, f"exporting {run_dir} ({index}) to {base} ...")
    with open(os.path.join(work, "export.log"), "w", encoding="utf-8") as log:
        seconds = _cli(["export", "--run-dir", run_dir, "--base-path", base, "--index", index,
                        "--version", str(VERSION), "--overwrite"], log)
    with open(os.path.join(base, "segrec", str(VERSION), "export.json"), encoding="utf-8") as f:
        info = json.load(f)
    _say(progress, f"exported in {seconds}s: index {info['index']}, default beta {info['beta']}, "
                   f"k_max {info['k_max']}, {info['num_items']} items")
    return base, info, seconds


def in_process(run_dir: str, dataset_dir, work: str):
    """`segrec evaluate` of the run (segrec only) -> trainer.evaluation.evaluate.Evaluation."""
    from trainer.evaluation import evaluate

    config = evaluate.EvaluateConfig(run_dir=run_dir, dataset_dir=dataset_dir, baselines=(),
                                     output_dir=os.path.join(work, "eval"))
    return evaluate.run_evaluation(config, progress=False)


def max_history(run_dir: str) -> int:
    """History items evaluate feeds the model: SplitArrays.batch_dict's cut (features.MAX_HISTORY),
    no more than the model's own max_history (model_config.json)."""
    from trainer import features

    cut = features.MAX_HISTORY
    path = os.path.join(run_dir, "model_config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            cut = min(cut, int(json.load(f).get("max_history", cut)))
    return cut


def served_requests(evaluation, split, history_cut: int, with_exclude: bool = True) -> list:
    """(user_text, history ids, exclude ids) per ranked query, in evaluation.queries order."""
    ids = np.asarray(evaluation.item_ids, dtype=object)
    out = []
    for row, excluded in zip(evaluation.queries, evaluation.exclude):
        history = [h for h in split.histories[row][:history_cut] if h]
        exclude = [str(i) for i in ids[np.asarray(excluded, np.int64)]] if with_exclude else []
        out.append((str(split.user_texts[row]), history, exclude))
    return out


def ask(target: str, requests: list, k: int, beta: float, batch: int, progress=print, desc: str = "") -> tuple:
    """Every request through RecommenderClient.recommend_many, `batch` users a call.

    Returns ([(item ids, scores)] per request, seconds)."""
    from serving.client import RecommenderClient

    out = []
    start = time.perf_counter()
    last = start
    with RecommenderClient(target, timeout=600, retries=3) as client:
        for s in range(0, len(requests), batch):
            recs = client.recommend_many(requests[s:s + batch], k=k, beta=beta)
            out += [([i.item_id for i in r.items], np.array([i.score for i in r.items], np.float64)) for r in recs]
            now = time.perf_counter()
            if now - last > 10 or s + batch >= len(requests):
                _say(progress, f"  {desc}: {len(out)}/{len(requests)} queries served, {now - start:.1f}s")
                last = now
    return out, round(time.perf_counter() - start, 2)


def served_ranking(answers: list, targets: np.ndarray, item_ids, k: int) -> tuple:
    """The served top-k lists as a trainer.evaluation.ranking.RankingResult.

    rank = 1 + (listed items scored higher than the target) + (other listed items scored equal):
    evaluate's pessimistic rule. Not in the list: beyond k (inf). A full list whose last score equals
    the target's may have cut off more tied items: such queries are counted as `unresolved` (their rank
    assumes no unlisted item ties the target; it is then a lower bound). Returns (RankingResult,
    unresolved count)."""
    from trainer.evaluation import ranking as metrics

    index = {str(i): n for n, i in enumerate(item_ids)}
    q = len(answers)
    ranks = np.full(q, np.inf)
    top = np.full((q, k), -1, np.int64)
    unresolved = 0
    for n, ((ids, scores), target) in enumerate(zip(answers, targets)):
        rows = [index[i] for i in ids]
        top[n, :len(rows)] = rows
        if target in rows:
            t = scores[rows.index(int(target))]
            ranks[n] = 1 + np.count_nonzero(scores > t) + np.count_nonzero(scores == t) - 1
            unresolved += int(len(rows) == k and scores[-1] == t)
    result = metrics.RankingResult(ranks=ranks, top_items=top, n_items=len(item_ids),
                                   n_candidates=np.full(q, len(item_ids), np.int64))
    return result, unresolved


def agreement(reference_top: np.ndarray, answers: list, item_ids, n: int = TOP) -> dict:
    """Served top-n vs evaluate's top-n, query by query.

    For a query whose order differs, `score_gap` is how much better the server scored the item it
    put first at the first differing position than evaluate's item there (both scores from the
    server; None when evaluate's item is not in the served list): a float near-tie shows as a gap
    of ~1e-7."""
    index = {str(i): j for j, i in enumerate(item_ids)}
    same_set = same_order = 0
    overlap, gaps, differing = [], [], []
    for qn, (ref, (ids, scores)) in enumerate(zip(reference_top[:, :n], answers)):
        ref = [int(i) for i in ref if i >= 0]
        got = [index[i] for i in ids[:n]]
        same_set += int(set(ref) == set(got))
        same_order += int(ref == got)
        overlap.append(len(set(ref) & set(got)) / max(1, len(ref)))
        if ref != got:
            p = next(j for j in range(max(len(ref), len(got))) if j >= len(ref) or j >= len(got) or ref[j] != got[j])
            served_all = [index[i] for i in ids]
            gap = None
            if p < len(ref) and p < len(got) and ref[p] in served_all:
                gap = float(scores[p] - scores[served_all.index(ref[p])])
            gaps.append(gap)
            if len(differing) < 20:
                differing.append({"query": qn, "position": p, "evaluate": ref, "served": got, "score_gap": gap})
    q = len(answers)
    known = [g for g in gaps if g is not None]
    return {"queries": q, "same_set": same_set, "same_order": same_order,
            "same_set_share": same_set / q if q else float("nan"),
            "same_order_share": same_order / q if q else float("nan"),
            "mean_overlap": float(np.mean(overlap)) if q else float("nan"),
            "max_score_gap": max(known) if known else None, "differing": differing}


def score_difference(run_dir: str, evaluation, split, answers: list, beta: float) -> dict:
    """Largest |served score - in-process score| over the served items: evaluate's scores recomputed on
    its own path (trainer.model.batched_outputs.model_outputs with the run's text cache, then the query
    vectors . evaluate.item_vectors), the float noise the agreement has to survive."""
    from trainer import features
    from trainer.evaluation import evaluate
    from trainer.model import run_dir as rd
    from trainer.model.batched_outputs import model_outputs

    run = rd.load_run(run_dir)
    query = model_outputs(run.model, split, evaluation.queries, beta, run.text_cache)[features.QUERY]
    items, _ = evaluate.item_vectors(run.model, evaluation.item_ids)
    index = {str(i): n for n, i in enumerate(evaluation.item_ids)}
    diffs = [np.abs(scores - items[[index[i] for i in ids]] @ query[n]).max()
             for n, (ids, scores) in enumerate(answers) if ids]
    return {"max_abs": float(np.max(diffs)) if diffs else None,
            "mean_of_query_max": float(np.mean(diffs)) if diffs else None}


def _metrics(summary: dict) -> dict:
    return {m: summary.get(m) for m in METRICS}


def served_metrics(run_dir: str, dataset_dir=None, work=None, index: str = "brute_force", batch: int = 32,
                   controls: bool = True, progress=print) -> dict:
    """Exports and serves the run, sends every test query `segrec evaluate` ranks, compares.

    Returns {"in_process": metrics of evaluate, "served": metrics of the served top-k, "difference":
    served - in-process, "top10": agreement, "controls": {name: {"served", "top10"}}, "queries",
    "k", "beta", "export", "unresolved_ties", "seconds", ...}."""
    from trainer.data import arrays as da
    from trainer.data import examples as ex
    from trainer.evaluation import ranking as metrics

    t0 = time.perf_counter()
    work = work or tempfile.mkdtemp(prefix="segrec-served-quality-")
    with open(os.path.join(run_dir, "train_config.json"), encoding="utf-8") as f:
        train_config = json.load(f)
    dataset_dir = dataset_dir or train_config.get("dataset_dir")
    beta = float(train_config.get("beta", 0.0))
    base, export_info, export_s = export_run(run_dir, work, index, progress)

    _say(progress, "in-process `segrec evaluate` (segrec only) ...")
    start = time.perf_counter()
    evaluation = in_process(run_dir, dataset_dir, work)
    evaluate_s = round(time.perf_counter() - start, 1)
    reference = evaluation.results["models"]["segrec"]
    rule = evaluation.results["queries"]["repeats"]
    _say(progress, f"in-process, {evaluate_s}s: {reference['count']} queries, "
                   + ", ".join(f"{m} {reference[m]:.6f}" for m in METRICS))

    k = max(KS)
    cut = max_history(run_dir)
    split = da.load_split(dataset_dir, ex.EVAL)  # evaluate's test split (same sort, same rows)
    requests = served_requests(evaluation, split, cut)
    runs = {"served": (requests, beta)}
    wrong_beta = beta + 0.5 if beta <= 0.5 else beta - 0.5
    if controls:
        runs["wrong beta"] = (requests, wrong_beta)
        runs["history only, no exclude"] = (served_requests(evaluation, split, cut, with_exclude=False), beta)

    _say(progress, f"starting segrec serve on {base} ...")
    proc, log, target = start_server(base, 64, 5.0, os.path.join(work, "serve.log"), text_cache_size=0)
    answers, served_s = {}, {}
    try:
        for name, (reqs, b) in runs.items():
            answers[name], served_s[name] = ask(target, reqs, k, b, batch, progress, f"{name} (beta {b:g})")
    finally:
        rc = stop_server(proc, log)

    ref_rank = evaluation.rankings["segrec"]
    out = {"in_process": _metrics(reference), "queries": int(reference["count"]), "repeat_rule": rule,
           "k": k, "beta": beta, "history_cut": cut, "batch": batch, "export": export_info,
           "export_seconds": export_s, "evaluate_seconds": evaluate_s, "served_seconds": served_s,
           "sigterm_exit_code": rc, "work_dir": work, "run_dir": run_dir, "dataset_dir": dataset_dir,
           "beta_matches_export_default": math.isclose(beta, float(export_info["beta"]), abs_tol=1e-9),
           "in_process_rank_check": None, "controls": {}}
    for name, ans in answers.items():
        result, unresolved = served_ranking(ans, evaluation.targets, evaluation.item_ids, k)
        served = _metrics(metrics.summarize(result, KS))
        top10 = agreement(ref_rank.top_items, ans, evaluation.item_ids)
        if name == "served":
            out["served"] = served
            out["difference"] = {m: served[m] - out["in_process"][m] for m in METRICS}
            out["top10"] = top10
            out["unresolved_ties"] = unresolved
            out["score_difference"] = score_difference(run_dir, evaluation, split, ans, beta)
            # Ranks query by query: the served rank equals evaluate's wherever evaluate's is within k.
            within = ref_rank.ranks <= k
            out["in_process_rank_check"] = {
                "queries_ranked_within_k": int(within.sum()),
                "same_rank": int(np.sum(result.ranks[within] == ref_rank.ranks[within])),
                "served_within_k_where_evaluate_is_not": int(np.sum(np.isfinite(result.ranks[~within]))),
            }
        else:
            out["controls"][name] = {"beta": runs[name][1], "served": served, "unresolved_ties": unresolved,
                                     "top10": {key: v for key, v in top10.items() if key != "differing"}}
        _say(progress, f"{name}: " + ", ".join(f"{m} {served[m]:.6f}" for m in METRICS)
                       + f"; top-10 same set {top10['same_set']}/{top10['queries']}, same order "
                         f"{top10['same_order']}/{top10['queries']}")
    out["recorded_report"] = recorded_report(run_dir, dataset_dir, beta)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def recorded_report(run_dir: str, dataset_dir, beta: float):
    """segrec's metrics in the run's own `segrec evaluate` report (<run>/evaluation/report.json), when it
    exists and was computed on this dataset at this beta; else None."""
    path = os.path.join(run_dir, "evaluation", "report.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    config = report.get("config", {})
    segrec = report.get("models", {}).get("segrec")
    if not segrec or config.get("beta") != beta or (
            dataset_dir and os.path.abspath(str(config.get("dataset_dir"))) != os.path.abspath(dataset_dir)):
        return None
    return {"path": path, **_metrics(segrec)}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.6f}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="what `segrec train` wrote")
    parser.add_argument("--dataset-dir", default=None, help="default: the run's train_config dataset_dir")
    parser.add_argument("--work-dir", default=None, help="export, evaluation and server log go here")
    parser.add_argument("--index", default="brute_force", choices=("brute_force", "scann"))
    parser.add_argument("--batch", type=int, default=32, help="users per recommend_many call")
    parser.add_argument("--no-controls", action="store_true", help="skip the wrong-beta and no-exclude runs")
    parser.add_argument("--results-dir", default=RESULTS)
    args = parser.parse_args(argv)

    command = "python -m bench.bench_served_quality " + " ".join(shlex.quote(a) for a in
                                                                   (sys.argv[1:] if argv is None else argv))
    r = served_metrics(args.run_dir, args.dataset_dir, args.work_dir, args.index, args.batch,
                       controls=not args.no_controls)
    result = {"benchmark": "served quality vs segrec evaluate", "date": datetime.date.today().isoformat(),
              "machine": machine.describe(), "command": command, **r}

    e, top = r["export"], r["top10"]
    index = e["index"] + (f" (ScaNN recall@10 vs brute force {e['scann_recall_at_10']:.4f})"
                          if e.get("scann_recall_at_10") is not None else " (exact)")
    lines = [
        "# Served quality: `segrec serve` over gRPC vs `segrec evaluate`", "",
        f"`{command}`, {result['date']}, {r['seconds']}s in all (export {r['export_seconds']}s, in-process "
        f"evaluate {r['evaluate_seconds']}s, served queries {r['served_seconds']['served']}s).", "",
        f"Run `{r['run_dir']}`, dataset `{r['dataset_dir']}` (repeat rule {r['repeat_rule']}). Export: "
        f"`python -m trainer.cli export --index {e['index']}` (CLI subprocess), index {index}, default beta "
        f"{e['beta']:g}, encoder {e.get('encoder_precision')}. Server: `segrec serve` subprocess on 127.0.0.1, "
        f"text cache off, stopped with SIGTERM (exit {r['sigterm_exit_code']}). Client: "
        f"RecommenderClient.recommend_many, {r['batch']} users a call: each test query's user text, history "
        f"(most recent first, at most {r['history_cut']}) and, as `exclude`, the consumed items evaluate ranks "
        f"it without (serving_exclude); k={r['k']}, beta={r['beta']:g} (the run's beta, train_config.json: chosen "
        f"on validation unless forced; {'equal to' if r['beta_matches_export_default'] else 'NOT equal to'} the "
        "export's default).", "",
        "In-process: `trainer.evaluation.evaluate.run_evaluation` (segrec only, no baselines), the code of "
        "`segrec evaluate`. Served: `trainer.evaluation.ranking.summarize` over the served top-k, the target's "
        "rank read off the served list with evaluate's pessimistic tie rule (a target not in the top "
        f"{r['k']} ranks beyond it). Queries: {r['queries']}, exactly the test queries evaluate ranks.", "",
        machine.markdown(result["machine"]), "",
        "| metric | `segrec evaluate` (in-process) | served over gRPC | difference |",
        "| --- | ---: | ---: | ---: |",
    ]
    for m in METRICS:
        lines.append(f"| {m} | {_fmt(r['in_process'][m])} | {_fmt(r['served'][m])} | {r['difference'][m]:+.2e} |")
    rc, sd = r["in_process_rank_check"], r["score_difference"]
    lines += [
        "", f"Top-10 agreement with evaluate's top-10: same set for {top['same_set']} of {top['queries']} queries "
        f"({top['same_set_share']:.2%}), same order for {top['same_order']} ({top['same_order_share']:.2%}); mean "
        f"overlap {top['mean_overlap']:.4f}." + (f" Largest served-score gap where the order differs: "
                                                 f"{top['max_score_gap']:.2e}." if top["max_score_gap"] is not None
                                                 else ""),
        f"Target ranks: of the {rc['queries_ranked_within_k']} queries evaluate ranks within the top {r['k']}, the "
        f"served list gives the same rank for {rc['same_rank']}; queries the server ranks within the top "
        f"{r['k']} but evaluate does not: {rc['served_within_k_where_evaluate_is_not']}. Served ranks that assume "
        f"no item past the list scores exactly the target's score (the target's score is the last one of a full "
        f"list): {r['unresolved_ties']}.",
        f"Scores: the largest |served score - in-process score| over every served item is {sd['max_abs']:.2e} "
        f"(mean over queries of each query's largest: {sd['mean_of_query_max']:.2e}); in-process scores "
        "recomputed on evaluate's path (model_outputs with the run's text cache, query . item vectors).",
    ]
    rec = r.get("recorded_report")
    if rec:
        same = all(math.isclose(rec[m], r["in_process"][m], abs_tol=1e-12) for m in METRICS)
        lines += ["", f"The run's own `segrec evaluate` report (`{rec['path']}`) reads "
                  + ", ".join(f"{m} {_fmt(rec[m])}" for m in METRICS)
                  + (": the same as the in-process column." if same else ": NOT the in-process column's numbers.")]
    if r["controls"]:
        lines += ["", "## Controls: requests that differ from what evaluate ranks", "",
                  "The same queries through the same server, to show the comparison catches a wrong request.", "",
                  "| request | " + " | ".join(METRICS) + " | top-10 same set | same order |",
                  "| --- | " + " | ".join("---:" for _ in METRICS) + " | ---: | ---: |",
                  f"| as evaluate ranks (beta {r['beta']:g}, exclude) | "
                  + " | ".join(_fmt(r["served"][m]) for m in METRICS)
                  + f" | {top['same_set']} | {top['same_order']} |"]
        for name, c in r["controls"].items():
            label = f"{name} (beta {c['beta']:g})" if name == "wrong beta" else name
            lines.append(f"| {label} | " + " | ".join(_fmt(c["served"][m]) for m in METRICS)
                         + f" | {c['top10']['same_set']} | {c['top10']['same_order']} |")
    machine.write_results(args.results_dir, "served_quality", result, lines)
    print("\n".join(lines), flush=True)
    return result


if __name__ == "__main__":
    main()
