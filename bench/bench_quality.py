"""Quality benchmark: segrec vs popularity, EASE, an ID-only two-tower and
SASRec on MovieLens 100K (temporal leave-last-1, full ranking, everything
tuned on the validation split, test scored once), the ablations (what each
part of segrec adds), cold start, segment recovery (ARI) on generated data,
and training throughput - all in one run.

    python -m bench.bench_quality [--ml100k PATH] [--text-history 0] [--epochs 12]

Ablations (each retrained with the main run's budget, evaluated on the same
test queries; beta chosen on validation unless the row says otherwise):
  beta = 0          the main run, segment pull off (no retraining): segments
                    off, since the default item prior is global;
  segment prior     segments on: the per-segment item prior
                    (--item-prior segment) instead of the global one;
  no segment head   no clustering loss (alpha 0), beta 0;
  no text           the user tower ignores user_text;
  mean history      the history averaged instead of read by the transformer.

Writes bench/results/quality.md and quality.json. Not a test: targets are
recorded as reached or not, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time

import trainer  # noqa: F401
from beam_pipelines import preprocess
from beam_pipelines.sources import readers, synthetic
from bench import machine
from trainer.data import examples as ex

RESULTS = os.path.join(os.path.dirname(__file__), "results")
DEFAULT_ML100K = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ml-100k")


def _preprocess(sources, out: str, text_history: int, max_examples: int) -> dict:
    cfg = preprocess.PreprocessConfig(sources=tuple(sources), output_dir=out, overwrite=True,
                                      policy=ex.ExamplePolicy(text_history=text_history,
                                                              max_examples_per_user=max_examples))
    return preprocess.run(cfg).stats


BASELINES = ("popularity", "ease", "id_two_tower", "sasrec")
ABLATIONS = {  # key -> (row name, TrainConfig overrides, forced beta)
    "segment_prior": ("segments on (per-segment item prior)", {"item_prior": "segment"}, None),
    "no_segment_head": ("no segment head (alpha 0, beta 0)", {"alpha": 0.0}, 0.0),
    "no_text": ("no text", {"use_text": False}, None),
    "mean_history": ("mean history", {"history_encoder": "mean"}, None),
}
SEGMENTS_ON = ABLATIONS["segment_prior"][0]
SEGMENTS_OFF = "beta = 0 (segment pull off)"  # the main run at beta 0, not retrained: no segment term in the score


def _train_eval(dataset: str, run: str, args, segments, id_epochs, compare_run=None, seed=None,
                baselines=BASELINES, overrides=None, beta=None, text_cache=None) -> tuple:
    """Trains and evaluates; beta and the baselines' settings are chosen on validation unless given (not None)."""
    from trainer.evaluation import evaluate
    from trainer.training import job as train

    settings = dict(dataset_dir=dataset, output_dir=run, encoder=args.encoder,
                    sequence_length=args.sequence_length, embedding_dim=args.embedding_dim,
                    segments=segments, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                    batch_size=args.batch_size, learning_rate=args.learning_rate, lr_schedule=args.lr_schedule,
                    weight_decay=args.weight_decay, select_metric=args.select_metric,
                    retrieval_temperature=args.retrieval_temperature,
                    patience=args.patience, beta=args.beta if beta is None else beta,
                    alpha=args.alpha, steps_per_epoch=args.steps_per_epoch, text_cache=text_cache,
                    seed=args.seed if seed is None else seed, verbose=0)
    tc = train.TrainConfig(**{**settings, **(overrides or {})})
    t0 = time.time()
    summary = train.train(tc, env={})
    train_s = time.time() - t0
    params = (("id_two_tower", {"embedding_dim": 64, **({} if id_epochs is None else {"epochs": id_epochs})}),)
    ec = evaluate.EvaluateConfig(run_dir=run, baselines=tuple(baselines),
                                 baseline_params=tuple(p for p in params if p[0] in baselines),
                                 seed=args.seed, compare_run_dir=compare_run)
    results = evaluate.evaluate(ec, progress=False)
    return summary, results, train_s


