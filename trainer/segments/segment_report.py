"""`segrec segments report`: a readable report of one segments.json.

    report.md     tables (segments, quality, changes, method comparison) + links to the figures
    report.html   the same, self-contained: the PNGs are embedded as data URIs
    report.json   every figure, machine-readable
    segment_sizes.png, segment_category_heatmap.png   (trainer/reporting.py's plots)
    segment_migration.png   old -> new segment flows (with a previous refresh)
    user_embeddings_2d.png  users in 2-D by segment (with embeddings)

Inputs: the segments.json (`segrec train` or `segrec segments refresh`), and
optionally the previous one (what changed), user embeddings (a refresh's
embeddings.npz, any .npz with user_ids + embeddings, or a run dir whose user
snapshot is computed with the run's model), and `compare_methods`: the same
embeddings clustered by Ward and DBSCAN (trainer/segments/quality.py; DBSCAN's
eps by the k-distance knee heuristic, `knee_eps`) with silhouette and ARI
against the learned segments.

Privacy: a segment with fewer than `min_segment_users` users is not shown
anywhere, in no table and no figure; the report only says how many were
hidden. Their users are left out of the figures and gathered into one
"small segments (hidden)" row/column of the migration matrix.
"""

from __future__ import annotations

import base64
import html
import json
import os
from typing import Optional, Sequence, Union

import numpy as np

from trainer import reporting
from trainer.segments import document, drift
from trainer.segments.embeddings import EMBEDDINGS_NPZ, EmbeddingSet, load_embeddings, save_embeddings  # noqa: F401

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
SIZES_PNG = reporting.SIZES_PNG
CATEGORIES_PNG = reporting.HEATMAP_PNG
MIGRATION_PNG = "segment_migration.png"
EMBEDDINGS_PNG = reporting.EMBEDDINGS_PNG
HIDDEN = "small segments (hidden)"


# --- document model: blocks rendered to markdown and HTML ----------------------------------------
def _md_table(header, rows) -> list:
    return reporting.md_table([reporting.fmt(h) for h in header], [[reporting.fmt(c) for c in r] for r in rows])


