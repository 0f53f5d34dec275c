"""`segrec evaluate` as a library: full-catalog ranking of a trained run
against baselines, per-segment breakdowns, segment quality and the report.

Every model is ranked on the same queries (the eval split's examples), over
the same candidates (the whole catalog, in `trainer.data.tf_dataset.Catalog` order),
with the same exclusions (the user's training-period items and the query's
history; never the target, see trainer.evaluation.ranking) and the same pessimistic
tie rule, so the numbers in one table are comparable.

Users and baselines: baselines are fitted on the training split's
(user, target item) pairs, with user indices 0..U-1 for the users seen in
training. Eval users absent from training get indices >= U: popularity
ranks their items like everyone's; EASE and the ID two-tower score every
item 0 for them (they know nothing of the user), which the pessimistic tie
rule ranks last - an honest miss, not a lucky hit. The segrec model reads
their text and history, which is the point of its text tower.

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
from trainer.data import tf_dataset as data
from trainer.evaluation import baselines as baselines_lib
from trainer.evaluation import ranking as metrics
from trainer.evaluation import report
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
    beta: Optional[float] = None  # default: train_config.get("beta", 0.0)
    baselines: tuple = ("popularity", "ease", "id_two_tower")
    baseline_params: tuple = ()  # ((name, {param: value}), ...)
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
        unknown = [b for b in self.baselines if b not in baselines_lib.BASELINES]
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}; choose from {sorted(baselines_lib.BASELINES)}")
        extra = [name for name, _ in self.baseline_params if name not in self.baselines]
        if extra:
            raise ValueError(f"baseline_params name {extra}, which are not among baselines {list(self.baselines)}")


@dataclasses.dataclass
class Evaluation:
    """What `run_evaluation` computed, beyond the JSON-able results.

    queries: [Q] rows of the eval split that were ranked; targets: [Q] catalog
    index of each query's target; exclude: Q int arrays (catalog indices
    excluded per query); segment_of_query: [Q] segment the model assigned;
    rankings: model name -> trainer.evaluation.ranking.RankingResult over the Q queries;
    user_ids [U], user_embeddings [U, d], user_labels [U]: one row per user.
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


# --- model outputs ------------------------------------------------------------------


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


def exclusion_sets(split: da.SplitArrays, rows, train_items: dict, item_index: dict) -> list:
    """Per query: catalog indices of the user's training-period items and the
    query's own history (ids outside the catalog are skipped)."""
    out = []
    for r in rows:
        seen = set(train_items.get(split.user_ids[r], ())) | set(split.histories[r])
        out.append(np.array(sorted(item_index[i] for i in seen if i in item_index), np.int64))
    return out


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


def _snapshot_outputs(model, ev, train, ev_rows, tr_rows, beta, cache, batch_size, ev_outputs=None):
    """EMBEDDING and SEGMENT_ID per snapshot user (eval rows may reuse `ev_outputs`, indexed by eval row)."""
    if ev_outputs is not None:
        emb_e, seg_e = ev_outputs[features.EMBEDDING][ev_rows], ev_outputs[features.SEGMENT_ID][ev_rows]
    else:
        out = model_outputs(model, ev, ev_rows, beta, cache, batch_size)
        emb_e, seg_e = out[features.EMBEDDING], out[features.SEGMENT_ID]
    out = model_outputs(model, train, tr_rows, beta, cache, batch_size)
    return (np.concatenate([emb_e, out[features.EMBEDDING]]),
            np.concatenate([seg_e, out[features.SEGMENT_ID]]).astype(np.int64))


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