def _ablations(dataset: str, work: str, prefix: str, args, segments, main_run: str, main_results: dict,
               names=None) -> dict:
    """{ablation: {"models": {"segrec": summary}, "cold_start": ..., "selection": ...}}, the main run's first."""
    from trainer.evaluation import evaluate
    from trainer.model import run_dir as rd

    out = {"full model": _row(main_results)}
    chosen = float(main_results["config"]["beta"])
    if chosen != 0.0:
        res = evaluate.evaluate(evaluate.EvaluateConfig(run_dir=main_run, baselines=(), beta=0.0, seed=args.seed,
                                                        output_dir=os.path.join(work, f"{prefix}_beta0_eval")),
                                progress=False)
        out[SEGMENTS_OFF] = _row(res)
    else:
        out[SEGMENTS_OFF] = {**_row(main_results), "note": "validation chose beta 0: the full model"}
    cache = rd.path(main_run, rd.TEXT_CACHE)
    for i, (key, (name, overrides, beta)) in enumerate(ABLATIONS.items()):
        if names is not None and key not in names:
            continue
        t0 = time.time()
        _, res, train_s = _train_eval(dataset, os.path.join(work, f"{prefix}_ablation_{i}"), args, segments, None,
                                      baselines=(), overrides=overrides, beta=beta, text_cache=cache)
        out[name] = {**_row(res), "train_seconds": round(train_s, 1)}
        print(f"ablation {name}: {out[name]['models']['segrec']} ({time.time() - t0:.0f} s)", flush=True)
    return out


def _row(results: dict) -> dict:
    return {"models": {"segrec": results["models"]["segrec"]}, "cold_start": results.get("cold_start"),
            "beta": results["config"]["beta"]}


THROUGHPUT_MODELS = {  # name -> TrainConfig overrides; "before" is the model as it stood before the transformer
    "before: mean history, in-batch softmax, item tower per history slot": {
        "history_encoder": "mean", "loss": "in_batch", "item_prior": "none", "cold_query": "centroid"},
    "mean history, full softmax (catalog embedded once per step)": {"history_encoder": "mean", "loss": "full"},
    "default: transformer history, full softmax, global item prior": {},
}


def _throughput(dataset: str, run: str, args, steps: int) -> dict:
    """Training examples/s with cached text vectors, for the model before this change and after, same run."""

    from trainer.data import arrays as da
    from trainer.data import tf_dataset as data_lib
    from trainer.model import run_dir as rd
    from trainer.model.text_encoder import TextCache
    from trainer.training import job as train

    cache = TextCache.load(rd.path(run, rd.TEXT_CACHE))
    catalog = data_lib.load_catalog(dataset)
    policy = da.metadata(dataset).get("split", {})
    out = {}
    for name, overrides in THROUGHPUT_MODELS.items():
        tc = train.TrainConfig(dataset_dir=dataset, output_dir=run, encoder=args.encoder,
                               sequence_length=args.sequence_length, embedding_dim=args.embedding_dim,
                               batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
                               **overrides)
        encoder = train.build_encoder(tc, [])
        model = train._model(tc, catalog, encoder, 8, False, da.repeat_rule(dataset),
                             int(policy.get("max_history", 50)), int(policy.get("text_history", 0)),
                             int(policy.get("max_examples_per_user", 0)),
                             train_steps=3 + args.throughput_steps)  # the warm-up call, then the timed steps
        ds = data_lib.make_dataset(dataset, "train", args.batch_size, shuffle=True, seed=0, text_cache=cache, repeat=True)
        model.fit(ds, epochs=1, steps_per_epoch=3, verbose=0)  # trace/warm up
        t0 = time.perf_counter()
        model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
        out[name] = round(steps * args.batch_size / (time.perf_counter() - t0), 1)
        print(f"throughput {name}: {out[name]} examples/s", flush=True)
    return out


