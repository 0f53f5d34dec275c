"""`segrec demo`: the main job end to end on the embedded synthetic data.

Each stage prints a numbered header and ends with a one-line result; a stage
that fails stops the demo with its name and what to do about it. The same
flow runs on MovieLens with `--data ml-100k --data-dir PATH`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Optional

from trainer.contracts import SEGMENTS_FILE


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    output_dir: str
    data: str = "generated"  # generated | ml-100k
    data_dir: Optional[str] = None  # ml-100k: local copy
    size: str = "small"
    seed: int = 42
    encoder: str = "minilm"  # tiny for tests / quick looks
    sequence_length: int = 64
    epochs: int = 8
    segments: object = 6
    max_examples_per_user: int = 8  # bounds the distinct texts MiniLM must encode on a CPU
    baselines: tuple = ("popularity", "ease", "id_two_tower", "sasrec")
    index: str = "scann"  # scann | brute_force
    beam_args: tuple = ()

    def __post_init__(self):
        if self.data not in ("generated", "ml-100k"):
            raise ValueError(f"--data must be generated or ml-100k, got {self.data!r}")
        if self.data == "ml-100k" and not self.data_dir:
            raise ValueError("--data ml-100k needs --data-dir PATH (a local copy of the MovieLens 100K files)")


class StageError(RuntimeError):
    """A demo stage failed; the message names the stage and what to do."""


@dataclasses.dataclass
class Stage:
    name: str
    run: Callable[[], str]  # returns a one-line result
    advice: str


def _run_stages(stages, echo=print) -> list:
    results = []
    for n, stage in enumerate(stages, 1):
        echo(f"\n[{n}/{len(stages)}] {stage.name}")
        start = time.time()
        try:
            result = stage.run()
        except Exception as err:  # noqa: BLE001 - reported with the stage's name, then re-raised
            raise StageError(f"stage '{stage.name}' failed: {err}\n  what to do: {stage.advice}") from err
        took = time.time() - start
        echo(f"    done in {took:.1f}s: {result}")
        results.append({"stage": stage.name, "seconds": round(took, 2), "result": result})
    return results


def run(config: DemoConfig, echo=print) -> dict:
    """Runs every stage; returns {stage results, paths}. Writes demo_summary.json."""
    from beam_pipelines import preprocess
    from beam_pipelines.sources import readers, synthetic
    from trainer.data import examples as ex

    raw_dir = os.path.join(config.output_dir, "raw")
    dataset_dir = os.path.join(config.output_dir, "dataset")
    state: dict = {}

    def generate() -> str:
        if config.data == "ml-100k":
            return f"using MovieLens 100K from {config.data_dir}"
        s = synthetic.generate(synthetic.GenerateConfig(output_dir=raw_dir, size=config.size, seed=config.seed), progress=True)
        return (f"{s.num_interactions:,} interactions, {s.num_users:,} users, {s.num_items:,} items, "
                f"{s.num_segments} planted segments in {raw_dir}")

    def raw_sources() -> tuple:
        if config.data == "ml-100k":
            return tuple(readers.movielens_100k_sources(config.data_dir))
        return tuple(readers.generic_sources(
            os.path.join(raw_dir, "interactions.csv"), os.path.join(raw_dir, "items.csv"), os.path.join(raw_dir, "users.csv")))

    def prep() -> str:
        sources = raw_sources()
        summary = preprocess.run(
            preprocess.PreprocessConfig(sources=tuple(sources), output_dir=dataset_dir, source_name=config.data,
                                        policy=ex.ExamplePolicy(max_examples_per_user=config.max_examples_per_user),
                                        overwrite=True),
            config.beam_args)
        state["preprocess"] = summary.stats
        echo(preprocess.format_summary(summary))
        st = summary.stats
        return (f"{st['examples']['train']:,} train / {st['examples']['valid']:,} valid / "
                f"{st['examples']['eval']:,} test examples in {dataset_dir}")

    run_dir = os.path.join(config.output_dir, "run")
    eval_dir = os.path.join(config.output_dir, "evaluation")

    def train_stage() -> str:
        from trainer.training import job as train

        tc = train.TrainConfig(dataset_dir=dataset_dir, output_dir=run_dir, encoder=config.encoder,
                               sequence_length=config.sequence_length, segments=config.segments,
                               epochs=config.epochs, warmup_epochs=1, batch_size=128, select_metric="recall@50",
                               embedding_dim=32, seed=config.seed, patience=3)
        summary = train.train(tc, env={})
        echo(train.format_summary(summary, tc))
        state["train"] = {"recall@50": summary.best_recall, "segments": summary.num_segments}
        return (f"{summary.epochs_run} epochs, {summary.num_segments} segments, validation recall@50 "
                f"{summary.best_recall:.3f} at beta {summary.beta:g} (epoch and beta chosen on validation)")

    def evaluate_stage() -> str:
        from trainer.evaluation import evaluate

        # Every baseline's hyper-parameters are chosen on the validation split; test is scored once.
        ec = evaluate.EvaluateConfig(run_dir=run_dir, output_dir=eval_dir, baselines=config.baselines, seed=config.seed)
        results = evaluate.evaluate(ec)
        echo(evaluate.format_summary(results))
        state["evaluate"] = results["models"]
        seg = results["models"]["segrec"]
        return f"segrec test recall@50 {seg['recall@50']:.3f}; report in {eval_dir}/report.md"

    models_dir = os.path.join(config.output_dir, "models")
    server_holder: dict = {}

    def export_stage() -> str:
        from serving.export import exporter as ex

        summary = ex.export(ex.ExportConfig(run_dir=run_dir, base_path=models_dir, index=config.index,
                                            overwrite=True, version=1, seed=config.seed), progress=True)
        state["export"] = {"version_dir": summary.version_dir, "index": config.index,
                           "recall@10": summary.recall_at_10}
        recall = "" if summary.recall_at_10 is None else f"; ScaNN recall@10 vs brute force {summary.recall_at_10:.3f}"
        return f"{config.index} export in {summary.version_dir}{recall}"

    def serve_stage() -> str:
        from serving.server.launch import ServerProcess

        server = ServerProcess(models_dir, log_path=os.path.join(config.output_dir, "serve.log"))
        server_holder["server"] = server
        server.start()
        return f"segrec serve is healthy on {server.target} (REST {server.rest_url}; log {server.log_path})"

    def query_stage() -> str:
        queries = query_users(dataset_dir, server_holder["server"].target,
                              os.path.join(state["export"]["version_dir"], SEGMENTS_FILE),
                              seed=config.seed, echo=echo)
        state["queries"] = queries
        with open(os.path.join(config.output_dir, "queries.json"), "w", encoding="utf-8") as f:
            json.dump(queries, f, indent=2)
        segs = sorted({q["segment_id"] for q in queries})
        return f"{len(queries)} users queried over gRPC (segments {segs}, one cold user); queries.json written"

    scores_dir = os.path.join(config.output_dir, "scores")

    def score_stage() -> str:
        from beam_pipelines import score, score_records

        summary = score.run(score.ScoreConfig(model_dir=models_dir, output_dir=scores_dir, sources=raw_sources(),
                                              source_name=config.data,
                                              formats=(score_records.JSONL, score_records.PARQUET),
                                              overwrite=True), config.beam_args)
        echo(score.format_summary(summary))
        users = summary.stats["users"]
        state["score"] = {"output_dir": scores_dir, "users": users, "files": summary.files}
        return (f"{users['scored']:,} users scored as of their latest event ({users['dead_lettered']:,} dead-lettered) "
                f"into {scores_dir} (jsonl + parquet)")

    def stop_stage() -> str:
        code = server_holder.pop("server").stop()
        state["server_exit_code"] = code
        if code != 0:
            raise RuntimeError(f"segrec serve exited with code {code} after SIGTERM")
        return "segrec serve drained and exited with code 0"

    segments_dir = os.path.join(config.output_dir, "segments_report")
    report_path = os.path.join(config.output_dir, "report.md")

    def report_stage() -> str:
        from trainer.segments import segment_report as segments_report

        written = segments_report.write_report(os.path.join(run_dir, SEGMENTS_FILE), segments_dir,
                                               embeddings=run_dir, compare_methods=True, seed=config.seed)
        state["segments_report"] = written
        write_demo_report(report_path, config, state, eval_dir, segments_dir)
        return f"{report_path} (evaluation: {eval_dir}/report.md, segments: {written['md']})"

    stages = [
        Stage("generate the embedded dataset" if config.data == "generated" else "locate MovieLens 100K", generate,
              "check that --output-dir is writable and has free space"),
        Stage("preprocess (Apache Beam)", prep,
              "read the dead-letter files and the error above; run `segrec preprocess` alone with -v for details"),
        Stage(f"train (encoder {config.encoder}, frozen and cached)", train_stage,
              "run `segrec train` alone with -v; with little memory or time, try --encoder tiny"),
        Stage("evaluate against popularity, EASE and an ID-only two-tower", evaluate_stage,
              "run `segrec evaluate --run-dir` alone with -v for details"),
        Stage(f"export a SavedModel ({config.index} index)", export_stage,
              "run `segrec export` alone with -v; if the ScaNN recall check fails, try --index brute_force"),
        Stage("start the development server (segrec serve)", serve_stage,
              "read serve.log in the output dir; is another process using the ports?"),
        Stage("query the server over gRPC (RecommenderClient)", query_stage,
              "read serve.log; run `segrec recommend --target HOST:PORT --user-text ...` by hand"),
        Stage("score every user in batch (Apache Beam RunInference)", score_stage,
              "read scores/dead_letter and the error above; run `segrec score` alone with -v for details"),
        Stage("stop the server (SIGTERM, graceful drain)", stop_stage, "read serve.log in the output dir"),
        Stage("write the report (markdown + plots)", report_stage,
              "run `segrec segments report --segments-file RUN/segments.json --embeddings RUN` alone with -v"),
    ]
    try:
        results = _run_stages(stages, echo)
    finally:
        leftover = server_holder.pop("server", None)
        if leftover is not None:  # a stage failed while the server ran: never leave it behind
            leftover.kill()
    summary = {"output_dir": config.output_dir, "stages": results, "dataset_dir": dataset_dir, "run_dir": run_dir,
               "evaluation_dir": eval_dir, "models_dir": models_dir, **state}
    path = os.path.join(config.output_dir, "demo_summary.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    echo(f"\ndemo finished: dataset {dataset_dir}, run {run_dir}, models {models_dir}, scores {scores_dir}; "
         f"summary {path}\nreport: {report_path}")
    return summary


def _segment_profile(segments: dict, seg: int) -> str:
    """One line: label, share, top categories (segments under the privacy floor: size only)."""
    for s in segments.get("segments", []):
        if int(s.get("id", -1)) == seg:
            if not s.get("profiled"):
                return f"segment {seg}: {s.get('size', 0)} users (too small to profile)"
            cats = ", ".join(f"{c['category']} (lift {c['lift']:.1f})" for c in s.get("top_categories", [])[:3])
            return f"segment {seg} \"{s.get('label', '')}\": {s.get('share', 0):.0%} of users; top categories {cats}"
    return f"segment {seg}: no profile"


def query_users(dataset_dir: str, target: str, segments_path: str, seed: int = 0, per_segment: int = 1,
                max_segments: int = 4, k: int = 10, echo=print) -> list:
    """Asks the server for a few known users from different segments and one cold user.

    Known users are queried as of now (their latest query in the dataset:
    user_text + history, exactly what the model was evaluated on). The cold
    user has a profile and no history, so the server falls back to the
    segment centroid. Prints each user's segment, its profile and the
    recommendations (titles from the catalog); returns them as dicts.
    """
    import numpy as np

    from serving.client import RecommenderClient, format_recommendation
    from trainer.data import arrays as da
    from trainer.data import examples as ex
    from trainer.data import tf_dataset as data_lib
    from trainer.segments import document as segments_doc

    catalog = data_lib.load_catalog(dataset_dir)
    titles = {i: t for i, t in zip(catalog.item_ids, catalog.titles) if t}
    segments = segments_doc.load(segments_path)
    ev = da.load_split(dataset_dir, "eval")
    rows = da.latest_per_user(ev)
    rng = np.random.default_rng(seed)
    rows = rng.permutation(rows)[:200]
    candidates = [(str(ev.user_ids[r]), str(ev.user_texts[r]), [h for h in ev.histories[r] if h]) for r in rows]
    out = []
    with RecommenderClient(target, timeout=30, segments_path=segments_path, titles=titles) as client:
        recs = []
        for start in range(0, len(candidates), 32):  # requests well under the server's batch limit
            recs += client.recommend_many([(text, hist) for _, text, hist in candidates[start:start + 32]], k=k)
        chosen, per_seg = [], {}
        for cand, rec in zip(candidates, recs):
            if per_seg.get(rec.segment_id, 0) < per_segment and (rec.segment_id in per_seg or len(per_seg) < max_segments):
                per_seg[rec.segment_id] = per_seg.get(rec.segment_id, 0) + 1
                chosen.append((cand, rec))
        users = da.load_users(dataset_dir)
        attributes = next(iter(users.values()), {}) if users else {}
        cold_text = ex.user_text(attributes, [])
        chosen.append((("(cold user)", cold_text, []), client.recommend(cold_text, [], k=k)))
    for (user_id, text, hist), rec in chosen:
        seen = set(hist)
        leaked = [i.item_id for i in rec.items if i.item_id in seen]
        if not rec.items or leaked:
            raise RuntimeError(f"user {user_id}: {'no recommendations' if not rec.items else f'items from the history {leaked}'}")
        echo(f"\n  user {user_id}: {text[:120]}")
        if hist:
            echo(f"  history ({len(hist)} items): " + ", ".join(titles.get(i, i) for i in hist[:5])
                 + (" ..." if len(hist) > 5 else ""))
        else:
            echo("  history: none (a cold user: the query falls back to the segment centroid)")
        echo("  " + _segment_profile(segments, rec.segment_id))
        echo("  " + format_recommendation(rec).replace("\n", "\n  "))
        out.append({"user_id": user_id, "user_text": text, "history": hist, "segment_id": rec.segment_id,
                    "segment_label": rec.segment_label, "model_version": rec.model_version,
                    "items": [{"item_id": i.item_id, "score": i.score, "title": i.title} for i in rec.items]})
    return out


def write_demo_report(path: str, config: DemoConfig, state: dict, eval_dir: str, segments_dir: str) -> None:
    """The demo's one-page report: what ran, the headline figures, the users
    queried over gRPC, and links to the evaluation and segment reports (whose
    plots it embeds)."""
    rel = lambda p: os.path.relpath(p, os.path.dirname(path))  # noqa: E731
    lines = ["# segrec demo", "", f"Data: {config.data}" + (f" (size {config.size})" if config.data == "generated" else "")
             + f", encoder {config.encoder}, index {config.index}, seed {config.seed}.", ""]
    models = state.get("evaluate", {})
    if models:
        keys = [k for k in ("recall@10", "recall@50", "ndcg@10") if k in next(iter(models.values()))]
        lines += ["## Retrieval quality (test split, scored once; everything tuned on validation)", "", "| model | " + " | ".join(keys) + " |",
                  "|---|" + "---:|" * len(keys)]
        lines += [f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |" for name, m in models.items()]
        lines += ["", f"Full evaluation: [{rel(os.path.join(eval_dir, 'report.md'))}]"
                      f"({rel(os.path.join(eval_dir, 'report.md'))})", ""]
    lines += ["## Users queried over gRPC", ""]
    for q in state.get("queries", []):
        items = ", ".join(i["title"] or i["item_id"] for i in q["items"][:5])
        lines.append(f"- **{q['user_id']}** (history {len(q['history'])}): segment {q['segment_id']} "
                     f"\"{q['segment_label']}\" -> {items}")
    if "score" in state:
        u = state["score"]["users"]
        lines += ["", "## Batch scoring", "", f"{u['scored']:,} users scored, {u['dead_lettered']:,} dead-lettered; "
                  f"records in [{rel(state['score']['output_dir'])}]({rel(state['score']['output_dir'])})."]
    lines += ["", "## Segments", "", f"Segment report: [{rel(os.path.join(segments_dir, 'report.md'))}]"
              f"({rel(os.path.join(segments_dir, 'report.md'))}) (HTML: report.html beside it).", ""]
    for name in ("segment_sizes.png", "user_embeddings_2d.png", "segment_category_heatmap.png"):
        if os.path.exists(os.path.join(eval_dir, name)):
            lines.append(f"![{name}]({rel(os.path.join(eval_dir, name))})")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
