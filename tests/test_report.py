"""Tests of trainer.evaluation.report: every file is written and holds what it should."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import trainer  # noqa: F401
from trainer.evaluation import ranking as metrics
from trainer.evaluation import report
from trainer.segments import quality as sq

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    n_q, n_items = 60, 40
    results, curves, breakdowns = {}, {}, {}
    segments = rng.integers(0, 3, n_q)
    hist = rng.integers(0, 6, n_q)
    groups = {"cold users (<=2 items)": metrics.cold_user_mask(hist), **metrics.segment_masks(segments)}
    for name, sharp in (("segrec", 3.0), ("popularity", 0.0), ("ease", 1.5), ("id_two_tower", 1.0)):
        targets = rng.integers(0, n_items, n_q)
        scores = rng.normal(size=(n_q, n_items)).astype(np.float32)
        scores[np.arange(n_q), targets] += sharp
        r = metrics.rank_targets(lambda q, s=scores: s[q], n_q, targets)
        results[name] = metrics.summarize(r)
        curves[name] = metrics.recall_curve(r)
        breakdowns[name] = metrics.breakdown(r, groups)
    # Users: 3 blobs, the learned labels = truth.
    truth = np.repeat(np.arange(3), 30)
    emb = np.eye(8)[truth] * 2 + 0.1 * rng.normal(size=(90, 8))
    return dict(
        results=results,
        recall_curves=curves,
        breakdowns=breakdowns,
        segment_quality=sq.segment_quality(emb, truth, truth=truth),
        method_comparison=sq.compare_methods(emb, truth, k=3),
        segment_sizes=np.bincount(truth),
        segment_category_matrix=rng.integers(0, 50, (3, 5)),
        category_names=["Action", "Comedy", "Drama", "Horror", "Sci-Fi"],
        segment_labels=["action fans", "comedy fans", "drama fans"],
        user_embeddings=emb,
        user_labels=truth,
    )


def test_write_report_writes_everything(tmp_path):
    out = tmp_path / "report"
    paths = report.write_report(str(out), title="toy evaluation", **_inputs())
    names = [os.path.basename(p) for p in paths]
    assert names[:2] == ["report.json", "report.md"]
    assert set(names[2:]) == {
        "recall_curves.png",
        "segment_sizes.png",
        "segment_category_heatmap.png",
        "user_embeddings_2d.png",
    }
    for p in paths:
        assert os.path.isfile(p)
    for p in paths[2:]:
        with open(p, "rb") as f:
            data = f.read()
        assert data[:8] == PNG_MAGIC, p
        assert len(data) > 10_000, (p, len(data))  # a real plot, not an empty canvas

    md = (out / "report.md").read_text()
    assert md.startswith("# toy evaluation")
    for name in ("segrec", "popularity", "ease", "id_two_tower"):
        assert f"| {name} |" in md
    for header in ("Recall@10", "Recall@50", "Recall@100", "NDCG@10", "MRR", "Coverage@10"):
        assert header in md
    assert "cold users (<=2 items)" in md and "segment 2" in md
    assert "agglomerative_ward" in md and "dbscan" in md
    assert "Silhouette" in md
    for png in ("recall_curves.png", "segment_sizes.png", "segment_category_heatmap.png", "user_embeddings_2d.png"):
        assert f"]({png})" in md

    js = json.loads((out / "report.json").read_text())
    assert set(js["models"]) == {"segrec", "popularity", "ease", "id_two_tower"}
    assert js["models"]["segrec"]["count"] == 60
    assert js["segment_quality"]["adjusted_rand"] == pytest.approx(1.0)
    assert len(js["recall_curves"]["ease"]["k"]) == 100
    assert js["segment_sizes"] == [30, 30, 30]


def test_minimal_report_and_nan_as_null(tmp_path):
    # Only the metrics table; an empty group's NaN metrics become JSON null.
    res = {"segrec": {"recall@10": float("nan"), "ndcg@10": 0.25, "mrr": 0.3, "count": 0}}
    paths = report.write_report(str(tmp_path), res)
    assert [os.path.basename(p) for p in paths] == ["report.json", "report.md"]
    js = json.loads((tmp_path / "report.json").read_text())
    assert js["models"]["segrec"]["recall@10"] is None
    md = (tmp_path / "report.md").read_text()
    assert "| segrec | – | 0.2500 | 0.3000 | 0 |" in md
    assert "![" not in md


def test_given_2d_points_and_bad_shapes(tmp_path):
    pts = np.random.default_rng(0).normal(size=(50, 2))
    paths = report.write_report(str(tmp_path), {}, user_embeddings_2d=pts, user_labels=np.r_[np.zeros(45), -np.ones(5)])
    assert any(p.endswith("user_embeddings_2d.png") for p in paths)
    with pytest.raises(ValueError, match="category_names"):
        report.write_report(str(tmp_path), {}, segment_category_matrix=np.ones((2, 3)), category_names=["a"])


def test_write_report_leaves_the_matplotlib_backend_alone(tmp_path):
    # A fresh interpreter on a non-Agg backend (svg here; a notebook's inline one in real life): writing the
    # figures must not switch it, as matplotlib.use("Agg") did, which stopped a notebook showing plots.
    code = textwrap.dedent("""
        import sys
        import matplotlib
        import trainer
        from trainer.evaluation import report
        before = matplotlib.get_backend()
        paths = report.write_report(sys.argv[1], {}, segment_sizes=[3, 5], segment_labels=["a", "b"],
                                    user_embeddings_2d=[[0, 0], [1, 1], [2, 0]], user_labels=[0, 1, 1])
        print(before, matplotlib.get_backend(), len(paths))
    """)
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.split() == ["svg", "svg", "4"], out.stderr[-2000:]
    assert (tmp_path / "segment_sizes.png").read_bytes()[:8] == PNG_MAGIC