def reference_ari(raw_dir: str, k: int, seed: int) -> float:
    """ARI of k-means on users' true category-share vectors: a ceiling for behaviour-based recovery."""
    import pandas as pd
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    inter = pd.read_csv(os.path.join(raw_dir, "interactions.csv"))
    items = pd.read_csv(os.path.join(raw_dir, "items.csv"))
    truth = pd.read_csv(os.path.join(raw_dir, "segments_truth.csv")).set_index("user_id")["segment"]
    items["category"] = items["categories"].str.split("|")
    joined = inter.merge(items.explode("category")[["item_id", "category"]], on="item_id")
    shares = pd.crosstab(joined["user_id"], joined["category"])
    shares = shares.div(shares.sum(axis=1), axis=0)
    labels = KMeans(k, n_init=10, random_state=seed).fit_predict(shares.values)
    return round(float(adjusted_rand_score(truth.loc[shares.index].values, labels)), 4)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ml100k", default=os.environ.get("SEGREC_ML100K_DIR", DEFAULT_ML100K))
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--sequence-length", type=int, default=128)
    p.add_argument("--text-history", type=int, default=0,
                   help="recent titles in user_text; 0 = profile only (~1k distinct texts to encode on CPU)")
    p.add_argument("--max-examples-per-user", type=int, default=0)
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--num-segments", default="8")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--select-metric", default="recall@50",
                   help="validation metric that picks epochs, beta and the baselines' settings: recall@K | ndcg@10")
    p.add_argument("--retrieval-temperature", type=float, default=0.05)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--beta", type=float, default=None, help="default: chosen on the validation split")
    p.add_argument("--id-epochs", type=int, default=None, help="default: chosen on the validation split")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="training steps per epoch (default: one pass); smaller epochs choose the checkpoint finer")
    p.add_argument("--throughput-steps", type=int, default=20)
    p.add_argument("--ml100k-ablations", default=",".join(ABLATIONS),
                   help="comma list of the ablations retrained on ML-100K (default: all; generated data runs all)")
    p.add_argument("--generated-size", default="small")
    p.add_argument("--generated-batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--work-dir")
    p.add_argument("--results-dir", default=RESULTS)
    p.add_argument("--skip", default="", help="comma list of parts to skip: ml100k,generated,throughput,ablations")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    segments = args.num_segments if args.num_segments == "auto" else int(args.num_segments)
    work = args.work_dir or tempfile.mkdtemp(prefix="segrec-quality-")
    result = {"benchmark": "quality", "date": datetime.date.today().isoformat(), "machine": machine.describe(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("work_dir", "results_dir")}}

    if "ml100k" not in skip:
        ds = os.path.join(work, "ml100k")
        result["ml100k_preprocess"] = _preprocess(readers.movielens_100k_sources(args.ml100k), ds,
                                                  args.text_history, args.max_examples_per_user)["examples"]
        run = os.path.join(work, "run_ml")
        summary, res, train_s = _train_eval(ds, run, args, segments, args.id_epochs)
        result["ml100k"] = {"models": res["models"], "train_seconds": round(train_s, 1),
                            "epochs_run": summary.epochs_run, "segments": summary.num_segments,
                            "beta": res["config"]["beta"], "cold_start": res.get("cold_start"),
                            "segment_quality": res["segment_quality"], "repeat_targets": res.get("repeat_targets"),
                            "model_selection": res.get("model_selection")}
        if "ablations" not in skip:
            result["ml100k"]["ablations"] = _ablations(ds, work, "ml", args, segments, run, res,
                                                       names=set(args.ml100k_ablations.split(",")))
        result["ml100k"]["targets"] = ml100k_targets(result["ml100k"])
        machine.write_results(args.results_dir, "quality", result, [render(result)])  # a partial result first
        print(json.dumps(result["ml100k"]["targets"], indent=1), flush=True)
        if "throughput" not in skip:
            result["throughput_examples_per_s"] = _throughput(ds, run, args, args.throughput_steps)

    if "generated" not in skip:
        raw, ds = os.path.join(work, "gen_raw"), os.path.join(work, "gen_ds")
        synthetic.generate(synthetic.GenerateConfig(output_dir=raw, size=args.generated_size, seed=args.seed))
        srcs = readers.generic_sources(*(os.path.join(raw, f) for f in ("interactions.csv", "items.csv", "users.csv")))
        _preprocess(srcs, ds, args.text_history, args.max_examples_per_user)
        k = 6
        gen_args = argparse.Namespace(**{**vars(args), "batch_size": args.generated_batch_size, "steps_per_epoch": None})
        # A second seed first, so the main run's evaluation reports stability (ARI between seeds).
        _train_eval(ds, os.path.join(work, "run_gen_seed2"), gen_args, k, 1, seed=args.seed + 1, baselines=())
        run = os.path.join(work, "run_gen")
        summary, res, _ = _train_eval(ds, run, gen_args, k, args.id_epochs,
                                      compare_run=os.path.join(work, "run_gen_seed2"))
        ari = res["segment_quality"].get("adjusted_rand")
        result["generated"] = {"models": res["models"], "segment_quality": res["segment_quality"],
                               "beta": res["config"]["beta"], "cold_start": res.get("cold_start"),
                               "stability_ari_between_seeds": res.get("stability"),
                               "reference_ari_kmeans_on_true_category_shares": reference_ari(raw, k, args.seed),
                               "targets": {"ARI >= 0.9": {"value": ari, "met": ari is not None and ari >= 0.9}}}
        if "ablations" not in skip:
            result["generated"]["ablations"] = _ablations(ds, work, "gen", gen_args, k, run, res)
        print(json.dumps(result["generated"]["targets"]), flush=True)

    machine.write_results(args.results_dir, "quality", result, [render(result)])
    return result


