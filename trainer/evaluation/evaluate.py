"""`segrec evaluate` as a library: full-catalog ranking of a trained run
against baselines, per-segment breakdowns, segment quality and the report.

Honest by construction: everything tuned is chosen on the validation split
and the test split (eval-*) is scored once.

- segrec: the run's checkpoint (best validation epoch) and beta (chosen on
  validation unless forced), both recorded by `segrec train` in metrics.json;
  evaluate reads them and scores test.
- Baselines (trainer.evaluation.selection): fitted on every training
  interaction (the event log's training period), hyper-parameters chosen on
  the validation queries (EASE l2 from a grid, the ID two-tower's epochs, ...)
  by the validation Recall@K that chose segrec's epoch, then refitted on the
  training and validation periods - what a test query may see - and scored
  on test once.

Every model is ranked on the same test queries, over the same candidates
(the whole catalog, in `trainer.data.tf_dataset.Catalog` order, minus what
the dataset's repeat rule removes: trainer.data.candidates), with the same
pessimistic tie rule, so the numbers in one table are comparable. Under the
"exclude" repeat rule the queries whose target the user already consumed
are not in the main metrics; they get their own "repeat targets" row, ranked
with nothing removed (as under "allow"), for information.

Users and baselines: the users with fitting pairs get indices 0..U-1; query
users without any get indices >= U: popularity ranks their items like
everyone's; EASE and the ID two-tower score every item 0 for them (they know
nothing of the user), which the pessimistic tie rule ranks last - an honest
miss, not a lucky hit. The segrec model reads their text and history, which
is the point of its text tower.

Segments: each query is grouped by the segment the model assigns to it, and
the baselines are broken down by the same groups, so a segment where segrec
wins or loses is visible side by side.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Optional

import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from trainer import features, reporting
from trainer.data import arrays as da
from trainer.data import examples as ex
from trainer.data import tf_dataset as data
from trainer.evaluation import cold_start as cold_start_lib
from trainer.evaluation import ranking as metrics
from trainer.evaluation import report, selection
from trainer.model import run_dir as rd
from trainer.model.batched_outputs import model_outputs
from trainer.segments import quality as sq

_LOG = logging.getLogger("segrec.evaluate")

MODEL_NAME = "segrec"
EVALUATION_DIR = "evaluation"


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Settings of one `segrec evaluate` run (built by the CLI adapter)."""

    run_dir: str
    dataset_dir: Optional[str] = None  # default: the run's train_config["dataset_dir"]
    output_dir: Optional[str] = None  # default: <run_dir>/evaluation
    ks: tuple = metrics.DEFAULT_KS
    beta: Optional[float] = None  # default: the run's (chosen on validation by `segrec train`)
    baselines: tuple = ("popularity", "ease", "id_two_tower", "sasrec")
    baseline_params: tuple = ()  # ((name, {param: value}), ...); a tuned param given here is forced
    baseline_grids: tuple = ()  # ((name, (values...)), ...): overrides selection.TUNING's grids
    selection_metric: Optional[str] = None  # default: the run's select_metric (what chose segrec's epoch)
    truth_path: Optional[str] = None  # default: dataset_arrays.truth_path_for(dataset_dir)
    compare_run_dir: Optional[str] = None  # a second run: stability ARI of segment labels
    cold_max_history: int = 2
    batch_size: int = 512
    seed: int = 0

    def __post_init__(self):
        if not self.ks or any(int(k) < 1 for k in self.ks):
            raise ValueError(f"ks must be positive cut-offs, e.g. (10, 50, 100); got {self.ks!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if self.cold_max_history < 0:
            raise ValueError(f"cold_max_history must be >= 0; got {self.cold_max_history}")
        unknown = [b for b in self.baselines if b not in selection.REGISTRY]
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}; choose from {sorted(selection.REGISTRY)}")
        extra = [name for name, _ in tuple(self.baseline_params) + tuple(self.baseline_grids)
                 if name not in self.baselines]
        if extra:
            raise ValueError(f"baseline_params name {extra}, which are not among baselines {list(self.baselines)}")
        if self.selection_metric is not None and not (
                self.selection_metric.startswith("recall@") or self.selection_metric in ("ndcg@10", "mrr")):
            raise ValueError(f"selection_metric must be recall@K, ndcg@10 or mrr; got {self.selection_metric!r}")


