"""What `segrec segments refresh` leaves behind once its pipeline has run (see `refresh`).

    the pipeline's counts --compose_stats--> stats.json (users in = embedded + dead-lettered, ...)
    the pipeline's drift counts --drift_figures--> drift.json (trainer.segments.drift.summarize_drift)
    profile rows + catalog (the pipeline's work files) --new_segments_doc--> segments-v<N>.json
    drift figures --drift_markdown--> drift.md
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
                "psi_total", "moved_share", "max_centroid_shift", "new_segments", "vanished_segments",
                "retrain_advised", "verdict")


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
                  min_segment_users: int, thresholds: sd.DriftThresholds, version: int, as_of: int,
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
                               np.asarray(dc["sizes_new"]), min_segment_users=min_segment_users,
                               thresholds=thresholds)
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


def drift_markdown(drift: dict, doc: dict) -> str:
    """drift.md: the verdict line first, then the tables."""
    k = drift["num_segments"]
    labels = {s["id"]: s["label"] for s in doc["segments"]}
    lines = [f"# Segment refresh v{drift['version']}", "", f"**{drift['verdict']}**", "",
             f"- Window: [{drift['as_of'] - drift['window_seconds']}, {drift['as_of']}) "
             f"({drift['window_seconds'] / DAY:g} days); old segments: {drift['old_assignments']}",
             f"- Users: {drift['users_new']} now, {drift['users_old']} before, {drift['users_both']} in both, "
             f"{drift['users_moved']} changed segment ({drift['moved_share']:.1%})",
             f"- PSI total {drift['psi_total']:.4f}; max centroid shift {drift['max_centroid_shift']:.4f} "
             f"(1 - cosine, against {drift['centroid_shift_baseline']})",
             f"- New segments (grew past {drift['min_segment_users']} users): {drift['new_segments'] or 'none'}; "
             f"vanished: {drift['vanished_segments'] or 'none'}",
             f"- Thresholds: {drift['thresholds']}", "", "## Per segment", "",
             "| Segment | Label | Users before | Users now | PSI | Centroid shift |", "|---|---|---:|---:|---:|---:|"]
    for i in range(k):
        lines.append(f"| {i} | {labels.get(i, '')} | {drift['sizes_old'][i]} | {drift['sizes_new'][i]} | "
                     f"{drift['psi'][i]:.4f} | {drift['centroid_shift'][i]:.4f} |")
    lines += ["", "## Migration (rows: before, columns: now)", "",
              "| before \\ now | " + " | ".join(str(i) for i in range(k)) + " |", "|---" * (k + 1) + "|"]
    lines += [f"| {i} | " + " | ".join(str(x) for x in row) + " |" for i, row in enumerate(drift["migration"])]
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
