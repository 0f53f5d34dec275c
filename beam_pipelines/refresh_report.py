"""What `segrec segments refresh` leaves behind once its pipeline has run (see `refresh`).

    the pipeline's counts --compose_stats--> stats.json (users in = embedded + dead-lettered, ...)
    the pipeline's drift counts --drift_figures--> drift.json (trainer.segments.drift.summarize_drift)
    profile rows + catalog (the pipeline's work files) --new_segments_doc--> segments-v<N>.json
    drift figures --drift_markdown--> drift.md (verdict, reasons, each check with the users behind it)
    write_outputs: segments-v<N>.json, segments-v<N-1>.json (kept), segments.json (the newest),
                   v<N>/drift.json, v<N>/drift.md, v<N>/stats.json, v<N>/embeddings.npz

The segments documents go through trainer.segments.document; the embedding
sample is what trainer.segments.segment_report.load_embeddings reads.
"""

from __future__ import annotations

import json

import numpy as np
from apache_beam.io.filesystems import FileSystems

from beam_pipelines import outputs, preprocess
from beam_pipelines.inference import retrying, user_queries
from beam_pipelines.refresh_steps import PREVIOUS
from trainer import features
from trainer.contracts import SEGMENTS_FILE
from trainer.segments import document
from trainer.segments import drift as sd

DAY = 86_400  # seconds: refresh windows are given and shown in days

# The drift figures a new segments.json carries in its `refresh` block.
REFRESH_KEYS = ("version", "as_of", "window_seconds", "previous_segments", "model", "migration", "sizes_old",
                "users_old", "users_new", "users_both", "users_moved", "psi_total", "psi_alpha", "moved_share",
                "max_centroid_shift", "new_segments", "vanished_segments", "min_window_users", "min_compared_users",
                "min_segment_users", "verdict", "verdict_text", "reasons", "retrain_advised")
# `segrec segments refresh`'s exit status per verdict (named in drift.md; refresh.EXIT_DRIFT / EXIT_INSUFFICIENT_DATA).
EXIT_CODES = {sd.NO_DRIFT: 0, sd.RETRAIN: 3, sd.INSUFFICIENT_DATA: 4}


def compose_stats(counts: dict, previous_window: bool) -> dict:
    """stats.json from the summed counts: preprocess's row figures plus the users'.

    `balanced` (top level: rows; users: users in = embedded + dead-lettered,
    queries = embedded + rejected, and with previous_window (the previous
    window was embedded, not read from --previous-assignments) its queries =
    assigned + rejected) says every row and user is accounted for.
    """
    stats = preprocess.compose_stats(counts)
    users_in, queries = counts.get("users.in", 0), counts.get("users.queries", 0)
    embedded = counts.get("users.embedded", 0)
    user_dead = {k.split(".", 2)[2]: v for k, v in counts.items() if k.startswith(f"dead.{user_queries.QUERY_SOURCE}.")}
    model_dead = f"dead.{retrying.MODEL_SOURCE}.{retrying.INFERENCE_ERROR}"
    rejected, prev_rejected = counts.get(model_dead, 0), counts.get(f"{PREVIOUS}.{model_dead}", 0)
    if rejected:
        user_dead[retrying.INFERENCE_ERROR] = rejected
    balanced = users_in == embedded + sum(user_dead.values()) and queries == embedded + rejected
    if previous_window:  # the previous window's queries: embedded (assigned) or rejected
        balanced &= counts.get("previous.users.queries", 0) == counts.get("previous.users_assigned", 0) + prev_rejected
    stats["users"] = {
        "in": users_in, "queries": queries, "embedded": embedded, "dead_lettered": sum(user_dead.values()),
        "dead_letter": user_dead, "assigned": counts.get("users.assigned", 0),
        "in_previous_window": counts.get("previous.users_assigned", 0),
        "previous_window_inference_failed": prev_rejected,
        "entered": counts.get("users.entered", 0), "left": counts.get("users.left", 0),
        "balanced": balanced,
    }
    stats["inference"] = {"failed_batches": counts.get("inference.failed_batches", 0),
                          "retried_one_by_one": counts.get("inference.retried_elements", 0)}
    stats["previous_assignments_dead_lettered"] = counts.get("dead.previous_assignments.bad_assignment", 0)
    return stats