@dataclasses.dataclass
class Evaluation:
    """What `run_evaluation` computed, beyond the JSON-able results.

    queries: [Q] rows of the eval (test) split in the main metrics; targets:
    [Q] catalog index of each query's target; exclude: Q int arrays (catalog
    indices each is ranked without: the repeat rule); segment_of_query: [Q]
    segment the model assigned; rankings: model name ->
    trainer.evaluation.ranking.RankingResult over the Q queries; user_ids [U],
    user_embeddings [U, d], user_labels [U]: one row per user;
    repeat_queries: rows of the eval split whose target the user already
    consumed (under "exclude": not in `queries`); repeat_rankings: model name
    -> their RankingResult, nothing removed; selection: report.json's
    "model_selection".
    """

    results: dict
    item_ids: tuple
    queries: np.ndarray
    targets: np.ndarray
    exclude: list
    segment_of_query: np.ndarray
    rankings: dict
    user_ids: np.ndarray
    user_embeddings: np.ndarray
    user_labels: np.ndarray
    repeat_queries: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    repeat_rankings: dict = dataclasses.field(default_factory=dict)
    selection: dict = dataclasses.field(default_factory=dict)


# --- model outputs ------------------------------------------------------------------


SPARSE_HISTORY = 5  # cold start: users cut to their last 5 items (beside cold_max_history)


def item_vectors(model, item_ids) -> tuple[np.ndarray, np.ndarray]:
    """Model item embeddings in catalog order.

    Returns (vectors [N, d], known [N] bool); an item the model was not
    trained with (another dataset dir) has a zero vector and known=False.
    """
    emb = np.asarray(model.item_embeddings(), np.float32)  # [N_model, d]
    if tuple(model.item_ids) == tuple(item_ids):
        return emb, np.ones(len(item_ids), bool)
    index = {i: r for r, i in enumerate(model.item_ids)}
    rows = np.array([index.get(i, -1) for i in item_ids], np.int64)
    out = np.zeros((len(item_ids), emb.shape[1]), np.float32)
    out[rows >= 0] = emb[rows[rows >= 0]]
    return out, rows >= 0


def rank_queries(score_fn, queries: da.RankedQueries, batch_size: int) -> tuple:
    """(main ranking, repeat-target ranking) of one model on `queries`.

    score_fn(positions [b] into queries.rows) -> [b, N]. Main: the queries of
    the main metrics (candidates.main), ranked without what the repeat rule
    removes. Repeat targets: the queries whose target the user already
    consumed, ranked with nothing removed (for information; under "allow"
    they are in the main ranking too).
    """
    main = np.flatnonzero(queries.candidates.main)
    rep = np.flatnonzero(queries.candidates.repeat)
    exclude = [queries.candidates.exclude[i] for i in main]
    main_r = metrics.rank_targets(lambda s: score_fn(main[s]), main.size, queries.targets[main], exclude, batch_size)
    rep_r = metrics.rank_targets(lambda s: score_fn(rep[s]), rep.size, queries.targets[rep], None, batch_size)
    return main_r, rep_r


# --- helpers of the report ---------------------------------------------------------------
def _segment_names(run, k: int) -> list:
    """Display names "segment k" or "segment k: <label>" (unique even when labels repeat)."""
    labels = {}
    if run.segments:
        labels = {int(s["id"]): str(s.get("label", "")) for s in run.segments.get("segments", [])}
    names = []
    for i in range(k):
        label = labels.get(i, "")
        names.append(label if label.startswith(f"segment {i}") else (f"segment {i}: {label}" if label else f"segment {i}"))
    return names


