"""The served model answers with the quality `segrec evaluate` reports (bench/bench_served_quality.py, tiny).

A tiny run (tiny encoder) on the seeded generated data, preprocessed with
--max-history 3 so that most users consumed more than the history the model
reads: the test queries' `exclude` sets then hold items the server would not
drop on its own. The run's beta is forced to 0.5 (not 0, so the segment pull
matters). Exported with the brute-force index through the CLI, served by
`segrec serve`, every test query sent through RecommenderClient: served
Recall@10/50, NDCG@10 and coverage@10 equal evaluate's, and so do the top-10
lists. Two controls through the same server (a wrong beta; the history
without the consumed set) must NOT match, so the comparison can fail. (A
request without beta is no fault: the client then uses the server's default,
the export's, which is the run's beta.)
"""

from __future__ import annotations

import pytest

from trainer.cli import main as cli

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TINY_TRAIN = ["--encoder", "tiny", "--embedding-dim", "16", "--num-segments", "4", "--epochs", "2",
              "--warmup-epochs", "1", "--batch-size", "64", "--recall-k", "10", "--quiet", "--beta", "0.5"]
MAX_HISTORY = 3


@pytest.fixture(scope="module")
def run(tiny_generated, tmp_path_factory):
    root = tmp_path_factory.mktemp("served_quality")
    ds, run_dir = root / "ds", root / "run"
    assert cli.main(["preprocess", "--input-dir", str(tiny_generated), "--output-dir", str(ds),
                     "--max-history", str(MAX_HISTORY)]) == 0
    assert cli.main(["train", "--dataset-dir", str(ds), "--output-dir", str(run_dir)] + TINY_TRAIN) == 0
    return str(run_dir), str(ds), root


@pytest.fixture(scope="module")
def compared(run):
    from bench import bench_served_quality as bsq

    run_dir, ds, root = run
    return bsq.served_metrics(run_dir, ds, str(root / "work"), index="brute_force", batch=8, controls=True,
                              progress=None)


def test_served_metrics_equal_evaluate(compared):
    r = compared
    assert r["export"]["index"] == "brute_force" and r["beta"] == 0.5 and r["beta_matches_export_default"]
    assert r["repeat_rule"] == "exclude" and r["queries"] > 20 and r["k"] == 50
    for m in ("recall@10", "recall@50", "ndcg@10", "coverage@10"):
        assert abs(r["served"][m] - r["in_process"][m]) <= 1e-6, (m, r["served"], r["in_process"])
    # A useful check needs hits and misses at 10 (a model that is always right or always wrong proves little).
    assert 0 < r["in_process"]["recall@10"] < 1
    # Brute force ranks exactly what evaluate ranks; the tiny model's scores have no float near-ties, so the
    # lists agree item by item, in order, for every query.
    top = r["top10"]
    assert top["same_set"] == top["same_order"] == top["queries"] == r["queries"], top["differing"]
    # The served scores are evaluate's up to float noise (TF vs numpy matmul, encoder batches).
    assert r["score_difference"]["max_abs"] < 1e-4, r["score_difference"]
    rc = r["in_process_rank_check"]
    assert rc["same_rank"] == rc["queries_ranked_within_k"] > 0
    assert rc["served_within_k_where_evaluate_is_not"] == 0
    assert r["sigterm_exit_code"] == 0


def test_the_comparison_catches_a_wrong_beta_or_missing_exclusions(compared):
    """The same server and queries, asked differently: the top-10 lists no longer match evaluate's."""
    controls = compared["controls"]
    assert set(controls) == {"wrong beta", "history only, no exclude"}
    for name, c in controls.items():
        assert c["top10"]["same_order"] < c["top10"]["queries"], name
        assert any(abs(c["served"][m] - compared["in_process"][m]) > 1e-6 for m in ("recall@10", "ndcg@10")), name
    # Without the consumed set the served lists hold items evaluate never ranks: fewer lists even share a set.
    assert controls["history only, no exclude"]["top10"]["same_set"] < compared["queries"]
