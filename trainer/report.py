"""The evaluation report: report.json, report.md and PNG figures.

`write_report` takes what `segrec evaluate` computed (metric summaries from
trainer.metrics, segment quality from trainer.segment_quality, segment
statistics) as plain dicts and numpy arrays and writes:

  report.json                      everything, machine-readable (NaN -> null)
  report.md                        tables of all models side by side, the
                                   per-group breakdowns, segment quality, and
                                   links to the figures
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

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
RECALL_PNG = "recall_curves.png"
SIZES_PNG = "segment_sizes.png"
HEATMAP_PNG = "segment_category_heatmap.png"
EMBEDDINGS_PNG = "user_embeddings_2d.png"

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
_QUALITY_KEYS = (
    ("n_segments", "Segments (non-empty)"),
    ("largest_share", "Largest segment share"),
    ("n_noise", "Noise users"),
    ("silhouette", "Silhouette (cosine, higher better)"),
    ("davies_bouldin", "Davies-Bouldin (lower better)"),
    ("adjusted_rand", "ARI vs planted truth"),
    ("nmi", "NMI vs planted truth"),
)


def _jsonable(x):
    """numpy -> Python; non-finite floats -> None (JSON has no NaN)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "–" if not math.isfinite(v) else f"{float(v):.4f}"
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) or "–"
    return str(v).replace("|", "\\|")


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


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def new_figure(figsize):
    """(figure, axes) on a standalone Figure with an Agg canvas.

    Not pyplot: pyplot keeps global figure state and resolves the process-wide
    backend, and `matplotlib.use("Agg")` would switch it for everybody (a
    notebook would stop showing plots). A bare Figure needs neither and needs
    no display, so it also works on CI and Vertex.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def save_figure(fig, path: str, dpi: int = 110) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


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
        cells = [_fmt(name)]
        for k in keys:
            v = s.get(k)
            cell = _fmt(v)
            if k in best and v is not None and math.isfinite(float(v)) and float(v) == best[k]:
                cell = f"**{cell}**"
            cells.append(cell)
        rows.append(cells)
    return _table(["Model"] + [_header(k) for k in keys], rows)


def breakdown_table(breakdowns: Mapping[str, Mapping[str, Mapping]], metric_keys=("recall@10", "ndcg@10")) -> list[str]:
    """Markdown lines: one row per group, per model the chosen metrics.

    breakdowns: model -> group -> summary dict (trainer.metrics.breakdown).
    """
    models = list(breakdowns)
    groups = []
    for by_group in breakdowns.values():
        groups += [g for g in by_group if g not in groups]
    header = ["Group", "Queries"] + [f"{m} {_header(k)}" for m in models for k in metric_keys]
    rows = []
    for g in groups:
        count = next((breakdowns[m][g].get("count") for m in models if g in breakdowns[m]), None)
        cells = [_fmt(g), _fmt(count)]
        for m in models:
            s = breakdowns[m].get(g, {})
            cells += [_fmt(s.get(k)) for k in metric_keys]
        rows.append(cells)
    return _table(header, rows)


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


def _segment_names(n: int, segment_labels) -> list[str]:
    if segment_labels is None:
        return [f"segment {i}" for i in range(n)]
    names = [str(s) for s in segment_labels]
    if len(names) != n:
        raise ValueError(f"segment_labels has {len(names)} names; there are {n} segments")
    return names


def _plot_sizes(path, sizes, segment_labels, title):
    sizes = np.asarray(sizes)
    names = _segment_names(sizes.size, segment_labels)
    fig, ax = new_figure((max(6, 0.45 * sizes.size + 2), 4.5))
    ax.bar(np.arange(sizes.size), sizes, color="tab:blue")
    ax.set_xticks(np.arange(sizes.size))
    ax.set_xticklabels(names, rotation=45 if sizes.size > 6 else 0, ha="right" if sizes.size > 6 else "center")
    ax.set_xlabel("Segment")
    ax.set_ylabel("Users")
    ax.set_title(f"{title}: users per segment")
    ax.grid(True, axis="y", alpha=0.3)
    save_figure(fig, path)


def _plot_heatmap(path, matrix, category_names, segment_labels, title):
    matrix = np.asarray(matrix, np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"segment_category_matrix must be [K, C]; got shape {matrix.shape}")
    n_seg, n_cat = matrix.shape
    cats = [str(c) for c in category_names] if category_names is not None else [f"cat {j}" for j in range(n_cat)]
    if len(cats) != n_cat:
        raise ValueError(f"category_names has {len(cats)} names; segment_category_matrix has {n_cat} columns")
    names = _segment_names(n_seg, segment_labels)
    # Row shares: segments differ in size, what matters is their mix.
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    fig, ax = new_figure((max(6, 0.4 * n_cat + 3), max(3.5, 0.4 * n_seg + 2)))
    im = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(np.arange(n_cat))
    ax.set_xticklabels(cats, rotation=60, ha="right")
    ax.set_yticks(np.arange(n_seg))
    ax.set_yticklabels(names)
    ax.set_xlabel("Item category")
    ax.set_ylabel("Segment")
    ax.set_title(f"{title}: category mix per segment")
    fig.colorbar(im, ax=ax, label="Share of the segment's interactions")
    save_figure(fig, path)


def project_2d(embeddings: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """[n, d] -> [n, 2] by PCA (default, instant) or t-SNE (cosine; ~15 s for 2000 points on 2 cores)."""
    embeddings = np.asarray(embeddings, np.float64)
    if embeddings.shape[1] <= 2:
        out = np.zeros((embeddings.shape[0], 2))
        out[:, : embeddings.shape[1]] = embeddings
        return out
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(embeddings)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (embeddings.shape[0] - 1) / 3)))
        return TSNE(n_components=2, metric="cosine", init="pca", perplexity=perplexity, random_state=seed).fit_transform(
            embeddings
        )
    raise ValueError(f"projection must be 'pca' or 'tsne'; got {method!r}")


def _plot_embeddings(path, points, labels, segment_labels, title, method):
    import matplotlib

    fig, ax = new_figure((7, 6))
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.6)
    else:
        labels = np.asarray(labels)
        uniq = np.unique(labels)
        cmap = matplotlib.colormaps["tab20" if uniq.size > 10 else "tab10"]
        for i, lab in enumerate(uniq):
            sel = labels == lab
            if lab == -1:
                name, color = "noise", "lightgrey"
            else:
                name = segment_labels[int(lab)] if segment_labels is not None and 0 <= lab < len(segment_labels) else f"segment {lab}"
                color = cmap(i % cmap.N)
            ax.scatter(points[sel, 0], points[sel, 1], s=6, alpha=0.7, color=color, label=str(name))
        if uniq.size <= 20:
            ax.legend(markerscale=3, fontsize="small", loc="best")
    axis = "PC" if method == "pca" else ("t-SNE " if method == "tsne" else "dim ")
    ax.set_xlabel(f"{axis}1")
    ax.set_ylabel(f"{axis}2")
    ax.set_title(f"{title}: user embeddings in 2-D ({method.upper() if method != 'given' else 'as given'})")
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
) -> list[str]:
    """Writes report.json, report.md and the figures whose inputs are given.

    Args:
      out_dir: created if missing.
      results: model name -> trainer.metrics.summarize() dict.
      recall_curves: model name -> (ks [n], recall [n]) (trainer.metrics.recall_curve).
      breakdowns: model name -> group name -> summarize() dict
        (trainer.metrics.breakdown: per segment, cold users).
      segment_quality: trainer.segment_quality.segment_quality() dict.
      method_comparison: trainer.segment_quality.compare_methods() rows.
      segment_sizes: [K] users per segment.
      segment_category_matrix: [K, C] interactions of segment k's users with
        category c; plotted as row shares.
      category_names: [C] names; segment_labels: [K] display names.
      user_embeddings_2d: [U, 2] points to plot as given, or
      user_embeddings: [U, d] raw embeddings, projected by `projection`
        ("pca", or "tsne" - slower) after a seeded sample of `max_points`.
      user_labels: [U] segment per user (colours; -1 = noise).
      title: heading of the report and prefix of figure titles.

    Returns:
      Paths written, report.json and report.md first.
    """
    os.makedirs(out_dir, exist_ok=True)
    figures: dict[str, str] = {}

    if recall_curves:
        _plot_recall_curves(os.path.join(out_dir, RECALL_PNG), recall_curves, title)
        figures["Recall@K by model"] = RECALL_PNG
    if segment_sizes is not None and len(segment_sizes):
        _plot_sizes(os.path.join(out_dir, SIZES_PNG), segment_sizes, segment_labels, title)
        figures["Users per segment"] = SIZES_PNG
    if segment_category_matrix is not None:
        _plot_heatmap(os.path.join(out_dir, HEATMAP_PNG), segment_category_matrix, category_names, segment_labels, title)
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
        _plot_embeddings(os.path.join(out_dir, EMBEDDINGS_PNG), points, labels, segment_labels, title, method)
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
    }
    json_path = os.path.join(out_dir, REPORT_JSON)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(_jsonable(payload), f, indent=2, allow_nan=False)
        f.write("\n")

    md = [f"# {title}", ""]
    if results:
        md += ["## Retrieval metrics", ""]
        md += ["Full-catalog ranking of each query's held-out item; the user's training items are excluded "
               "(the target never is); ties ranked pessimistically. Best value per column in bold.", ""]
        md += models_table(results) + [""]
    if breakdowns:
        md += ["## Breakdown by user group", "", "Per segment and for cold users (few training items).", ""]
        md += breakdown_table(breakdowns) + [""]
    if segment_quality:
        md += ["## Segment quality", ""]
        rows = [[label, _fmt(segment_quality.get(key))] for key, label in _QUALITY_KEYS if key in segment_quality]
        if "sizes" in segment_quality:
            rows.append(["Sizes", ", ".join(str(s) for s in segment_quality["sizes"])])
        md += _table(["Measure", "Value"], rows) + [""]
    if method_comparison:
        md += ["## Learned segments vs scikit-learn clusterings", ""]
        rows = [
            [_fmt(r.get("method")), _fmt(r.get("n_clusters")), _fmt(r.get("silhouette")),
             _fmt(r.get("ari_vs_learned")), _fmt(r.get("noise_share")), _fmt(r.get("params", {}))]
            for r in method_comparison
        ]
        md += _table(["Method", "Clusters", "Silhouette", "ARI vs learned", "Noise share", "Parameters"], rows) + [""]
    if figures:
        md += ["## Figures", ""]
        for caption, fname in figures.items():
            md += [f"### {caption}", "", f"![{caption}]({fname})", ""]
    md_path = os.path.join(out_dir, REPORT_MD)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(md).rstrip() + "\n")

    return [json_path, md_path] + [os.path.join(out_dir, f) for f in figures.values()]
