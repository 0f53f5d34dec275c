"""The evaluation report: report.json, report.md and PNG figures.

`write_report` takes what `segrec evaluate` computed (metric summaries from
trainer.evaluation.ranking, segment quality from trainer.segments.quality, segment
statistics) as plain dicts and numpy arrays and writes:

  report.json                      everything, machine-readable (NaN -> null)
  report.md                        tables of all models side by side, the
                                   repeat targets, the model selection (which
                                   split chose what), the per-group
                                   breakdowns, segment quality, and links to
                                   the figures
  recall_curves.png                Recall@K vs K per model
  segment_sizes.png                users per segment
  segment_category_heatmap.png     what each segment consumes, by category
  user_embeddings_2d.png           users in 2-D (PCA; t-SNE on request),
                                   coloured by segment

Each optional input adds its table or figure; nothing else is required.
Figures are drawn on their own matplotlib Figure and written by the Agg
canvas: no pyplot, no `matplotlib.use()`, so the process's backend (a
notebook's inline plots, say) is left as it was.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence

import numpy as np

from trainer.reporting import (
    EMBEDDINGS_PNG,
    HEATMAP_PNG,
    QUALITY_KEYS,
    SIZES_PNG,
    fmt,
    jsonable,
    md_table,
    new_figure,
    plot_category_heatmap,
    plot_embeddings,
    plot_segment_sizes,
    project_2d,
    save_figure,
)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
RECALL_PNG = "recall_curves.png"

# Column order and headers of the metric tables; other keys follow sorted.
_HEADERS = {
    "recall@10": "Recall@10",
    "recall@50": "Recall@50",
    "recall@100": "Recall@100",
    "ndcg@10": "NDCG@10",
    "mrr": "MRR",
    "coverage@10": "Coverage@10",
    "count": "Queries",
}






def _metric_keys(summaries: Sequence[Mapping]) -> list[str]:
    """Columns: recall@K ascending in K, the known metrics, any others, count last."""
    keys = []
    for s in summaries:
        keys += [k for k in s if k not in keys]

    def recall_k(k):
        tail = k.split("@", 1)[1]
        return int(tail) if tail.isdigit() else 10**9

    recalls = sorted((k for k in keys if k.startswith("recall@")), key=recall_k)
    known = [k for k in ("ndcg@10", "mrr", "coverage@10") if k in keys]
    extra = sorted(k for k in keys if k not in recalls and k not in known and k != "count")
    return recalls + known + extra + (["count"] if "count" in keys else [])


def _header(k: str) -> str:
    return _HEADERS.get(k, k.replace("recall@", "Recall@"))








def models_table(results: Mapping[str, Mapping]) -> list[str]:
    """Markdown lines: one row per model, one column per metric; best in bold."""
    keys = _metric_keys(list(results.values()))
    best = {}
    for k in keys:
        if k == "count":
            continue
        vals = [v.get(k) for v in results.values()]
        finite = [float(v) for v in vals if isinstance(v, (int, float, np.number)) and math.isfinite(v)]
        if len(finite) > 1:
            best[k] = max(finite)  # every metric here is higher-is-better
    rows = []
    for name, s in results.items():
        cells = [fmt(name)]
        for k in keys:
            v = s.get(k)
            cell = fmt(v)
            if k in best and v is not None and math.isfinite(float(v)) and float(v) == best[k]:
                cell = f"**{cell}**"
            cells.append(cell)
        rows.append(cells)
    return md_table(["Model"] + [_header(k) for k in keys], rows)


def breakdown_table(breakdowns: Mapping[str, Mapping[str, Mapping]], metric_keys=("recall@10", "ndcg@10")) -> list[str]:
    """Markdown lines: one row per group, per model the chosen metrics.

    breakdowns: model -> group -> summary dict (trainer.evaluation.ranking.breakdown).
    """
    models = list(breakdowns)
    groups = []
    for by_group in breakdowns.values():
        groups += [g for g in by_group if g not in groups]
    header = ["Group", "Queries"] + [f"{m} {_header(k)}" for m in models for k in metric_keys]
    rows = []
    for g in groups:
        count = next((breakdowns[m][g].get("count") for m in models if g in breakdowns[m]), None)
        cells = [fmt(g), fmt(count)]
        for m in models:
            s = breakdowns[m].get(g, {})
            cells += [fmt(s.get(k)) for k in metric_keys]
        rows.append(cells)
    return md_table(header, rows)


def _value(v) -> str:
    """A hyper-parameter value as typed: 500, 0.25 (not 500.0000)."""
    if isinstance(v, (float, np.floating)) and math.isfinite(v):
        return f"{float(v):g}"
    return fmt(v)


def selection_lines(selection: Mapping) -> list[str]:
    """Markdown lines of the "Model selection" section: which split chose what."""
    split, metric = selection.get("split", "valid"), selection.get("metric", "?")
    lines = [f"Every choice below was made on the **{split}** split by {metric} (full catalog, repeat rule: "
             f"{selection.get('repeats', '?')}); the test split was scored once, afterwards. Baselines are fitted "
             "on every training interaction, chosen on validation, then refitted on the training and validation "
             "periods (what a test query may see); segrec's weights are trained on the training period only.", ""]
    rows = []
    for name, rec in selection.get("models", {}).items():
        if "checkpoint" in rec:  # segrec, from metrics.json
            ck, beta, k = rec["checkpoint"], rec.get("beta", {}), rec.get("num_segments", {})
            curve = ", ".join(f"{e + 1}: {fmt(v)}" for e, v in enumerate(ck.get("per_epoch", [])))
            rows.append([name, "epoch (best checkpoint, early stopping)", rec.get("split"), curve, fmt(ck.get("best_epoch"))])
            grid = ", ".join(f"{_value(b)}: {fmt(v)}" for b, v in beta.get("grid", []))
            chosen = _value(beta.get("evaluated", beta.get("chosen")))
            how = "forced" if beta.get("forced") or beta.get("forced_by_evaluate") else rec.get("split")
            rows.append([name, "beta", how, grid, chosen])
            if k.get("sweep"):
                sweep = ", ".join(f"{kk}: {fmt(v)}" for kk, v in k["sweep"])
                rows.append([name, "K (silhouette)", k.get("split"), sweep, fmt(k.get("chosen"))])
        elif "note" in rec:
            rows.append([name, "-", "unknown", rec["note"], "-"])
        elif rec.get("param"):
            grid = ", ".join(f"{_value(v)}: {fmt(m)}" for v, m in rec.get("grid", []))
            rows.append([name, rec["param"], "forced" if rec.get("forced") else rec.get("split"), grid or "-",
                         _value(rec.get("chosen"))])
        elif rec.get("self_selected"):
            sel = rec["self_selected"]
            rows.append([name, "epochs (its own validation selection)", sel.get("split"),
                         f"{sel.get('metric')}: {fmt(sel.get('best_value'))}", fmt(sel.get("best_epoch"))])
        else:
            rows.append([name, "nothing to tune", "-", "-", "-"])
    rows = [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    return lines + md_table(["Model", "Chosen", "On", f"Grid (value: validation {metric})", "Value"], rows)


def _plot_recall_curves(path, curves, title):
    fig, ax = new_figure((7, 4.5))
    for name, (ks, values) in curves.items():
        ax.plot(np.asarray(ks), np.asarray(values), label=name, linewidth=1.8)
    ax.set_xlabel("K (number of recommended items)")
    ax.set_ylabel("Recall@K (share of held-out items found)")
    ax.set_title(f"{title}: Recall@K by model")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(fig, path)












def write_report(
    out_dir: str,
    results: Mapping[str, Mapping],
    *,
    recall_curves: Mapping[str, tuple] | None = None,
    breakdowns: Mapping[str, Mapping[str, Mapping]] | None = None,
    segment_quality: Mapping | None = None,
    method_comparison: Sequence[Mapping] | None = None,
    segment_sizes: Sequence[int] | np.ndarray | None = None,
    segment_category_matrix: np.ndarray | None = None,
    category_names: Sequence[str] | None = None,
    segment_labels: Sequence[str] | None = None,
    user_embeddings_2d: np.ndarray | None = None,
    user_embeddings: np.ndarray | None = None,
    user_labels: np.ndarray | None = None,
    projection: str = "pca",
    max_points: int = 5000,
    seed: int = 0,
    title: str = "segrec evaluation",
    repeat_targets: Mapping[str, Mapping] | None = None,
    model_selection: Mapping | None = None,
    cold_start: Mapping[str, Mapping[str, Mapping]] | None = None,
) -> list[str]:
    """Writes report.json, report.md and the figures whose inputs are given.

    Args:
      out_dir: created if missing.
      results: model name -> trainer.evaluation.ranking.summarize() dict.
      recall_curves: model name -> (ks [n], recall [n]) (trainer.evaluation.ranking.recall_curve).
      breakdowns: model name -> group name -> summarize() dict
        (trainer.evaluation.ranking.breakdown: per segment, cold users).
      segment_quality: trainer.segments.quality.segment_quality() dict.
      method_comparison: trainer.segments.quality.compare_methods() rows.
      segment_sizes: [K] users per segment.
      segment_category_matrix: [K, C] interactions of segment k's users with
        category c; plotted as row shares.
      category_names: [C] names; segment_labels: [K] display names.
      user_embeddings_2d: [U, 2] points to plot as given, or
      user_embeddings: [U, d] raw embeddings, projected by `projection`
        ("pca", or "tsne" - slower) after a seeded sample of `max_points`.
      user_labels: [U] segment per user (colours; -1 = noise).
      title: heading of the report and prefix of figure titles.
      repeat_targets: model name -> summarize() dict of the queries whose
        target the user already consumed (ranked with nothing removed).
      model_selection: what chose each model's configuration, on which split
        (trainer.evaluation.evaluate's "model_selection").
      cold_start: scenario -> ranker -> summarize() dict
        (trainer.evaluation.cold_start.cold_start).

    Returns:
      Paths written, report.json and report.md first.
    """
    os.makedirs(out_dir, exist_ok=True)
    figures: dict[str, str] = {}

    if recall_curves:
        _plot_recall_curves(os.path.join(out_dir, RECALL_PNG), recall_curves, title)
        figures["Recall@K by model"] = RECALL_PNG
    if segment_sizes is not None and len(segment_sizes):
        plot_segment_sizes(os.path.join(out_dir, SIZES_PNG), segment_sizes, segment_labels, title)
        figures["Users per segment"] = SIZES_PNG
    if segment_category_matrix is not None:
        plot_category_heatmap(os.path.join(out_dir, HEATMAP_PNG), segment_category_matrix, category_names, segment_labels, title)
        figures["Category mix per segment"] = HEATMAP_PNG
    if user_embeddings_2d is not None or user_embeddings is not None:
        raw = user_embeddings_2d if user_embeddings_2d is not None else user_embeddings
        raw = np.asarray(raw)
        labels = None if user_labels is None else np.asarray(user_labels)
        if labels is not None and labels.shape[0] != raw.shape[0]:
            raise ValueError(f"user_labels has {labels.shape[0]} entries; embeddings have {raw.shape[0]} rows")
        if raw.shape[0] > max_points:
            idx = np.sort(np.random.default_rng(seed).choice(raw.shape[0], max_points, replace=False))
            raw = raw[idx]
            labels = None if labels is None else labels[idx]
        if user_embeddings_2d is not None:
            points, method = raw[:, :2], "given"
        else:
            points, method = project_2d(raw, projection, seed), projection
        plot_embeddings(os.path.join(out_dir, EMBEDDINGS_PNG), points, labels, segment_labels, title, method)
        figures["User embeddings in 2-D"] = EMBEDDINGS_PNG

    payload = {
        "title": title,
        "models": results,
        "breakdowns": breakdowns or {},
        "segment_quality": segment_quality or {},
        "method_comparison": list(method_comparison or []),
        "segment_sizes": None if segment_sizes is None else list(np.asarray(segment_sizes).tolist()),
        "segment_labels": None if segment_labels is None else [str(s) for s in segment_labels],
        "category_names": None if category_names is None else [str(c) for c in category_names],
        "segment_category_matrix": None if segment_category_matrix is None else np.asarray(segment_category_matrix),
        "recall_curves": {
            name: {"k": np.asarray(ks), "recall": np.asarray(vals)} for name, (ks, vals) in (recall_curves or {}).items()
        },
        "figures": figures,
        "repeat_targets": repeat_targets or {},
        "model_selection": model_selection or {},
        "cold_start": cold_start or {},
    }
    json_path = os.path.join(out_dir, REPORT_JSON)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(jsonable(payload), f, indent=2, allow_nan=False)
        f.write("\n")

    md = [f"# {title}", ""]
    rule = (model_selection or {}).get("repeats")
    if results:
        md += ["## Retrieval metrics", ""]
        if rule == "allow":
            what = "nothing is removed from the candidates (repeat rule: allow)"
        elif rule == "exclude":
            what = ("every item the user consumed before the query is removed from the candidates, and queries "
                    "whose target the user already consumed are left out (repeat rule: exclude; they have their "
                    "own row below)")
        else:
            what = "the user's training items are excluded"
        md += [f"Test split, scored once per model after every choice was made on the validation split (see "
               f"\"Model selection\"). Full-catalog ranking of each query's held-out item; {what}; ties ranked "
               "pessimistically. Best value per column in bold.", ""]
        md += models_table(results) + [""]
    if repeat_targets:
        count = next(iter(repeat_targets.values()), {}).get("count", 0)
        md += ["## Repeat targets", "",
               f"{count} test queries whose target the user had already consumed before the query, ranked over the "
               "full catalog with nothing removed, for information"
               + (" (not in the table above)." if rule == "exclude" else " (also in the table above)."), ""]
        if count:
            md += models_table(repeat_targets) + [""]
    if cold_start:
        md += ["## Cold start", "",
               "The test queries again, as if the user were new (profile text only: no history, nothing excluded) "
               "or had only their most recent items (only those excluded); same targets, same candidates for "
               "every ranker. popular_in_segment ranks by the interaction counts of the segment the model "
               "predicts for that input.", ""]
        for scenario, table in cold_start.items():
            md += [f"### {scenario}", ""] + models_table(table) + [""]
    if model_selection:
        md += ["## Model selection", ""] + selection_lines(model_selection) + [""]
    if breakdowns:
        md += ["## Breakdown by user group", "", "Per segment and for cold users (few training items).", ""]
        md += breakdown_table(breakdowns) + [""]
    if segment_quality:
        md += ["## Segment quality", ""]
        rows = [[label, fmt(segment_quality.get(key))] for key, label in QUALITY_KEYS if key in segment_quality]
        if "sizes" in segment_quality:
            rows.append(["Sizes", ", ".join(str(s) for s in segment_quality["sizes"])])
        md += md_table(["Measure", "Value"], rows) + [""]
    if method_comparison:
        md += ["## Learned segments vs scikit-learn clusterings", ""]
        rows = [
            [fmt(r.get("method")), fmt(r.get("n_clusters")), fmt(r.get("silhouette")),
             fmt(r.get("ari_vs_learned")), fmt(r.get("noise_share")), fmt(r.get("params", {}))]
            for r in method_comparison
        ]
        md += md_table(["Method", "Clusters", "Silhouette", "ARI vs learned", "Noise share", "Parameters"], rows) + [""]
    if figures:
        md += ["## Figures", ""]
        for caption, fname in figures.items():
            md += [f"### {caption}", "", f"![{caption}]({fname})", ""]
    md_path = os.path.join(out_dir, REPORT_MD)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(md).rstrip() + "\n")

    return [json_path, md_path] + [os.path.join(out_dir, f) for f in figures.values()]
