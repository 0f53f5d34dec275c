"""`segrec demo` (the README's main-job command) on its smallest setting."""

import json

import pytest

from trainer.cli import main as cli


@pytest.mark.slow
def test_demo_runs_every_stage_and_says_where_things_are(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(["demo", "--output-dir", str(out), "--size", "tiny", "--encoder", "tiny", "--epochs", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    stages = ("[1/10] generate", "[2/10] preprocess", "[3/10] train", "[4/10] evaluate", "[5/10] export",
              "[6/10] start the development server", "[7/10] query the server over gRPC", "[8/10] score every user",
              "[9/10] stop the server", "[10/10] write the report", "demo finished")
    for stage in stages:
        assert stage in printed
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["preprocess"]["balanced"]
    assert set(summary["evaluate"]) >= {"segrec", "popularity", "ease", "id_two_tower"}
    # The server answered over gRPC, then drained and exited cleanly on SIGTERM.
    assert summary["server_exit_code"] == 0
    assert "segrec serve drained and exited with code 0" in printed
    queries = summary["queries"]
    assert len({q["segment_id"] for q in queries}) >= 2 and queries[-1]["user_id"] == "(cold user)"
    assert queries[-1]["history"] == []
    for q in queries:
        ids = [i["item_id"] for i in q["items"]]
        assert len(ids) == 10 and "" not in ids and not set(ids) & set(q["history"]), q
        assert f"user {q['user_id']}" in printed
    # Batch scoring wrote one record per user; users in = scored + dead-lettered.
    users = summary["score"]["users"]
    assert users["in"] == users["scored"] + users["dead_lettered"] and users["scored"] > 0
    scored = [json.loads(line) for f in sorted((out / "scores").glob("recommendations-*.jsonl"))
              for line in f.read_text().splitlines()]
    assert len(scored) == users["scored"] and all(r["items"] for r in scored)
    assert list((out / "scores").glob("recommendations-*.parquet"))
    # The report exists, embeds plots, and the demo says where it is.
    report = (out / "report.md").read_text()
    assert "## Users queried over gRPC" in report and ".png)" in report
    assert (out / "evaluation" / "report.md").exists() and (out / "segments_report" / "report.html").exists()
    assert f"report: {out / 'report.md'}" in printed


def test_demo_failure_names_the_stage(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = cli.main(["demo", "--output-dir", str(blocker / "demo"), "--size", "tiny", "--encoder", "tiny"])
    assert code == 2
    err = capsys.readouterr().err
    assert "stage 'generate the embedded dataset' failed" in err and "what to do" in err
