"""`segrec segments refresh` end to end on generated data with planted drift.

A tiny model (tiny encoder, 16-d, 3 segments, seeded) is trained once on
period 1 of a 240-user, 3-planted-segment data set and exported (about a
minute on 2 cores). Period 2 comes in two versions from the same seed: one
where 70% of planted segment 0's users behave like segment 1
(synthetic.GenerateConfig drift options, truth in drift_truth.csv) and one
without drift. The refresh compares period 2 (current window) against
period 1 (previous window). test_server's tiny export is not used: its 50
users and 6 planted segments are too few per segment to see a move.
"""

from __future__ import annotations

import collections
import glob
import json
import os

import numpy as np
import pandas as pd
import pytest

from beam_pipelines.sources import synthetic
from trainer.cli import main as cli

pytestmark = pytest.mark.slow

DATA = dict(size="small", num_users=240, num_items=120, num_interactions=4800, num_segments=3, seed=5)
# Two retrieval-only warm-up epochs: with one, the checkpoint chosen on the validation split (never on test,
# since "Honest evaluation") is a model whose segments follow the profile text more than behaviour, and the
# planted drift goes unseen. A constant learning rate: the default cosine decays to 0 within these five epochs,
# and the less-trained model's segments move between two windows of the same behaviour (PSI 1.0 on steady data).
TRAIN = ["--encoder", "tiny", "--embedding-dim", "16", "--num-segments", "3", "--epochs", "3", "--warmup-epochs", "2",
         "--batch-size", "64", "--recall-k", "10", "--lr-schedule", "constant", "--quiet"]