NEW_USERS = "new users (profile text only)"
SPARSE = "sparse users (last {n} items)"


def ml100k_targets(m: dict) -> dict:
    """The issue's targets, each {"value", "baseline", "ratio", "met"}."""
    models, seg, out = m["models"], m["models"]["segrec"], {}

    def target(name, value, base, factor=1.0, strict=False):
        if value is None or base is None:
            return
        out[name] = {"value": value, "baseline": base, "ratio": round(value / base, 3) if base else None,
                     "met": bool(value > factor * base if strict else value >= factor * base)}

    if "sasrec" in models:
        target("NDCG@10 >= SASRec", seg["ndcg@10"], models["sasrec"]["ndcg@10"])
        target("Recall@10 >= SASRec", seg["recall@10"], models["sasrec"]["recall@10"])
    if "ease" in models:
        target("Recall@50 >= 1.10x EASE", seg["recall@50"], models["ease"]["recall@50"], 1.10)
    cold = m.get("cold_start") or {}
    if SPARSE.format(n=2) in cold:
        c = cold[SPARSE.format(n=2)]
        target("cold users (last 2 items): Recall@50 >= 1.3x popularity", c["segrec"]["recall@50"],
               c["popularity"]["recall@50"], 1.3)
    if NEW_USERS in cold:
        c = cold[NEW_USERS]
        target("new users (text only): Recall@50 > popularity", c["segrec"]["recall@50"],
               c["popularity"]["recall@50"], strict=True)
    abl = m.get("ablations") or {}
    on, off = abl.get(SEGMENTS_ON), abl.get(SEGMENTS_OFF)
    if on and off:  # "segrec" here is the segment prior, "baseline" the same model with segments off
        target("segments on (segment prior) > off: NDCG@10", on["models"]["segrec"]["ndcg@10"],
               off["models"]["segrec"]["ndcg@10"], strict=True)
        sparse = SPARSE.format(n=5)
        on_cold, off_cold = on.get("cold_start") or {}, off.get("cold_start") or {}
        if sparse in on_cold and sparse in off_cold:
            target("segments on (segment prior) > off: NDCG@10, users cut to 5 items",
                   on_cold[sparse]["segrec"]["ndcg@10"], off_cold[sparse]["segrec"]["ndcg@10"], strict=True)
    return out


def _f(v) -> str:
    return "-" if v is None else f"{float(v):.4f}"