def _snapshot_outputs(model, splits, rows, beta, cache, batch_size, first_outputs=None):
    """EMBEDDING and SEGMENT_ID per snapshot user: `rows` of each of `splits`
    (da.snapshot_rows); the first split's may reuse `first_outputs`, indexed by its row."""
    emb, seg = [], []
    for j, (split, r) in enumerate(zip(splits, rows)):
        if j == 0 and first_outputs is not None:
            emb.append(first_outputs[features.EMBEDDING][r])
            seg.append(first_outputs[features.SEGMENT_ID][r])
        elif len(r):
            out = model_outputs(model, split, r, beta, cache, batch_size)
            emb.append(out[features.EMBEDDING])
            seg.append(out[features.SEGMENT_ID])
    return np.concatenate(emb), np.concatenate(seg).astype(np.int64)


def segment_category_shares(train: da.SplitArrays, user_label: dict, catalog, k: int) -> tuple[np.ndarray, list]:
    """[K, C] share of segment k's training interactions (targets) in category c.

    An item with several categories counts in each, so a row may sum above 1.
    Returns (shares, category names).
    """
    cats = list(catalog.category_vocab)
    cats += sorted({c for cs in catalog.categories for c in cs} - set(cats))
    col = {c: j for j, c in enumerate(cats)}
    item_cats = dict(zip(catalog.item_ids, catalog.categories))
    counts = np.zeros((k, len(cats)), np.float64)
    totals = np.zeros(k, np.float64)
    for u, item in zip(train.user_ids, train.item_ids):
        seg = user_label.get(u)
        if seg is None:
            continue
        totals[seg] += 1
        for c in item_cats.get(item, ()):
            counts[seg, col[c]] += 1
    shares = np.divide(counts, totals[:, None], out=np.zeros_like(counts), where=totals[:, None] > 0)
    return shares, cats


def segrec_selection(run, beta: float, forced_beta: bool) -> dict:
    """What chose segrec's checkpoint and beta, from the run's metrics.json."""
    path = rd.path(run.run_dir, rd.METRICS)
    chosen = rd.read_json(path).get("selection") if tf.io.gfile.exists(path) else None
    if not chosen:
        return {"split": None, "note": "the run records no selection (trained by an older segrec): its epoch "
                                       "and beta may have been chosen on the test split", "beta": beta}
    out = dict(chosen)
    if forced_beta:
        out["beta"] = {**chosen.get("beta", {}), "evaluated": beta, "forced_by_evaluate": True}
    return out


def _baselines(config, names, events, valid_q, test_q, item_index, metric, ks, progress) -> tuple:
    """Chooses each baseline on validation, refits it on train + valid, ranks test.

    Returns ({name: (main ranking, repeat ranking)}, {name: selection record}, users not in the refit).
    """
    params = {name: dict(p) for name, p in config.baseline_params}
    grids = {name: tuple(v) for name, v in config.baseline_grids}
    select_ks = tuple(sorted(set(ks) | {int(metric.split("@")[1])})) if metric.startswith("recall@") else ks

    def period(splits, queries):
        u, i, t = events.pairs(splits)
        users = selection.user_index(u, queries.split.user_ids[queries.rows])
        n_fit = len(set(u))
        return selection.fit_data(u, i, t, item_index, users, n_fit), users, n_fit

    train_data, valid_users, _ = period((ex.TRAIN,), valid_q)
    test_data, test_users, n_test_fit = period((ex.TRAIN, ex.VALID), test_q)
    v_users = np.array([valid_users[u] for u in valid_q.split.user_ids[valid_q.rows]], np.int64)
    t_users = np.array([test_users[u] for u in test_q.split.user_ids[test_q.rows]], np.int64)
    v_main = np.flatnonzero(valid_q.candidates.main)
    valid_pairs = (v_users[v_main], valid_q.targets[v_main])

    def validate(model):
        main_r, _ = rank_queries(lambda s: model.score(v_users[s]), valid_q, config.batch_size)
        return metrics.summarize(main_r, select_ks)

    if progress and names:
        from tqdm.auto import tqdm

        names = tqdm(list(names), desc="baselines", unit="model")
    rankings, records = {}, {}
    for name in names:
        p = params.get(name, {})
        if "seed" in selection.make_baseline(name).get_config():
            p.setdefault("seed", config.seed)
        chosen = selection.select(name, p, train_data, validate, metric, valid_pairs, grids.get(name))
        t = time.time()
        model = selection.refit(chosen, test_data)
        rankings[name] = rank_queries(lambda s, m=model: m.score(t_users[s]), test_q, config.batch_size)
        records[name] = {**chosen.record, "refit_on": [ex.TRAIN, ex.VALID], "scored_on": ex.EVAL}
        _LOG.info("baseline %s refitted on train + valid and scored on test in %.1f s", name, time.time() - t)
    return rankings, records, int(len(test_users) - n_test_fit)


