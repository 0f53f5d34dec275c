"""Tests of trainer.segments.segment_report: every file is written, small segments are hidden everywhere."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import trainer  # noqa: F401
from trainer.segments import document as segments_doc
from trainer.segments import profiles as sp
from trainer.segments import segment_report as rep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Three blobs: 40 hikers, 30 cooks, 6 gamers; a gamer-only category marks the small one.
SIZES = (40, 30, 6)
CATS = ("hiking", "cooking", "arcadegames")


def _world(seed=0, sizes=SIZES):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), sizes)
    centroids = np.eye(3, 8)
    emb = centroids[labels] + 0.15 * rng.normal(size=(len(labels), 8))
    users = [f"u{i:03d}" for i in range(len(labels))]
    items = {f"{c}{j}": (f"{c.title()} thing {j}", (c,)) for c in CATS for j in range(4)}
    histories = {u: [f"{CATS[s]}{j}" for j in rng.integers(0, 4, 5)] for u, s in zip(users, labels)}
    attrs = {u: {"age": str(20 + 10 * s + int(rng.integers(0, 5)))} for u, s in zip(users, labels)}
    inputs = sp.ProfileInputs(user_ids=users, labels=labels, centroids=centroids, histories=histories, attributes=attrs,
                              item_titles={i: t for i, (t, _) in items.items()},
                              item_categories={i: c for i, (_, c) in items.items()})
    # Profiled down to 3 users in segments.json, so only the report's own rule can hide the 6 gamers.
    return sp.build_profiles(inputs, min_profile_size=3), users, emb, labels


def test_report_renders_and_hides_small_segments(tmp_path):
    doc, users, emb, labels = _world()
    prev_doc, *_ = _world(seed=1, sizes=(50, 20, 6))
    segments_doc.save(doc, str(tmp_path / "segments.json"))
    segments_doc.save(prev_doc, str(tmp_path / "prev.json"))
    previous = labels.copy()
    previous[:10] = 1  # 10 hikers were cooks before
    previous[-1] = -1  # one user is new
    emb_set = rep.EmbeddingSet(np.array(users), emb, labels, previous)
    rep.save_embeddings(str(tmp_path / "emb.npz"), emb_set)

    out = tmp_path / "report"
    paths = rep.write_report(str(tmp_path / "segments.json"), str(out), previous_path=str(tmp_path / "prev.json"),
                             embeddings=str(tmp_path / "emb.npz"), compare_methods=True, min_segment_users=20)
    assert set(paths) == {"md", "html", "json", "segment_sizes", "segment_category_heatmap", "segment_migration",
                          "user_embeddings_2d"}
    for key, path in paths.items():
        assert os.path.isfile(path), key
        if path.endswith(".png"):
            data = open(path, "rb").read()
            assert data[:8] == PNG_MAGIC and len(data) > 10_000, key

    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    labels_by_id = {s["id"]: s["label"] for s in doc["segments"]}
    assert "hiking" in labels_by_id[0] and "cooking" in labels_by_id[1] and "arcadegames" in labels_by_id[2]
    js_text = json.dumps(json.loads((out / "report.json").read_text()), ensure_ascii=False)
    for text in (md, html, js_text):
        assert labels_by_id[0] in text and labels_by_id[1] in text
        assert "arcadegames" not in text and "Arcadegames" not in text  # the 6-user segment: nowhere
    assert "1 small segment hidden" in md
    # Compare-methods table: ward and dbscan rows with silhouette and ARI.
    assert "| Method | Clusters | Silhouette | ARI vs learned |" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| agglomerative_ward")
            or line.startswith("| dbscan")}
    assert set(rows) == {"agglomerative_ward", "dbscan"}
    js = json.loads((out / "report.json").read_text())
    comp = {r["method"]: r for r in js["method_comparison"]}
    assert comp["agglomerative_ward"]["ari_vs_learned"] == pytest.approx(1.0)  # three clean blobs
    assert comp["dbscan"]["silhouette"] is not None
    # Migration: hidden segment folded into one row/col; the 10 cook -> hiker moves are there.
    mig = js["migration"]
    assert mig["segments"] == [0, 1, "hidden"]
    assert mig["counts"][1][0] == 10 and np.sum(mig["counts"]) == len(users) - 1
    assert "Changes since the previous segments" in md and "Largest migrations" in md
    # Drift figures with the users behind them: PSI of smoothed counts over 76 users before and 76 now.
    ch = js["changes"]
    assert ch["users_old"] == ch["users_new"] == 76 and ch["psi_alpha"] == 0.5
    assert ch["psi_noise"] == pytest.approx(2 * (1 / 76 + 1 / 76))
    assert [s["status"] for s in ch["segments"]] == ["ok", "ok"]  # 50 -> 40 and 20 -> 30 hikers / cooks
    assert "over 76 users before and 76 now" in md and "segment counts + 0.5 each" in md
    # HTML is self-contained: every figure embedded.
    assert html.count("data:image/png;base64,") == 4 and "<img" in html and "src=\"segment" not in html
    for png in ("segment_sizes.png", "segment_migration.png", "user_embeddings_2d.png"):
        assert f"]({png})" in md


def test_minimal_report_and_errors(tmp_path):
    doc, users, emb, labels = _world()
    segments_doc.save(doc, str(tmp_path / "s.json"))
    paths = rep.write_report(str(tmp_path / "s.json"), str(tmp_path / "r"), min_segment_users=50)
    assert set(paths) == {"md", "html", "json"}  # every segment hidden: no figures
    md = (tmp_path / "r" / "report.md").read_text()
    assert "3 small segments hidden" in md and "hiking" not in md
    with pytest.raises(ValueError, match="--compare-methods needs --embeddings"):
        rep.write_report(str(tmp_path / "s.json"), str(tmp_path / "r"), compare_methods=True)
    np.savez(tmp_path / "bad.npz", vectors=emb)
    with pytest.raises(ValueError, match="no 'user_ids' array"):
        rep.load_embeddings(str(tmp_path / "bad.npz"))
    # An .npz without labels is assigned to the nearest centroid.
    np.savez(tmp_path / "nolabels.npz", user_ids=np.array(users), embeddings=emb)
    loaded = rep.load_embeddings(str(tmp_path / "nolabels.npz"), doc)
    assert (loaded.labels == labels).mean() > 0.95


def test_write_report_leaves_the_matplotlib_backend_alone(tmp_path):
    # As tests/test_report.py: a fresh interpreter on the svg backend keeps it after the report's figures.
    doc, users, emb, labels = _world()
    segments_doc.save(doc, str(tmp_path / "s.json"))
    rep.save_embeddings(str(tmp_path / "emb.npz"), rep.EmbeddingSet(np.array(users), emb, labels, labels))
    code = textwrap.dedent("""
        import sys
        import matplotlib
        import trainer
        from trainer.segments import segment_report as segments_report
        before = matplotlib.get_backend()
        paths = segments_report.write_report(sys.argv[1] + "/s.json", sys.argv[1] + "/r",
                                             embeddings=sys.argv[1] + "/emb.npz", min_segment_users=3)
        print(before, matplotlib.get_backend(), sorted(k for k in paths if k.startswith("segment_")))
    """)
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    before, after, figures = out.stdout.split(maxsplit=2)
    assert (before, after) == ("svg", "svg"), out.stderr[-2000:]
    assert "segment_migration" in figures and "segment_sizes" in figures