def _models_table(models: dict) -> list:
    lines = ["| model | Recall@10 | Recall@50 | Recall@100 | NDCG@10 | MRR | coverage@10 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in models.items():
        lines.append(f"| {name} | {_f(s.get('recall@10'))} | {_f(s.get('recall@50'))} | {_f(s.get('recall@100'))} | "
                     f"{_f(s.get('ndcg@10'))} | {_f(s.get('mrr'))} | {_f(s.get('coverage@10'))} |")
    return lines


def _ablation_table(abl: dict) -> list:
    lines = ["| variant | beta | Recall@10 | Recall@50 | NDCG@10 | NDCG@10, cut to 5 items | Recall@50, new users |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in abl.items():
        s, cold = row["models"]["segrec"], row.get("cold_start") or {}
        sparse = cold.get(SPARSE.format(n=5), {}).get("segrec", {})
        new = cold.get(NEW_USERS, {}).get("segrec", {})
        lines.append(f"| {name} | {row.get('beta')} | {_f(s.get('recall@10'))} | {_f(s.get('recall@50'))} | "
                     f"{_f(s.get('ndcg@10'))} | {_f(sparse.get('ndcg@10'))} | {_f(new.get('recall@50'))} |")
    return lines


def _cold_table(cold: dict) -> list:
    lines = ["| scenario | ranker | Recall@10 | Recall@50 | NDCG@10 |", "| --- | --- | ---: | ---: | ---: |"]
    for scenario, table in (cold or {}).items():
        for ranker, s in table.items():
            lines.append(f"| {scenario} | {ranker} | {_f(s.get('recall@10'))} | {_f(s.get('recall@50'))} | "
                         f"{_f(s.get('ndcg@10'))} |")
    return lines


def render(r: dict) -> str:
    lines = ["# Quality benchmark", "", f"`python -m bench.bench_quality`, {r['date']}. {machine.markdown(r['machine'])}",
             "", "Settings: `" + json.dumps(r["settings"]) + "`", ""]
    if "ml100k" in r:
        m = r["ml100k"]
        lines += ["## MovieLens 100K (temporal leave-last-1 test split, the event before it validation; everything "
                  "tuned chosen on validation, test scored once; full-catalog ranking, consumed items excluded)", "",
                  f"Examples: {r['ml100k_preprocess']}. segrec trained {m['epochs_run']} epochs in "
                  f"{m['train_seconds']} s, {m['segments']} segments, beta {m.get('beta')} (chosen on validation).",
                  ""] + _models_table(m["models"])
        lines += ["", "| target | segrec | baseline | ratio | met |", "| --- | ---: | ---: | ---: | --- |"]
        for name, t in m["targets"].items():
            lines.append(f"| {name} | {_f(t['value'])} | {_f(t['baseline'])} | {t['ratio']} | "
                         f"{'yes' if t['met'] else 'NO'} |")
        if m.get("ablations"):
            lines += ["", "### Ablations (same split, same training budget, test metrics of each validation-selected "
                      "model)", ""] + _ablation_table(m["ablations"])
        if m.get("cold_start"):
            lines += ["", "### Cold start (the test queries as if the user were new, or cut to their last items)", ""]
            lines += _cold_table(m["cold_start"])
    if "throughput_examples_per_s" in r:
        t = r["throughput_examples_per_s"]
        base = next(iter(t.values()))
        lines += ["", "## Training throughput (examples/s, cached text vectors, same run)", "",
                  "| model | examples/s | vs before |", "| --- | ---: | ---: |"]
        lines += [f"| {k} | {v} | {v / base:.2f}x |" for k, v in t.items()]
    if "generated" in r:
        g = r["generated"]
        q = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in g["segment_quality"].items()}
        stab = g.get("stability_ari_between_seeds")
        g = {**g, "stability_ari_between_seeds": round(stab, 4) if isinstance(stab, float) else stab}
        lines += ["", "## Generated data: planted segment recovery", "",
                  f"ARI {q.get('adjusted_rand')}, NMI {q.get('nmi')}, silhouette {q.get('silhouette')}; "
                  f"target ARI >= 0.9: {'met' if g['targets']['ARI >= 0.9']['met'] else 'NOT met'}. "
                  f"Stability (ARI of segment labels between two training seeds): "
                  f"{g.get('stability_ari_between_seeds')}. Reference: k-means (K={6}) on each user's true "
                  f"category shares, which no model sees, reaches ARI "
                  f"{g.get('reference_ari_kmeans_on_true_category_shares')} on the same data: the generator's noise "
                  "and cross-segment browsing cap what any clustering of behaviour can recover.", ""]
        lines += _models_table(g["models"])
        if g.get("ablations"):
            lines += ["", "### Ablations (generated data)", ""] + _ablation_table(g["ablations"])
        if g.get("cold_start"):
            lines += ["", "### Cold start (generated data)", ""] + _cold_table(g["cold_start"])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