# --- the command ------------------------------------------------------------------------
def run_evaluation(config: EvaluateConfig, progress: bool = True) -> Evaluation:
    """Everything `evaluate` computes, with the per-query rankings (see module docstring)."""
    timings = {}
    t0 = clock = time.time()

    def lap(stage):
        nonlocal clock
        now = time.time()
        timings[stage] = round(now - clock, 3)
        clock = now

    run = rd.load_run(config.run_dir)
    model = run.model
    if not config.dataset_dir and not run.train_config.get("dataset_dir"):
        raise ValueError(f"{config.run_dir}: train_config.json names no dataset_dir; pass the dataset dir explicitly")
    dataset_dir = config.dataset_dir or run.dataset_dir
    da.require_validation(dataset_dir)
    output_dir = config.output_dir or rd.path(config.run_dir, EVALUATION_DIR)
    beta = float(run.train_config.get("beta", 0.0) if config.beta is None else config.beta)
    ks = tuple(int(k) for k in config.ks)
    metric = (config.selection_metric or run.train_config.get("select_metric")
              or f"recall@{int(run.train_config.get('recall_k', 50))}")  # runs written before --select-metric
    rule = da.repeat_rule(dataset_dir)
    catalog = data.load_catalog(dataset_dir)
    events = da.load_events(dataset_dir)
    train = da.load_split(dataset_dir, ex.TRAIN)
    valid = da.load_split(dataset_dir, ex.VALID)
    ev = da.load_split(dataset_dir, ex.EVAL)  # the test split: every model below is scored on it once
    if not len(ev):
        raise ValueError(f"{dataset_dir}: the eval (test) split has no examples; nothing to evaluate")
    valid_q = da.load_queries(dataset_dir, ex.VALID, catalog.item_ids, rule, split=valid, events=events)
    test_q = da.load_queries(dataset_dir, ex.EVAL, catalog.item_ids, rule, split=ev, events=events)
    _LOG.info("loaded run %s, dataset %s: %d items, %d train / %d valid / %d test examples, repeat rule %r",
              config.run_dir, dataset_dir, len(catalog), len(train), len(valid), len(ev), rule)
    if test_q.unknown_target:
        _LOG.warning("%d test example(s) have a target outside the catalog; they are not ranked", test_q.unknown_target)
    lap("load")

    # Segment-aware model: outputs for every test row (the snapshot below reuses them).
    _LOG.info("segrec: scoring %d test queries at beta=%g", len(test_q), beta)
    outs = model_outputs(model, ev, np.arange(len(ev)), beta, run.text_cache, config.batch_size, progress,
                         "segrec queries")
    items, known_items = item_vectors(model, catalog.item_ids)
    if not known_items.all():
        _LOG.warning("%d catalog item(s) are unknown to the model; it ranks them last", int((~known_items).sum()))
    base_fn = metrics.vector_score_fn(outs[features.QUERY][test_q.rows], items)

    def segrec_scores(query_slice):
        scores = base_fn(query_slice)  # a fresh [b, N] product: safe to edit
        scores[:, ~known_items] = -np.inf
        return scores

    score_fn = base_fn if known_items.all() else segrec_scores
    main_rankings, repeat_rankings = {}, {}
    main_rankings[MODEL_NAME], repeat_rankings[MODEL_NAME] = rank_queries(score_fn, test_q, config.batch_size)
    main = np.flatnonzero(test_q.candidates.main)
    queries = test_q.rows[main]
    targets = test_q.targets[main]
    exclude = [test_q.candidates.exclude[i] for i in main]
    repeat_queries = test_q.rows[test_q.candidates.repeat]
    segment_of_query = outs[features.SEGMENT_ID][queries].astype(np.int64)
    lap("segrec")

    # Baselines: chosen on validation, refitted on train + valid, scored on the same test queries.
    base_rankings, base_records, new_users = _baselines(
        config, list(config.baselines), events, valid_q, test_q, da.item_index(catalog.item_ids), metric, ks, progress)
    for name, (m, r) in base_rankings.items():
        main_rankings[name], repeat_rankings[name] = m, r
    lap("baselines")
    model_selection = {
        "split": ex.VALID,
        "metric": metric,
        "repeats": rule,
        "test": {"split": ex.EVAL, "note": "scored once per model, after every choice was made on validation"},
        "models": {MODEL_NAME: segrec_selection(run, beta, config.beta is not None), **base_records},
    }

    # Metrics, breakdowns, recall curves.
    k = model.num_segments
    names = _segment_names(run, k)
    history_len = np.array([len(ev.histories[r]) for r in queries], np.int64)
    groups = metrics.segment_masks(segment_of_query, names)
    cold = metrics.cold_user_mask(history_len, config.cold_max_history)
    groups[f"cold users (history <= {config.cold_max_history})"] = cold
    groups[f"warm users (history > {config.cold_max_history})"] = ~cold
    summaries = {name: metrics.summarize(r, ks) for name, r in main_rankings.items()}
    repeat_summaries = {name: metrics.summarize(r, ks) for name, r in repeat_rankings.items()}
    breakdowns = {name: metrics.breakdown(r, groups, ks) for name, r in main_rankings.items()}
    curves = {name: metrics.recall_curve(r, range(1, max(max(ks), 100) + 1)) for name, r in main_rankings.items()}
    for name, s in summaries.items():
        _LOG.info("%s: %s", name, ", ".join(f"{m}={v:.4f}" for m, v in s.items() if m != "count"))
    lap("metrics")

    # Segment quality on one embedding per user, each as of their latest query (test, else valid, else train).
    splits = (ev, valid, train)
    user_ids, snap_rows = da.snapshot_rows(*splits)
    emb, labels = _snapshot_outputs(model, splits, snap_rows, beta, run.text_cache, config.batch_size, outs)
    quality = sq.segment_quality(emb, labels, seed=config.seed)
    truth_path = config.truth_path or da.truth_path_for(dataset_dir)
    if config.truth_path and not tf.io.gfile.exists(config.truth_path):
        raise FileNotFoundError(f"truth file {config.truth_path} does not exist (expected a user_id,segment CSV)")
    if truth_path:
        truth = da.load_truth(truth_path)
        has = np.array([u in truth for u in user_ids], bool)
        if has.any():
            t_q = sq.segment_quality(emb[has], labels[has], np.array([truth[u] for u in user_ids[has]]), seed=config.seed)
            quality.update({"adjusted_rand": t_q["adjusted_rand"], "nmi": t_q["nmi"], "truth_users": int(has.sum())})
            if not has.all():
                _LOG.warning("truth %s covers %d of %d users; ARI/NMI use those", truth_path, int(has.sum()), has.size)
        else:
            _LOG.warning("truth %s names none of the evaluated users; no ARI/NMI", truth_path)
    comparison = sq.compare_methods(emb, labels, k=k, seed=config.seed)
    stab = None
    if config.compare_run_dir:
        other = rd.load_run(config.compare_run_dir)
        other_beta = float(other.train_config.get("beta", 0.0))
        _, other_labels = _snapshot_outputs(other.model, splits, snap_rows, other_beta, other.text_cache,
                                            config.batch_size)
        stab = sq.stability(labels, other_labels)
        _LOG.info("stability vs %s: ARI %.4f", config.compare_run_dir, stab)
    lap("segment_quality")

    # Cold start: new users (text only) and sparse users, segrec vs popularity vs popular-in-segment.
    visible_u, visible_i, _ = events.pairs((ex.TRAIN, ex.VALID))
    index = da.item_index(catalog.item_ids)
    keep = np.array([i in index for i in visible_i], bool)
    pair_items = np.array([index[i] for i in visible_i[keep]], np.int64)
    popularity = np.bincount(pair_items, minlength=len(catalog)).astype(np.float64)
    seg_counts = cold_start_lib.segment_popularity(visible_u[keep], pair_items, dict(zip(user_ids, labels)), k,
                                                   len(catalog))
    cold_start = cold_start_lib.cold_start(model, ev, queries, targets, index, items, popularity, seg_counts, beta,
                                           run.text_cache, sorted({config.cold_max_history, SPARSE_HISTORY}),
                                           config.batch_size, ks)
    lap("cold_start")

    # Segment sizes and what each segment consumes.
    sizes = np.bincount(labels, minlength=k)
    shares, cat_names = segment_category_shares(train, dict(zip(user_ids, labels)), catalog, k)

    paths = report.write_report(
        output_dir, summaries, recall_curves=curves, breakdowns=breakdowns, segment_quality=quality,
        method_comparison=comparison, segment_sizes=sizes, segment_category_matrix=shares,
        category_names=cat_names, segment_labels=names, user_embeddings=emb, user_labels=labels,
        repeat_targets=repeat_summaries, model_selection=model_selection, cold_start=cold_start,
        seed=config.seed, title=f"segrec evaluation of {os.path.basename(config.run_dir.rstrip('/')) or config.run_dir}")
    lap("report")
    timings["total"] = round(time.time() - t0, 3)

    resolved = dict(dataclasses.asdict(config), dataset_dir=dataset_dir, output_dir=output_dir, beta=beta,
                    truth_path=truth_path, ks=list(ks), selection_metric=metric,
                    baseline_params={n: dict(p) for n, p in config.baseline_params},
                    baseline_grids={n: list(v) for n, v in config.baseline_grids})
    extra = {
        "stability": stab,
        "queries": {"ranked": int(len(queries)), "repeat_targets": int(len(repeat_queries)),
                    "unknown_target": int(test_q.unknown_target), "eval_users_not_in_train": new_users,
                    "repeats": rule},
        "config": resolved,
        "timings_s": timings,
        "paths": paths,
    }
    results = _finish_report(output_dir, extra, stab, config.compare_run_dir)
    _LOG.info("evaluation written to %s in %.1f s", output_dir, timings["total"])
    return Evaluation(results, catalog.item_ids, queries, targets, exclude, segment_of_query, main_rankings,
                      user_ids, emb, labels, repeat_queries, repeat_rankings, model_selection)