def _fit_baselines(config, train, user_index, n_train_users, item_index, n_items, progress):
    """name -> fitted baseline, on the training (user, target) pairs."""
    keep = np.array([i in item_index for i in train.item_ids], bool)
    u = np.array([user_index[x] for x in train.user_ids[keep]], np.int64)
    i = np.array([item_index[x] for x in train.item_ids[keep]], np.int64)
    params = {name: dict(p) for name, p in config.baseline_params}
    names = list(config.baselines)
    if progress and names:
        from tqdm.auto import tqdm

        names = tqdm(names, desc="baselines", unit="model")
    fitted = {}
    for name in names:
        p = params.get(name, {})
        if name == "id_two_tower":
            p.setdefault("seed", config.seed)
        t = time.time()
        fitted[name] = baselines_lib.make_baseline(name, **p).fit(u, i, n_items, n_users=n_train_users)
        _LOG.info("baseline %s fitted in %.1f s", name, time.time() - t)
    return fitted


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
    output_dir = config.output_dir or rd.path(config.run_dir, EVALUATION_DIR)
    beta = float(run.train_config.get("beta", 0.0) if config.beta is None else config.beta)
    ks = tuple(int(k) for k in config.ks)
    catalog = data.load_catalog(dataset_dir)
    train = da.load_split(dataset_dir, "train")
    ev = da.load_split(dataset_dir, "eval")
    if not len(ev):
        raise ValueError(f"{dataset_dir}: the eval split has no examples; nothing to evaluate")
    _LOG.info("loaded run %s, dataset %s: %d items, %d train / %d eval examples",
              config.run_dir, dataset_dir, len(catalog), len(train), len(ev))
    lap("load")

    item_index = da.item_index(catalog.item_ids)
    known_target = np.array([i in item_index for i in ev.item_ids], bool)
    if not known_target.all():
        _LOG.warning("%d eval example(s) have a target outside the catalog; they are not ranked",
                     int((~known_target).sum()))
    queries = np.flatnonzero(known_target)
    targets = np.array([item_index[i] for i in ev.item_ids[queries]], np.int64)
    train_items = da.train_items_by_user(train)
    exclude = exclusion_sets(ev, queries, train_items, item_index)
    history_len = np.array([len(ev.histories[r]) for r in queries], np.int64)

    # Segment-aware model: outputs for every eval row (the snapshot below reuses them).
    _LOG.info("segrec: scoring %d queries at beta=%g", len(queries), beta)
    outs = model_outputs(model, ev, np.arange(len(ev)), beta, run.text_cache, config.batch_size, progress, "segrec queries")
    items, known_items = item_vectors(model, catalog.item_ids)
    if not known_items.all():
        _LOG.warning("%d catalog item(s) are unknown to the model; it ranks them last", int((~known_items).sum()))
    base_fn = metrics.vector_score_fn(outs[features.QUERY][queries], items)

    def segrec_scores(query_slice):
        scores = base_fn(query_slice)  # a fresh [b, N] product: safe to edit
        scores[:, ~known_items] = -np.inf
        return scores

    score_fn = base_fn if known_items.all() else segrec_scores
    rankings = {MODEL_NAME: metrics.rank_targets(score_fn, len(queries), targets, exclude, config.batch_size)}
    segment_of_query = outs[features.SEGMENT_ID][queries].astype(np.int64)
    lap("segrec")

    # Baselines on the same queries; users unseen in training get indices >= n_train_users.
    train_users = sorted(set(train.user_ids))
    user_index = {u: j for j, u in enumerate(train_users)}
    for u in sorted(set(ev.user_ids) - set(user_index)):
        user_index[u] = len(user_index)
    query_users = np.array([user_index[u] for u in ev.user_ids[queries]], np.int64)
    fitted = _fit_baselines(config, train, user_index, len(train_users), item_index, len(catalog), progress)
    for name, b in fitted.items():
        rankings[name] = metrics.rank_targets(
            lambda s, b=b: b.score(query_users[s]), len(queries), targets, exclude, config.batch_size)
    lap("baselines")

    # Metrics, breakdowns, recall curves.
    k = model.num_segments
    names = _segment_names(run, k)
    groups = metrics.segment_masks(segment_of_query, names)
    cold = metrics.cold_user_mask(history_len, config.cold_max_history)
    groups[f"cold users (history <= {config.cold_max_history})"] = cold
    groups[f"warm users (history > {config.cold_max_history})"] = ~cold
    summaries = {name: metrics.summarize(r, ks) for name, r in rankings.items()}
    breakdowns = {name: metrics.breakdown(r, groups, ks) for name, r in rankings.items()}
    curves = {name: metrics.recall_curve(r, range(1, max(max(ks), 100) + 1)) for name, r in rankings.items()}
    for name, s in summaries.items():
        _LOG.info("%s: %s", name, ", ".join(f"{m}={v:.4f}" for m, v in s.items() if m != "count"))
    lap("metrics")

    # Segment quality on one embedding per user.
    user_ids, ev_rows, tr_rows = da.snapshot_rows(ev, train)
    emb, labels = _snapshot_outputs(model, ev, train, ev_rows, tr_rows, beta, run.text_cache, config.batch_size, outs)
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
        _, other_labels = _snapshot_outputs(other.model, ev, train, ev_rows, tr_rows, other_beta, other.text_cache,
                                            config.batch_size)
        stab = sq.stability(labels, other_labels)
        _LOG.info("stability vs %s: ARI %.4f", config.compare_run_dir, stab)
    lap("segment_quality")

    # Segment sizes and what each segment consumes.
    sizes = np.bincount(labels, minlength=k)
    shares, cat_names = segment_category_shares(train, dict(zip(user_ids, labels)), catalog, k)

    paths = report.write_report(
        output_dir, summaries, recall_curves=curves, breakdowns=breakdowns, segment_quality=quality,
        method_comparison=comparison, segment_sizes=sizes, segment_category_matrix=shares,
        category_names=cat_names, segment_labels=names, user_embeddings=emb, user_labels=labels,
        seed=config.seed, title=f"segrec evaluation of {os.path.basename(config.run_dir.rstrip('/')) or config.run_dir}")
    lap("report")
    timings["total"] = round(time.time() - t0, 3)

    resolved = dict(dataclasses.asdict(config), dataset_dir=dataset_dir, output_dir=output_dir, beta=beta,
                    truth_path=truth_path, ks=list(ks), baseline_params={n: dict(p) for n, p in config.baseline_params})
    extra = {
        "stability": stab,
        "queries": {"ranked": int(len(queries)), "unknown_target": int((~known_target).sum()),
                    "eval_users_not_in_train": int(len(user_index) - len(train_users))},
        "config": resolved,
        "timings_s": timings,
        "paths": paths,
    }
    results = _finish_report(output_dir, extra, stab, config.compare_run_dir)
    _LOG.info("evaluation written to %s in %.1f s", output_dir, timings["total"])
    return Evaluation(results, catalog.item_ids, queries, targets, exclude, segment_of_query, rankings,
                      user_ids, emb, labels)


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
    "segment_quality", "method_comparison", "stability" (float or None),
    "segment_sizes", "segment_labels", "category_names",
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