def drift_figures(drift_counts: dict, old_centroids: np.ndarray, new_centroids: np.ndarray, *,
                  minimums: sd.DriftMinimums, thresholds: sd.DriftThresholds, version: int, as_of: int,
                  window_seconds: int, previous_segments: str, model: str, old_assignments: str,
                  kmeans: dict) -> dict:
    """drift.json: summarize_drift of the pipeline's drift counts, and what the run compared.

    drift_counts: the pipeline's migration [K, K], sizes_old / sizes_new [K]
    and baseline (the same k-means update over the previous window, or None
    with --previous-assignments: then the previous centroids, which came out
    of that same update, are the baseline).
    """
    dc = drift_counts
    baseline = np.asarray(dc["baseline"], np.float64) if dc["baseline"] is not None else old_centroids
    drift = sd.summarize_drift(baseline, new_centroids, np.asarray(dc["migration"]), np.asarray(dc["sizes_old"]),
                               np.asarray(dc["sizes_new"]), minimums=minimums, thresholds=thresholds)
    drift.update({"version": version, "as_of": as_of, "window_seconds": window_seconds,
                  "centroid_shift_baseline": ("the same k-means update over the previous window"
                                              if dc["baseline"] is not None else "the previous segments' centroids"),
                  "centroid_shift_from_previous": [float(x) for x in sd.centroid_shift(old_centroids, new_centroids)],
                  "previous_segments": previous_segments, "model": model, "old_assignments": old_assignments,
                  "kmeans": kmeans})
    return drift


def new_segments_doc(centroids: np.ndarray, sizes: np.ndarray, drift: dict, *, profile_rows_path: str,
                     catalog_path: str, max_profile_users: int, min_segment_users: int, beta) -> dict:
    """The new segments.json: profiles of a bounded (hash-sampled) set of users, full-count sizes.

    centroids [K, d]: the new ones; sizes [K]: every user's new segment
    counted; profile_rows_path / catalog_path: the pipeline's JSON lines of
    (user_id, segment, history, attributes) and of the catalog. At most
    about max_profile_users users are profiled (a seeded hash sample);
    segments under min_segment_users users get no profile at all. beta: the
    previous document's, carried over.
    """
    from trainer.segments import profiles

    sizes = np.asarray(sizes, np.int64)
    total = int(sizes.sum())
    fraction = min(1.0, max_profile_users / max(total, 1))
    user_ids, labels, histories, attributes = [], [], {}, {}
    with FileSystems.open(profile_rows_path) as f:
        for line in f:
            row = json.loads(line)
            uid = row["user_id"]
            if fraction < 1.0 and sd.stable_fraction(uid, "profile") >= fraction:
                continue
            user_ids.append(uid)
            labels.append(row["segment"])
            histories[uid] = row["history"]
            attributes[uid] = row["attributes"]
    titles, categories = {}, {}
    with FileSystems.open(catalog_path) as f:
        for line in f:
            item = json.loads(line)
            titles[item["item_id"]] = item["title"]
            categories[item["item_id"]] = tuple(item["categories"])
    inputs = profiles.ProfileInputs(user_ids=user_ids, labels=np.asarray(labels, np.int64),
                                    centroids=centroids.astype(np.float32), histories=histories,
                                    attributes=attributes, item_titles=titles, item_categories=categories)
    # Profiling needs the full-count sizes: a segment is profiled only if it is big enough in the whole window.
    doc = profiles.build_profiles(inputs, min_profile_size=1)
    for seg in doc["segments"]:
        n = int(sizes[seg["id"]])
        seg["size"], seg["share"] = n, round(n / max(total, 1), 4)
        if n < min_segment_users:  # privacy floor: no profile of any kind
            profiles.drop_profile(seg)
    doc.update({"num_users": total, "min_profile_size": min_segment_users,
                "profiled_users": len(user_ids),
                "beta": beta,
                "refresh": {k: drift[k] for k in REFRESH_KEYS}})
    return doc