def _render_md(title: str, blocks: list) -> str:
    lines = [f"# {title}", ""]
    for kind, *rest in blocks:
        if kind == "h2":
            lines += [f"## {rest[0]}", ""]
        elif kind == "p":
            lines += [rest[0], ""]
        elif kind == "table":
            lines += _md_table(*rest) + [""]
        elif kind == "img":
            caption, fname = rest
            lines += [f"### {caption}", "", f"![{caption}]({fname})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _render_html(title: str, blocks: list, out_dir: str) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>"]
    for kind, *rest in blocks:
        if kind == "h2":
            body.append(f"<h2>{e(rest[0])}</h2>")
        elif kind == "p":
            body.append(f"<p>{e(rest[0]).replace('**', '')}</p>")
        elif kind == "table":
            header, rows = rest
            head = "".join(f"<th>{e(reporting.fmt(h))}</th>" for h in header)
            trs = "".join("<tr>" + "".join(f"<td>{e(reporting.fmt(c)).replace(chr(92) + '|', '|')}</td>" for c in r)
                          + "</tr>" for r in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
        elif kind == "img":
            caption, fname = rest
            with open(os.path.join(out_dir, fname), "rb") as f:
                data = base64.b64encode(f.read()).decode("ascii")
            body.append(f"<figure><img alt=\"{e(caption)}\" src=\"data:image/png;base64,{data}\">"
                        f"<figcaption>{e(caption)}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
             "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
             "th{background:#f3f3f3}img{max-width:100%}figure{margin:1.5em 0}figcaption{color:#555}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# --- plots ----------------------------------------------------------------------------------------
def _plot_migration(path: str, matrix: np.ndarray, names: Sequence[str], title: str) -> None:
    m = np.asarray(matrix, np.float64)
    rows = m.sum(axis=1, keepdims=True)
    shares = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    n = m.shape[0]
    fig, ax = reporting.new_figure((max(5, 0.7 * n + 3), max(4, 0.6 * n + 2)))
    im = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for a in range(n):
        for b in range(n):
            if m[a, b]:
                ax.text(b, a, f"{int(m[a, b])}", ha="center", va="center", fontsize=8,
                        color="white" if shares[a, b] > 0.6 else "black")
    ax.set_xticks(np.arange(n))
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticks(np.arange(n))
    ax.set_yticklabels(names)
    ax.set_xlabel("Segment now")
    ax.set_ylabel("Segment before")
    ax.set_title(f"{title}: where each segment's users went")
    fig.colorbar(im, ax=ax, label="Share of the old segment's users (numbers: users)")
    reporting.save_figure(fig, path)


# --- the report -----------------------------------------------------------------------------------
def _by_id(doc: dict) -> dict:
    return {int(s["id"]): s for s in doc["segments"]}


def _name(seg: dict) -> str:
    return f"{seg['id']}: {seg.get('label', '')}"


def _top(entries, key, n=3) -> str:
    return ", ".join(f"{e[key]} (×{e.get('lift', 0):.1f})" for e in (entries or [])[:n]) or "–"


def _attrs(attributes: dict, distinctive: Optional[dict] = None) -> str:
    """Per attribute: the mean (and everybody's), or the most common value and the most over-represented one."""
    parts = []
    for name, summary in (attributes or {}).items():
        contrast = (distinctive or {}).get(name) or {}
        if "mean" in summary:
            overall = f" (all {contrast['overall_mean']:g})" if "overall_mean" in contrast else ""
            parts.append(f"{name} mean {summary['mean']:g}{overall}")
        elif summary:
            value, share = next(iter(summary.items()))
            text = f"{name} {value} {share:.0%}"
            over = contrast.get("over_represented")
            if over and over["value"] != value:
                text += f", {over['value']} ×{over['lift']:.1f}"
            elif over:
                text += f" ×{over['lift']:.1f}"
            parts.append(text)
    return "; ".join(parts[:4]) or "–"


def _collapse(matrix: np.ndarray, shown: list) -> tuple[np.ndarray, list]:
    """Keeps rows/cols of `shown` segments; every other segment is summed into one last row/col."""
    k = matrix.shape[0]
    hidden = [i for i in range(k) if i not in shown]
    order = list(shown) + ([None] if hidden else [])
    out = np.zeros((len(order), len(order)), np.int64)
    slot = {s: i for i, s in enumerate(shown)}
    for a in range(k):
        for b in range(k):
            out[slot.get(a, len(order) - 1), slot.get(b, len(order) - 1)] += matrix[a, b]
    return out, order


def write_report(
    segments_path: str,
    output_dir: str,
    previous_path: Optional[str] = None,
    embeddings: Union[None, str, EmbeddingSet] = None,
    compare_methods: bool = False,
    min_segment_users: int = 20,
    *,
    projection: str = "pca",
    max_points: int = 5000,
    seed: int = 0,
    title: str = "segrec segments",
) -> dict:
    """Writes report.md, report.html, report.json and the PNGs; returns {name: path} of what it wrote.

    Args:
      segments_path: the segments.json to report on.
      output_dir: created if missing.
      previous_path: the previous segments.json (sizes, PSI, centroid shift,
        new / vanished segments since then; the migration matrix comes from
        the embeddings' previous labels, else from the segments.json's
        `refresh` block that `segrec segments refresh` writes).
      embeddings: an EmbeddingSet, or a path for `load_embeddings`.
      compare_methods: cluster the embeddings with Ward and DBSCAN too
        (needs embeddings).
      min_segment_users: segments below this size are hidden everywhere.
    """
    if min_segment_users < 1:
        raise ValueError(f"--min-segment-users must be >= 1, got {min_segment_users}")
    if compare_methods and embeddings is None:
        raise ValueError("--compare-methods needs --embeddings (a refresh output, an .npz or a run dir)")
    doc = document.load(segments_path)
    prev = document.load(previous_path) if previous_path else None
    if isinstance(embeddings, str):
        embeddings = load_embeddings(embeddings, doc)
    segs = _by_id(doc)
    k = len(segs)
    shown = [i for i in sorted(segs) if segs[i]["size"] >= min_segment_users]
    n_hidden = k - len(shown)
    os.makedirs(output_dir, exist_ok=True)
    figures: dict = {}
    payload: dict = {"segments_path": segments_path, "previous_path": previous_path, "num_segments": k,
                     "num_users": doc.get("num_users"), "min_segment_users": min_segment_users,
                     "hidden_segments": n_hidden, "segments": [], "figures": {}}

    blocks: list = [("p", f"Segments of `{segments_path}` (created {doc.get('created_at', '?')}): {k} segments, "
                          f"{doc.get('num_users', '?')} users. Segments with fewer than {min_segment_users} users are "
                          f"not shown: {n_hidden} small segment{'s' if n_hidden != 1 else ''} hidden.")]
    refresh = doc.get("refresh") or {}
    if refresh.get("verdict"):  # verdict_text since refreshes could answer "insufficient data"; older: verdict
        blocks.append(("p", f"**Refresh verdict:** {refresh.get('verdict_text') or refresh['verdict']}"))

    # Segments table.
    rows = []
    for i in shown:
        s = segs[i]
        rows.append([i, s.get("label", ""), s["size"], s.get("share"), s.get("mean_confidence"),
                     _top(s.get("top_categories"), "category"), _top(s.get("top_items"), "title"),
                     _attrs(s.get("attributes"), s.get("distinctive_attributes"))])
        payload["segments"].append({key: s.get(key) for key in ("id", "label", "size", "share", "mean_confidence",
                                                                  "top_categories", "top_items", "attributes",
                                                                  "distinctive_attributes")})
    blocks += [("h2", "Segments"),
               ("p", "Top categories and items by lift (×: share in the segment over share overall). Attributes: "
                     "the most common value, then the most over-represented one with its lift."),
               ("table", ["Id", "Label", "Users", "Share", "Mean confidence", "Top categories", "Top items", "Attributes"], rows)]

    # Quality.
    quality = dict(doc.get("quality") or {})
    if embeddings is not None:
        from trainer.segments import quality as sq

        q = sq.segment_quality(embeddings.embeddings, embeddings.labels, seed=seed)
        quality.update({key: q[key] for key in ("silhouette", "davies_bouldin", "largest_share")})
    if quality:
        payload["quality"] = quality
        qrows = [[label, quality.get(key)] for key, label in reporting.QUALITY_KEYS if key in quality]
        blocks += [("h2", "Quality"), ("table", ["Measure", "Value"], qrows)]

    # Changes since the previous segments.json.
    if prev is not None:
        blocks += _changes(doc, prev, segs, shown, min_segment_users, payload)
    migration = _migration(doc, embeddings, k)
    if migration is not None:
        collapsed, order = _collapse(migration, shown)
        names = [_name(segs[i]) if i is not None else HIDDEN for i in order]
        _plot_migration(os.path.join(output_dir, MIGRATION_PNG), collapsed, names, title)
        figures["Migration: old segment -> new segment"] = MIGRATION_PNG
        payload["migration"] = {"segments": [i if i is not None else "hidden" for i in order], "counts": collapsed}
        moves = [[_name(segs[a]), _name(segs[b]), n, share]
                 for a, b, n, share in drift.top_moves(migration, 8) if a in shown and b in shown]
        if moves:
            blocks += [("h2", "Largest migrations"),
                       ("table", ["From", "To", "Users", "Share of old segment"], moves)]

    # Method comparison.
    if compare_methods:
        from trainer.segments import quality as sq

        comp = sq.compare_methods(embeddings.embeddings, embeddings.labels, k=k, seed=seed, max_points=max_points)
        payload["method_comparison"] = comp
        crow = [[r["method"], r["n_clusters"], r["silhouette"], r["ari_vs_learned"], r["noise_share"], r["params"]]
                for r in comp]
        blocks += [("h2", "Learned segments vs scikit-learn clusterings"),
                   ("p", "The same embeddings (L2-normalised) clustered by Ward (K clusters) and DBSCAN (eps at the "
                         "knee of the sorted k-distance curve, Ester et al. 1996). Silhouette: cosine, higher is "
                         "tighter; ARI: agreement with the learned segments (1 = same partition, 0 = chance). High ARI "
                         "with both says the segments are stable structure, low says they may be an artefact of K."),
                   ("table", ["Method", "Clusters", "Silhouette", "ARI vs learned", "Noise share", "Parameters"], crow)]

    # Figures from segments.json.
    names = [_name(segs[i]) for i in sorted(segs)]
    if shown:
        reporting.plot_segment_sizes(os.path.join(output_dir, SIZES_PNG), [segs[i]["size"] for i in shown],
                                [names[i] for i in shown], title)
        figures["Users per segment"] = SIZES_PNG
        cats = []
        for i in shown:
            cats += [c["category"] for c in segs[i].get("top_categories") or [] if c["category"] not in cats]
        if cats:
            mat = np.zeros((len(shown), len(cats)))
            for r, i in enumerate(shown):
                for c in segs[i].get("top_categories") or []:
                    mat[r, cats.index(c["category"])] = c["count"]
            reporting.plot_category_heatmap(os.path.join(output_dir, CATEGORIES_PNG), mat, cats,
                                      [names[i] for i in shown], title)
            figures["Top categories per segment (share among its top categories)"] = CATEGORIES_PNG
    if embeddings is not None:
        keep = np.isin(embeddings.labels, shown)
        x, lab = np.asarray(embeddings.embeddings)[keep], np.asarray(embeddings.labels)[keep]
        if len(x) > max_points:
            idx = np.sort(np.random.default_rng(seed).choice(len(x), max_points, replace=False))
            x, lab = x[idx], lab[idx]
        if len(x) >= 2:
            pts = reporting.project_2d(x, projection, seed)
            reporting.plot_embeddings(os.path.join(output_dir, EMBEDDINGS_PNG), pts, lab, names, title, projection)
            figures["Users in 2-D by segment"] = EMBEDDINGS_PNG

    blocks += [("h2", "Figures")] + [("img", caption, fname) for caption, fname in figures.items()] if figures else []
    payload["figures"] = figures
    paths = {"json": os.path.join(output_dir, REPORT_JSON), "md": os.path.join(output_dir, REPORT_MD),
             "html": os.path.join(output_dir, REPORT_HTML)}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(reporting.jsonable(payload), f, indent=2, allow_nan=False)
        f.write("\n")
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(_render_md(title, blocks))
    with open(paths["html"], "w", encoding="utf-8") as f:
        f.write(_render_html(title, blocks, output_dir))
    paths.update({os.path.splitext(fname)[0]: os.path.join(output_dir, fname) for fname in figures.values()})
    return paths


def _changes(doc, prev, segs, shown, min_users, payload) -> list:
    psegs = _by_id(prev)
    if len(psegs) != len(segs):
        return [("h2", "Changes since the previous segments"),
                ("p", f"The previous segments.json has {len(psegs)} segments, this one {len(segs)}: "
                      "not the same segmentation, so no per-segment comparison.")]
    ids = sorted(segs)
    old_sizes = np.array([psegs[i]["size"] for i in ids])
    new_sizes = np.array([segs[i]["size"] for i in ids])
    psi_per, psi_total = drift.psi(old_sizes, new_sizes)
    shift = drift.centroid_shift(document.centroids(prev), document.centroids(doc))
    evidence = drift.segment_evidence(old_sizes, new_sizes, min_users)
    appeared = [i for i, (st, _) in enumerate(evidence) if st == drift.NEW]
    vanished = [i for i, (st, _) in enumerate(evidence) if st == drift.VANISHED]
    old_share, new_share = drift.shares(old_sizes, 0.0), drift.shares(new_sizes, 0.0)
    n_old, n_new = int(old_sizes.sum()), int(new_sizes.sum())
    noise = drift.psi_noise(n_old, n_new, len(ids))
    rows = []
    for i in shown:
        st = evidence[i][0]
        # Shown segments have min_users now; one still under it before has no judged shift, and is not "new" unless the windows can tell.
        status = {drift.NEW: "new", drift.INSUFFICIENT: f"too few users before to judge (<{min_users})"}.get(st) or (
            "label changed" if psegs[i].get("label") != segs[i].get("label") else "")
        rows.append([i, segs[i].get("label", ""), psegs[i]["size"] if psegs[i]["size"] >= min_users else f"<{min_users}",
                     segs[i]["size"], f"{100 * (new_share[i] - old_share[i]):+.1f} pp", psi_per[i], shift[i], status or "–"])
    payload["changes"] = {"psi_total": psi_total, "psi_alpha": drift.PSI_ALPHA, "psi_noise": noise,
                          "users_old": n_old, "users_new": n_new, "new_segments": appeared, "vanished_segments": vanished,
                          "segments": [{"id": r[0], "psi": r[5], "centroid_shift": r[6], "status": evidence[r[0]][0]}
                                       for r in rows]}
    text = (f"Since `{payload['previous_path']}`: total PSI {psi_total:.3f} over {n_old} users before and {n_new} now "
            f"(< 0.1 stable, 0.1-0.2 moderate, > 0.2 significant; segment counts + {drift.PSI_ALPHA:g} each"
            + (f"; sampling alone gives about {noise:.3f} with this many users" if noise is not None else "")
            + f"); {len(appeared)} segment(s) grew past {min_users} users, {len(vanished)} fell below "
            "where the windows were large enough to tell (vanished segments are not shown).")
    return [("h2", "Changes since the previous segments"), ("p", text),
            ("table", ["Id", "Label", "Users before", "Users now", "Share change", "PSI", "Centroid shift (1-cos)", "Status"],
             rows)]


def _migration(doc: dict, embeddings: Optional[EmbeddingSet], k: int) -> Optional[np.ndarray]:
    if embeddings is not None and embeddings.previous_labels is not None:
        prev = np.asarray(embeddings.previous_labels)
        both = prev >= 0
        old = dict(zip(embeddings.user_ids[both], prev[both].tolist()))
        new = dict(zip(embeddings.user_ids[both], np.asarray(embeddings.labels)[both].tolist()))
        return drift.migration_matrix(old, new, k)
    m = (doc.get("refresh") or {}).get("migration")
    return np.asarray(m, np.int64) if m is not None else None