def _finish_report(output_dir: str, extra: dict, stab, compare_run_dir) -> dict:
    """Adds stability, config, timings and paths to report.json (and stability to
    report.md); returns report.json's content."""
    json_path = os.path.join(output_dir, report.REPORT_JSON)
    with open(json_path, encoding="utf-8") as f:
        results = json.load(f)
    results.update(reporting.jsonable(extra))  # same NaN -> null rule as the rest of the file
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, allow_nan=False)
        f.write("\n")
    if stab is not None:
        with open(os.path.join(output_dir, report.REPORT_MD), "a", encoding="utf-8") as f:
            f.write(f"\n## Segment stability\n\nAdjusted Rand index of the segment labels against run "
                    f"`{compare_run_dir}` on the same users: {stab:.4f} (1 = identical partitions, ~0 = chance).\n")
    return results


def evaluate(config: EvaluateConfig, progress: bool = True) -> dict:
    """Runs the evaluation, writes the report; returns report.json's content:
    {"models": {name: summary}, "breakdowns": {model: {group: summary}},
    "repeat_targets": {name: summary}, "cold_start": {scenario: {ranker:
    summary}}, "model_selection" (which split chose
    what: grids, chosen values), "segment_quality", "method_comparison",
    "stability" (float or None), "segment_sizes", "segment_labels", "category_names",
    "segment_category_matrix", "recall_curves", "figures", "queries",
    "config" (resolved), "timings_s", "paths"}. NaN metrics read None."""
    return run_evaluation(config, progress).results