def _users(before, now) -> str:
    return f"{before} users before, {now} now"


def figures_line(drift: dict) -> str:
    """The drift figures in one line, each with the users behind it (the CLI's summary)."""
    d, cs = drift, drift["checks"]["centroid_shift"]
    noise = f"; sampling alone gives ~{d['psi_noise']:.3f}" if d.get("psi_noise") is not None else ""
    shift = (f"max centroid shift {cs['value']:.3f} (segment {cs['segment']}: {_users(cs['users_old'], cs['users_new'])})"
             if cs["value"] is not None else f"centroid shift: no segment with {cs['min_users']} users in both windows")
    return (f"PSI {d['psi_total']:.3f} ({_users(d['users_old'], d['users_new'])}{noise}), "
            f"{d['users_moved']} of {d['users_both']} users in both windows moved ({d['moved_share']:.1%}), {shift}")


def _judged(drift: dict, name: str) -> str:
    c = drift["checks"][name]
    if name == "new_or_vanished" and not c["enabled"]:
        return "off (--ignore-new-vanished)"
    if c["judged"]:
        return "yes"
    if min(drift["users_old"], drift["users_new"]) < drift["min_window_users"]:
        return f"no: a window has fewer than {drift['min_window_users']} users"
    if name == "moved_share":
        return f"no: {c['users_both']} < {c['min_users']} users in both windows"
    return f"no: no segment has {c['min_users']} users in both windows"


