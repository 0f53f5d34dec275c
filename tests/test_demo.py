"""`segrec demo` (the README's main-job command) on its smallest setting."""

import json

import pytest

from trainer import cli


@pytest.mark.slow
def test_demo_runs_every_stage_and_says_where_things_are(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(["demo", "--output-dir", str(out), "--size", "tiny", "--encoder", "tiny", "--epochs", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    for stage in ("[1/4] generate", "[2/4] preprocess", "[3/4] train", "[4/4] evaluate", "demo finished"):
        assert stage in printed
    summary = json.loads((out / "demo_summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]][0].startswith("generate")
    assert summary["preprocess"]["balanced"]
    assert set(summary["evaluate"]) >= {"segrec", "popularity", "ease", "id_two_tower"}
    assert (out / "evaluation" / "report.md").exists()
    assert str(out / "evaluation" / "report.md") in printed


def test_demo_failure_names_the_stage(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = cli.main(["demo", "--output-dir", str(blocker / "demo"), "--size", "tiny", "--encoder", "tiny"])
    assert code == 2
    err = capsys.readouterr().err
    assert "stage 'generate the embedded dataset' failed" in err and "what to do" in err