def format_summary(results: dict) -> str:
    """A few lines for the terminal: metrics per model, segment quality, files."""
    models = results.get("models", {})
    keys = [k for k in next(iter(models.values()), {}) if k != "count"]
    width = max([len(m) for m in models] + [5])
    lines = ["model".ljust(width) + "  " + "  ".join(k.rjust(11) for k in keys)]
    for name, s in models.items():
        lines.append(name.ljust(width) + "  " + "  ".join(_num(s.get(k)).rjust(11) for k in keys))
    rep = results.get("repeat_targets", {})
    if rep and next(iter(rep.values()), {}).get("count"):
        lines.append(f"repeat targets ({next(iter(rep.values()))['count']} test queries, nothing removed): "
                     + ", ".join(f"{name} recall@{keys[0].split('@')[1] if keys else '?'} {_num(s.get(keys[0]))}"
                                 for name, s in rep.items()))
    for scenario, table in results.get("cold_start", {}).items():
        lines.append(f"cold start, {scenario}: " + ", ".join(
            f"{name} recall@{keys[1].split('@')[1] if len(keys) > 1 else '?'} "
            f"{_num(s.get(keys[1] if len(keys) > 1 else ''))}" for name, s in table.items()))
    sel = results.get("model_selection", {})
    if sel:
        chosen = []
        for name, rec in sel.get("models", {}).items():
            if "checkpoint" in rec:
                chosen.append(f"{name} epoch {rec['checkpoint'].get('best_epoch')}, beta "
                              f"{rec.get('beta', {}).get('evaluated', rec.get('beta', {}).get('chosen'))}")
            elif rec.get("param"):
                chosen.append(f"{name} {rec['param']}={rec.get('chosen')}" + (" (forced)" if rec.get("forced") else ""))
        lines.append(f"chosen on {sel.get('split')} by {sel.get('metric')} (repeat rule {sel.get('repeats')}): "
                     + "; ".join(chosen) + "; test scored once")
    q = results.get("segment_quality", {})
    seg = f"segments: {q.get('n_segments')} non-empty, silhouette {_num(q.get('silhouette'))}"
    if "adjusted_rand" in q:
        seg += f", ARI vs truth {_num(q['adjusted_rand'])}, NMI {_num(q.get('nmi'))}"
    if results.get("stability") is not None:
        seg += f", stability ARI {_num(results['stability'])}"
    lines.append(seg)
    paths = results.get("paths", [])
    if paths:
        lines.append(f"wrote {len(paths)} files to {os.path.dirname(paths[0])}: "
                     + ", ".join(os.path.basename(p) for p in paths))
    return "\n".join(lines)


def _num(v) -> str:
    return "-" if v is None else f"{float(v):.4f}"