def drift_markdown(drift: dict, doc: dict) -> str:
    """drift.md: the verdict line first, its rule and reasons, then every check with the counts behind it."""
    d, k = drift, drift["num_segments"]
    checks = d["checks"]
    labels = {s["id"]: s["label"] for s in doc["segments"]}
    pct = "{:.1%}".format
    lines = [f"# Segment refresh v{d['version']}", "", f"**{d['verdict_text']}**", "",
             f"Verdict `{d['verdict']}` (exit status {EXIT_CODES[d['verdict']]}). `no_drift` (0): every check judged "
             "on enough users and none over its threshold; `retrain` (3): a check judged on enough users is over its "
             "threshold; `insufficient_data` (4): a window has fewer than the minimum of users, or no check is over "
             "its threshold but one could not be judged. Too small a segment never decides on its own.", ""]
    lines += [f"- Window: [{d['as_of'] - d['window_seconds']}, {d['as_of']}) "
              f"({d['window_seconds'] / DAY:g} days); old segments: {d['old_assignments']}",
              f"- Users: {d['users_new']} now, {d['users_old']} before, {d['users_both']} in both, "
              f"{d['users_moved']} of those changed segment",
              f"- Minimums: {d['min_window_users']} users per window (--min-window-users), {d['min_compared_users']} in "
              f"both windows (--min-compared-users), {d['min_segment_users']} per segment (--min-segment-users)"]
    lines += [f"- Not judged: {why}" for why in d["insufficient"]]
    lines += [f"- Thresholds: {d['thresholds']}", "", "## Checks", "",
              "| Check | Value | Threshold | Users behind it | Judged | Over threshold |",
              "|---|---:|---:|---|---|---|"]
    noise = (f"; sampling alone gives ~{d['psi_noise']:.4f}" if d.get("psi_noise") is not None else "")
    mv, cs, nv = checks["moved_share"], checks["centroid_shift"], checks["new_or_vanished"]
    rows = [("PSI, total", f"{d['psi_total']:.4f}", f"{checks['psi']['threshold']:g}",
             _users(d["users_old"], d["users_new"]) + noise, "psi"),
            ("Moved share", f"{pct(mv['value'])} ({mv['users_moved']} of {mv['users_both']})", pct(mv["threshold"]),
             f"{mv['users_both']} users in both windows", "moved_share"),
            ("Max centroid shift (1 - cos)",
             f"{cs['value']:.4f} (segment {cs['segment']})" if cs["value"] is not None else "–",
             f"{cs['threshold']:g}",
             (f"segment {cs['segment']}: {_users(cs['users_old'], cs['users_new'])}; over segments "
              f"{cs['segments_judged']}, against {d['centroid_shift_baseline']}") if cs["value"] is not None else "–",
             "centroid_shift"),
            ("New / vanished segments", f"new {nv['new'] or 'none'}, vanished {nv['vanished'] or 'none'}",
             f"crossing {nv['min_users']} users",
             "; ".join(f"segment {s['id']}: {_users(s['users_old'], s['users_new'])}" for s in d["segments"]
                       if s["id"] in nv["new"] + nv["vanished"]) or "–", "new_or_vanished")]
    for name, value, threshold, behind, key in rows:
        over = ("yes" if checks[key]["exceeded"] else "no") if checks[key]["judged"] else "–"
        lines.append(f"| {name} | {value} | {threshold} | {behind} | {_judged(d, key)} | {over} |")
    lines += ["", "## Per segment", "",
              f"PSI terms use the shares of counts + {d['psi_alpha']:g} each (additive smoothing), so an empty segment "
              f"gives a finite term; shares below are the raw ones. A segment needs {d['min_segment_users']} users in "
              "a window for its own figures to count.", "",
              "| Segment | Label | Users before | Users now | Share before | Share now | PSI term | Centroid shift | Status |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in d["segments"][:k]:
        status = s["status"] + (f": {s['note']}" if s["note"] else "")
        lines.append(f"| {s['id']} | {labels.get(s['id'], '')} | {s['users_old']} | {s['users_new']} | "
                     f"{pct(s['share_old'])} | {pct(s['share_new'])} | {s['psi']:.4f} | {s['centroid_shift']:.4f} | "
                     f"{status} |")
    lines += ["", "## Migration (rows: before, columns: now)", "",
              "| before \\ now | " + " | ".join(str(i) for i in range(k)) + " |", "|---" * (k + 1) + "|"]
    lines += [f"| {i} | " + " | ".join(str(x) for x in row) + " |" for i, row in enumerate(d["migration"])]
    return "\n".join(lines) + "\n"


def write_outputs(output_dir: str, run_dir: str, version: int, previous_doc: dict, doc: dict, drift: dict,
                  stats: dict, sample: list, dim: int) -> dict:
    """Writes the segments documents, drift.json/.md, stats.json and embeddings.npz; name -> path.

    segments-v<version-1>.json (previous_doc) is written only when not
    already there. sample: the pipeline's embedding sample rows
    (user_id, previous segment or -1, segment, embedding [dim]).
    The returned dict also lists the pipeline's assignments files.
    """
    from trainer.segments import segment_report as rep

    files = {"segments": FileSystems.join(output_dir, f"segments-v{version}.json"),
             "segments_latest": FileSystems.join(output_dir, SEGMENTS_FILE),
             "drift_json": FileSystems.join(run_dir, "drift.json"),
             "drift_md": FileSystems.join(run_dir, "drift.md"),
             "stats": FileSystems.join(run_dir, features.STATS_FILE),
             "embeddings": FileSystems.join(run_dir, rep.EMBEDDINGS_NPZ)}
    old_copy = FileSystems.join(output_dir, f"segments-v{version - 1}.json")
    if not FileSystems.exists(old_copy):
        document.save(previous_doc, old_copy)
        files["segments_previous"] = old_copy
    document.save(doc, files["segments"])
    document.save(doc, files["segments_latest"])
    outputs.write_text(files["drift_json"], json.dumps(drift, indent=2) + "\n")
    outputs.write_text(files["drift_md"], drift_markdown(drift, doc))
    outputs.write_text(files["stats"], json.dumps(stats, indent=2, sort_keys=True) + "\n")
    rep.save_embeddings(files["embeddings"], rep.EmbeddingSet(
        np.array([r[0] for r in sample], dtype=str), np.array([r[3] for r in sample], np.float32).reshape(-1, dim),
        np.array([r[2] for r in sample], np.int64), np.array([r[1] for r in sample], np.int64), source="refresh"))
    found = FileSystems.match([FileSystems.join(run_dir, "assignments*")])[0].metadata_list
    files["assignments"] = sorted(m.path for m in found)
    return files