AS_OF = synthetic.START_TIMESTAMP + 2 * synthetic.SPAN_SECONDS  # end of period 2
WINDOW = ["--as-of", str(AS_OF), "--window-days", "366", "--min-segment-users", "10"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from serving.export import exporter as ex

    root = tmp_path_factory.mktemp("refresh")
    synthetic.generate(synthetic.GenerateConfig(output_dir=str(root / "p1"), **DATA))
    synthetic.generate(synthetic.GenerateConfig(output_dir=str(root / "drift"), periods=2, drift_share=0.7,
                                                drift_from=0, drift_to=1, **DATA))
    synthetic.generate(synthetic.GenerateConfig(output_dir=str(root / "steady"), periods=2, **DATA))
    # Bad input in the steady copy: a profile without interactions, a row with a bad timestamp.
    with open(root / "steady" / "users.csv", "a") as f:
        f.write("u99998,30,female,US,basic,2020\n")
    with open(root / "steady" / "interactions.csv", "a") as f:
        f.write("u00001,i00001,not-a-time,3.0,view\n")
    assert cli.main(["preprocess", "--input-dir", str(root / "p1"), "--output-dir", str(root / "ds")]) == 0
    assert cli.main(["train", "--dataset-dir", str(root / "ds"), "--output-dir", str(root / "run")] + TRAIN) == 0
    ex.export(ex.ExportConfig(run_dir=str(root / "run"), base_path=str(root / "models"), index="brute_force"))
    return root


def _refresh(world, data: str, out: str, *extra) -> int:
    return cli.main(["segments", "refresh", "--input-dir", str(world / data), "--model-dir", str(world / "models"),
                     "--output-dir", str(world / out)] + WINDOW + list(extra))


def _assignments(out_dir) -> pd.DataFrame:
    files = sorted(glob.glob(str(out_dir / "v1" / "assignments-*.jsonl")))
    return pd.concat([pd.read_json(f, lines=True, dtype={"user_id": str}) for f in files])


def _mode(values) -> int:
    return collections.Counter(values).most_common(1)[0][0]


def test_planted_drift_is_detected(world):
    assert _refresh(world, "drift", "ref_drift") == 3  # retraining advised
    out = world / "ref_drift"
    drift = json.loads((out / "v1" / "drift.json").read_text())
    assert drift["verdict"] == "retrain" and drift["retrain_advised"]
    assert drift["verdict_text"].startswith("DRIFT: retraining advised")
    assert drift["users_old"] == drift["users_new"] == drift["users_both"] == 240 and not drift["insufficient"]
    assert "DRIFT: retraining advised" in (out / "v1" / "drift.md").read_text()

    truth = pd.read_csv(world / "drift" / synthetic.DRIFT_TRUTH_FILE, dtype={"user_id": str})
    m = truth.merge(_assignments(out), on="user_id")
    assert len(m) == 240 and m["previous_segment"].notna().all()
    # Learned ids of the planted segments: A from the previous window, B from the users who stayed in 1.
    a = _mode(m.loc[m.segment_before == 0, "previous_segment"])
    b = _mode(m.loc[(m.segment_before == 1), "segment"])
    assert a != b
    movers = m[m.moved == 1]
    assert len(movers) >= 25
    moved_as_planted = ((movers.previous_segment == a) & (movers.segment == b)).mean()
    assert moved_as_planted >= 0.6, moved_as_planted
    # The migration matrix holds that flow.
    assert drift["migration"][a][b] >= 0.6 * len(movers)
    assert drift["sizes_new"][b] > drift["sizes_old"][b]
    assert drift["psi_total"] > 0.2


def test_no_drift_no_flag_and_bad_input_is_counted(world):
    assert _refresh(world, "steady", "ref_steady", "--format", "jsonl,parquet") == 0
    out = world / "ref_steady"
    drift = json.loads((out / "v1" / "drift.json").read_text())
    assert drift["verdict"] == "no_drift" and drift["verdict_text"].startswith("no drift")
    assert drift["moved_share"] < 0.2 and drift["psi_total"] < 0.1
    mig = np.array(drift["migration"])
    assert np.trace(mig) >= 0.8 * mig.sum()

    stats = json.loads((out / "v1" / "stats.json").read_text())
    assert stats["users"]["in"] == 241 and stats["users"]["queries"] == 240
    assert stats["users"]["dead_letter"] == {"no_events": 1} and stats["users"]["balanced"]
    assert stats["users"]["left"] == 0 and stats["users"]["entered"] == 0
    assert stats["rows"]["interactions"]["dead_lettered"] == 1 and stats["balanced"]
    dead = [json.loads(line) for f in glob.glob(str(out / "v1" / "dead_letter" / "*.jsonl")) for line in open(f)]
    assert {(d["source"], d["reason"]) for d in dead} >= {("user_query", "no_events"), ("interactions", "bad_timestamp")}
    parquet = pd.read_parquet(glob.glob(str(out / "v1" / "assignments-*.parquet"))[0])
    assert len(parquet) == 240 and list(parquet.columns) == ["user_id", "previous_segment", "segment", "similarity"]

    # The new segments: versioned, old one kept, same centroid format as the model's.
    from trainer.segments import document
    from trainer.segments import profiles as sp

    new, old = document.load(str(out / "segments-v1.json")), document.load(str(out / "segments-v0.json"))
    assert document.centroids(new).shape == document.centroids(old).shape == (3, 16)
    assert (out / "segments.json").read_text() == (out / "segments-v1.json").read_text()
    assert new["refresh"]["version"] == 1 and sum(s["size"] for s in new["segments"]) == 240
    assert all(s["profiled"] == (s["size"] >= 10) for s in new["segments"])
    # Privacy floor: a segment under the minimum carries no profile of any kind.
    assert all(not set(sp.PROFILE_KEYS) & set(s) for s in new["segments"] if not s["profiled"])

    # A second refresh chained on the first one's assignments: version 2, nothing moved (same window).
    code = _refresh(world, "steady", "ref_steady", "--previous", str(out / "segments.json"),
                    "--previous-assignments", str(out / "v1" / "assignments-*.jsonl"))
    assert code == 0
    d2 = json.loads((out / "v2" / "drift.json").read_text())
    assert d2["users_both"] == 240 and d2["moved_share"] < 0.05
    assert document.load(str(out / "segments.json"))["refresh"]["version"] == 2
    assert (out / "segments-v1.json").exists()


def test_report_on_a_refresh(world):
    from trainer.segments import segment_report as rep

    out = world / "ref_drift"
    if not (out / "segments.json").exists():
        pytest.skip("needs test_planted_drift_is_detected's output")
    paths = rep.write_report(str(out / "segments.json"), str(world / "report"), previous_path=str(out / "segments-v0.json"),
                             embeddings=str(out / "v1"), compare_methods=True, min_segment_users=10)
    for key in ("md", "html", "json", "segment_migration", "segment_sizes", "user_embeddings_2d"):
        assert os.path.getsize(paths[key]) > 0, key
    md = open(paths["md"]).read()
    assert "Refresh verdict:** DRIFT" in md and "| agglomerative_ward |" in md and "| dbscan |" in md


def test_too_few_users_is_insufficient_data(world, capsys):
    """As a new user tries it: a 30-day window holds about 14 of the 240 users (29 in the one before), under the
    default --min-window-users 200, so the big figures small samples give are no reason to retrain."""
    from beam_pipelines import refresh

    out = world / "ref_small"
    code = cli.main(["segments", "refresh", "--input-dir", str(world / "steady"), "--model-dir", str(world / "models"),
                     "--output-dir", str(out), "--as-of", str(AS_OF), "--window-days", "30"])
    printed = capsys.readouterr().out
    assert code == refresh.EXIT_INSUFFICIENT_DATA == 4
    drift = json.loads((out / "v1" / "drift.json").read_text())
    assert drift["verdict"] == "insufficient_data" and not drift["retrain_advised"]
    assert drift["users_new"] < 200 and drift["min_window_users"] == 200
    assert f"{drift['users_new']} users in the current window < 200 (--min-window-users)" in drift["reasons"]
    assert not any(c["judged"] for c in drift["checks"].values())
    assert "INSUFFICIENT DATA: no verdict" in printed and f"{drift['users_new']} users in the current window" in printed
    md = (out / "v1" / "drift.md").read_text()
    assert "**INSUFFICIENT DATA: no verdict" in md and "(exit status 4)" in md
    assert f"| PSI, total | {drift['psi_total']:.4f} | 0.2 | {drift['users_old']} users before, {drift['users_new']} now" in md
    # The files are written all the same; the segments document carries the verdict.
    from trainer.segments import document

    assert document.load(str(out / "segments.json"))["refresh"]["verdict"] == "insufficient_data"


def test_bad_refresh_inputs(world, capsys):
    code = cli.main(["segments", "refresh", "--input-dir", str(world / "steady"), "--model-dir", str(world / "nowhere"),
                     "--output-dir", str(world / "bad")])
    assert code == 2 and "no exported model there" in capsys.readouterr().err
    code = _refresh(world, "steady", "bad2", "--previous", str(world / "missing.json"))
    assert code == 2 and "missing.json" in capsys.readouterr().err


def test_users_the_model_rejects_are_dead_lettered_in_both_windows(tmp_path_factory, tiny_generated, monkeypatch):
    """test_server's tiny export over its own data: one user of each window fails inference (as an
    in-graph assert would fail their batch); they are dead-lettered and counted, nobody else is lost."""
    from test_score import reject_users
    from test_server import build_tiny_export

    from beam_pipelines import refresh
    from beam_pipelines.inference import retrying

    export_dir = build_tiny_export(tmp_path_factory, tiny_generated)
    events = pd.read_csv(tiny_generated / "interactions.csv", dtype={"user_id": str})
    as_of, window = int(events.timestamp.max()) + 1, 180 * 86400
    last = events.groupby("user_id").timestamp.max()
    first = events.groupby("user_id").timestamp.min()
    current = sorted(last[last >= as_of - window].index)
    previous_only = sorted(last[last < as_of - window].index)
    bad_now, bad_before = current[3], previous_only[3]
    assert first[bad_now] >= as_of - window  # in the current window only
    reject_users(monkeypatch, lambda user_id: user_id in (bad_now, bad_before))

    out = tmp_path_factory.mktemp("refresh_rejects")
    code = cli.main(["segments", "refresh", "--input-dir", str(tiny_generated), "--model-dir", export_dir,
                     "--output-dir", str(out), "--as-of", str(as_of), "--window-days", "180",
                     "--min-segment-users", "3", "--max-batch-size", "16"])
    # A finished refresh either way; the verdict is not under test (this tiny data is under the minimums).
    assert code in (0, refresh.EXIT_DRIFT, refresh.EXIT_INSUFFICIENT_DATA)
    stats = json.loads((out / "v1" / "stats.json").read_text())
    users = stats["users"]
    assert users["balanced"] and stats["balanced"]
    assert users["queries"] == len(current) and users["embedded"] == len(current) - 1
    assert users["dead_letter"][retrying.INFERENCE_ERROR] == 1 and users["previous_window_inference_failed"] == 1
    assert users["in"] == users["embedded"] + users["dead_lettered"]
    # The runner decides the batches (small ones here, after the group-by); each failed one was retried.
    assert stats["inference"]["failed_batches"] >= 1
    assert stats["inference"]["retried_one_by_one"] >= 2  # at least the two bad users
    letters = [json.loads(line) for f in glob.glob(str(out / "v1" / "dead_letter" / "*.jsonl")) for line in open(f)]
    model = sorted((d["location"], d["reason"]) for d in letters if d["source"] == retrying.MODEL_SOURCE)
    assert model == sorted([(f"user {bad_now}", "inference_error"),
                            (f"user {bad_before} (previous window)", "inference_error")])
    assert all("assertion failed" in d["detail"] for d in letters if d["source"] == retrying.MODEL_SOURCE)
    assigned = set(_assignments(out)["user_id"])
    assert assigned == set(current) - {bad_now}
    assert users["assigned"] == len(assigned) and sum(json.loads((out / "v1" / "drift.json").read_text())
                                                      ["sizes_new"]) == len(assigned)
