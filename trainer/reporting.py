"""Shared pieces of segrec's reports: markdown tables, number formatting, figures.

The evaluation report (trainer/evaluation/report.py) and the segment report
(trainer/segments/segment_report.py) draw the same tables and plots with these.
Figures are drawn on their own matplotlib Figure and written by the Agg
canvas: no pyplot, no `matplotlib.use()`, so the process's backend (a
notebook's inline plots, say) is left as it was.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

SIZES_PNG = "segment_sizes.png"


HEATMAP_PNG = "segment_category_heatmap.png"


EMBEDDINGS_PNG = "user_embeddings_2d.png"


QUALITY_KEYS = (
    ("n_segments", "Segments (non-empty)"),
    ("largest_share", "Largest segment share"),
    ("n_noise", "Noise users"),
    ("silhouette", "Silhouette (cosine, higher better)"),
    ("davies_bouldin", "Davies-Bouldin (lower better)"),
    ("adjusted_rand", "ARI vs planted truth"),
    ("nmi", "NMI vs planted truth"),
)


def jsonable(x):
    """numpy -> Python; non-finite floats -> None (JSON has no NaN)."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "–" if not math.isfinite(v) else f"{float(v):.4f}"
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={fmt(x)}" for k, x in v.items()) or "–"
    return str(v).replace("|", "\\|")


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
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


def segment_names(n: int, segment_labels) -> list[str]:
    if segment_labels is None:
        return [f"segment {i}" for i in range(n)]
    names = [str(s) for s in segment_labels]
    if len(names) != n:
        raise ValueError(f"segment_labels has {len(names)} names; there are {n} segments")
    return names


def plot_segment_sizes(path, sizes, segment_labels, title):
    sizes = np.asarray(sizes)
    names = segment_names(sizes.size, segment_labels)
    fig, ax = new_figure((max(6, 0.45 * sizes.size + 2), 4.5))
    ax.bar(np.arange(sizes.size), sizes, color="tab:blue")
    ax.set_xticks(np.arange(sizes.size))
    ax.set_xticklabels(names, rotation=45 if sizes.size > 6 else 0, ha="right" if sizes.size > 6 else "center")
    ax.set_xlabel("Segment")
    ax.set_ylabel("Users")
    ax.set_title(f"{title}: users per segment")
    ax.grid(True, axis="y", alpha=0.3)
    save_figure(fig, path)


def plot_category_heatmap(path, matrix, category_names, segment_labels, title):
    matrix = np.asarray(matrix, np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"segment_category_matrix must be [K, C]; got shape {matrix.shape}")
    n_seg, n_cat = matrix.shape
    cats = [str(c) for c in category_names] if category_names is not None else [f"cat {j}" for j in range(n_cat)]
    if len(cats) != n_cat:
        raise ValueError(f"category_names has {len(cats)} names; segment_category_matrix has {n_cat} columns")
    names = segment_names(n_seg, segment_labels)
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


def plot_embeddings(path, points, labels, segment_labels, title, method):
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
