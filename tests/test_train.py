"""`segrec train` / `segrec evaluate` end to end on a small generated dataset (tiny encoder)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from trainer.cli import main as cli
from trainer.model import run_dir as rd

TINY_TRAIN = ["--encoder", "tiny", "--embedding-dim", "16", "--num-segments", "4", "--epochs", "2", "--warmup-epochs", "1",
              "--batch-size", "64", "--recall-k", "10", "--quiet"]


@pytest.fixture(scope="module")
def dataset(tiny_generated, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_ds")
    assert cli.main(["preprocess", "--input-dir", str(tiny_generated), "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    assert cli.main(["train", "--dataset-dir", str(dataset), "--output-dir", str(run)] + TINY_TRAIN) == 0
    return run


@pytest.mark.slow
def test_train_writes_a_complete_run_dir(trained):
    for name in (rd.TRAIN_CONFIG, rd.MODEL_CONFIG, rd.WEIGHTS, rd.TEXT_CACHE, rd.METRICS, rd.SEGMENTS, rd.MODEL_CARD):
        assert (trained / name).exists(), name
    metrics = json.loads((trained / rd.METRICS).read_text())
    assert metrics["epochs_run"] == 2
    assert 0.0 <= metrics["final"]["recall@10"] <= 1.0 and metrics["final"]["split"] == "valid"
    # Everything chosen on the validation split, and said so.
    sel = metrics["selection"]
    assert sel["split"] == "valid" and sel["repeats"] == "exclude" and sel["metric"] == "recall@10"
    assert sel["checkpoint"]["best_epoch"] in (1, 2) and len(sel["checkpoint"]["per_epoch"]) == 2
    assert sel["checkpoint"]["best_value"] == max(sel["checkpoint"]["per_epoch"])
    grid = dict((b, v) for b, v in sel["beta"]["grid"])
    assert sorted(grid) == [0.0, 0.25, 0.5, 0.75, 1.0] and not sel["beta"]["forced"]
    assert grid[sel["beta"]["chosen"]] == max(grid.values()) == metrics["final"]["recall@10"]
    # The chosen beta is the run's beta (evaluate and export read it from train_config.json).
    config = json.loads((trained / rd.TRAIN_CONFIG).read_text())
    assert config["beta"] == sel["beta"]["chosen"] == metrics["final"]["beta"] and config["beta_requested"] is None
    assert config["repeats"] == "exclude" and config["lr_schedule"] == "cosine"  # the default
    assert metrics["throughput_examples_per_s"]["mean"] > 0
    segments = json.loads((trained / rd.SEGMENTS).read_text())
    assert segments["num_segments"] == 4 and len(segments["segments"]) == 4
    assert sum(s["size"] for s in segments["segments"]) == segments["num_users"]
    assert "Intended use" in (trained / rd.MODEL_CARD).read_text()
    assert any((trained / rd.TENSORBOARD).rglob("events.out.tfevents*"))


@pytest.mark.slow
def test_reloaded_run_gives_the_same_outputs(trained):
    import numpy as np

    from trainer import features as F
    from trainer.data import arrays as da

    run = rd.load_run(str(trained))
    split = da.load_split(run.dataset_dir, "valid")
    batch = split.batch_dict(range(min(8, len(split))))
    batch[F.USER_TEXT_VECTOR] = run.text_cache.lookup(batch[F.USER_TEXT])
    a = run.model(batch, training=False, beta=0.5)
    again = rd.load_run(str(trained)).model(batch, training=False, beta=0.5)
    np.testing.assert_allclose(a[F.QUERY].numpy(), again[F.QUERY].numpy(), rtol=1e-6)
    # The in-graph encoder gives what the cache holds (serving runs the encoder).
    del batch[F.USER_TEXT_VECTOR]
    direct = run.model(batch, training=False, beta=0.5)
    np.testing.assert_allclose(a[F.QUERY].numpy(), direct[F.QUERY].numpy(), atol=1e-5)


@pytest.mark.slow
def test_evaluate_compares_against_baselines(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    code = cli.main(["evaluate", "--run-dir", str(trained), "--output-dir", str(out), "--id-two-tower-epochs", "1"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) >= {"segrec", "popularity", "ease", "id_two_tower"}
    md = (out / "report.md").read_text()
    for name in ("segrec", "popularity", "ease", "id_two_tower"):
        assert name in md
    # Generated data carries planted segments: ARI against them is reported.
    assert "adjusted_rand" in json.dumps(report["segment_quality"])
    assert "recall@10" in capsys.readouterr().out


def _poison_test_split(dataset_dir) -> None:
    """Rewrites every eval-* file: garbage targets and texts (the catalog's last item, a text no split has)."""
    import tensorflow as tf

    from trainer import features as F

    last_item = (dataset_dir / F.ITEM_VOCAB).read_text().split()[-1]
    for path in sorted(dataset_dir.glob(F.EVAL_PATTERN)):
        rows = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path), "GZIP")]
        assert rows
        with tf.io.TFRecordWriter(str(path), options="GZIP") as w:
            for ex in rows:
                ex.features.feature[F.ITEM_ID].bytes_list.value[:] = [last_item.encode()]
                ex.features.feature[F.USER_TEXT].bytes_list.value[:] = [b"poison poison poison"]
                w.write(ex.SerializeToString())


@pytest.mark.slow
def test_training_never_reads_the_test_split(dataset, trained, tmp_path, monkeypatch):
    """The same training on a copy of the dataset whose test split is poisoned: no eval-* file is even
    listed, and the chosen epoch, the chosen beta and every validation number are the clean run's."""
    import shutil

    import tensorflow as tf

    poisoned = tmp_path / "poisoned"
    shutil.copytree(dataset, poisoned)
    _poison_test_split(poisoned)
    listed = []
    real_glob = tf.io.gfile.glob

    def spy(pattern):
        found = real_glob(pattern)
        listed.extend(found)
        return found

    monkeypatch.setattr(tf.io.gfile, "glob", spy)
    run = tmp_path / "run"
    assert cli.main(["train", "--dataset-dir", str(poisoned), "--output-dir", str(run)] + TINY_TRAIN) == 0
    assert listed and not [p for p in listed if os.path.basename(p).startswith("eval-")]
    clean = json.loads((trained / rd.METRICS).read_text())["selection"]
    dirty = json.loads((run / rd.METRICS).read_text())["selection"]
    assert dirty["checkpoint"]["best_epoch"] == clean["checkpoint"]["best_epoch"]
    assert dirty["checkpoint"]["per_epoch"] == pytest.approx(clean["checkpoint"]["per_epoch"], abs=1e-9)
    assert dirty["beta"]["chosen"] == clean["beta"]["chosen"]
    assert [b for b, _ in dirty["beta"]["grid"]] == [b for b, _ in clean["beta"]["grid"]]
    assert [v for _, v in dirty["beta"]["grid"]] == pytest.approx([v for _, v in clean["beta"]["grid"]], abs=1e-9)
    assert dirty["queries"] == clean["queries"]


def test_a_dataset_dir_without_validation_split_is_refused(tmp_path, capsys):
    import model_fixtures as mf

    old = mf.write_dataset(str(tmp_path / "schema1"))  # train-* and eval-* only, as segrec preprocess wrote before
    assert cli.main(["train", "--dataset-dir", old, "--output-dir", str(tmp_path / "r")] + TINY_TRAIN) == 2
    err = capsys.readouterr().err
    assert "validation split" in err and "re-run `segrec preprocess`" in err


def test_bad_train_flags_are_user_errors(tmp_path, capsys):
    assert cli.main(["train", "--dataset-dir", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "r")]) == 2
    assert "preprocess" in capsys.readouterr().err
    assert cli.main(["train", "--dataset-dir", str(tmp_path), "--output-dir", str(tmp_path / "r"),
                     "--num-segments", "auto", "--warmup-epochs", "0"]) == 2
    assert "warmup" in capsys.readouterr().err
    for bad in ("ndcg@5", "precision@10", "recall@0"):
        assert cli.main(["train", "--dataset-dir", str(tmp_path), "--output-dir", str(tmp_path / "r"),
                         "--select-metric", bad]) == 2
        assert "recall@K (K >= 1) or ndcg@10" in capsys.readouterr().err
    for flag, value in (("--weight-decay", "-0.1"), ("--learning-rate", "0")):
        assert cli.main(["train", "--dataset-dir", str(tmp_path), "--output-dir", str(tmp_path / "r"), flag, value]) == 2
        assert "--weight-decay >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as both:  # --recall-k K is shorthand for --select-metric recall@K: one or the other
        cli.main(["train", "--dataset-dir", str(tmp_path), "--output-dir", str(tmp_path / "r"),
                  "--select-metric", "ndcg@10", "--recall-k", "10"])
    assert both.value.code == 2 and "not allowed with" in capsys.readouterr().err


@pytest.mark.integration
def test_training_resumes_after_being_killed(dataset, tmp_path):
    """Kill `segrec train` after its first joint epoch is backed up; the rerun continues from there."""
    run = tmp_path / "run"
    base = [sys.executable, "-m", "trainer.task", "--dataset-dir", str(dataset), "--output-dir", str(run),
            "--encoder", "tiny", "--embedding-dim", "8", "--num-segments", "3", "--warmup-epochs", "1",
            "--batch-size", "32", "--patience", "0", "--quiet"]
    args = base + ["--epochs", "40"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    meta = run / "checkpoints" / "main" / "training_metadata.json"
    deadline = time.time() + 240
    try:
        while not meta.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved_epoch = json.loads(meta.read_text())["epoch"]
    assert not (run / rd.WEIGHTS).exists()  # it really was interrupted
    done = subprocess.run(base + ["--epochs", str(saved_epoch + 3)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((run / rd.METRICS).read_text())
    # Resumed: only the epochs after the backed-up one ran in the second process.
    assert metrics["epochs_run"] < saved_epoch + 3
    assert (run / rd.WEIGHTS).exists()


@pytest.mark.integration
def test_two_worker_processes_train_the_real_model(dataset, tmp_path):
    """MultiWorkerMirroredStrategy for real: two local `segrec train` processes, TF_CONFIG on localhost ports."""
    from multiworker_tiny import run_workers

    run = tmp_path / "run"

    def cmd(i):
        return [sys.executable, "-m", "trainer.task", "--dataset-dir", str(dataset), "--output-dir", str(run),
                "--encoder", "tiny", "--embedding-dim", "8", "--num-segments", "3", "--epochs", "2",
                "--warmup-epochs", "1", "--batch-size", "32", "--patience", "0", "--quiet"]

    results = run_workers(cmd, num_workers=2, timeout=300, env_extra={"CUDA_VISIBLE_DEVICES": "-1"})
    assert all(r.returncode == 0 for r in results)
    metrics = json.loads((run / rd.METRICS).read_text())
    assert "multi-worker" in metrics["strategy"] and "2 workers" in metrics["strategy"]
    assert metrics["epochs_run"] == 2
    assert (run / rd.WEIGHTS).exists() and (run / rd.SEGMENTS).exists()
    # The non-chief wrote to a temp dir that is gone.
    assert not list(tmp_path.rglob("workertemp_*"))


@pytest.mark.slow
def test_segments_auto_picks_k_by_silhouette_and_records_the_sweep(dataset, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--dataset-dir", str(dataset), "--output-dir", str(run), "--encoder", "tiny", "--embedding-dim", "8",
            "--num-segments", "auto", "--num-segments-range", "2-4", "--epochs", "1", "--warmup-epochs", "1", "--batch-size", "64",
            "--select-metric", "ndcg@10", "--lr-schedule", "constant", "--weight-decay", "1e-4", "--quiet"]
    assert cli.main(args) == 0
    sweep = json.loads((run / rd.SEGMENT_SWEEP).read_text())
    assert [k for k, _ in sweep["silhouette"]] == [2, 3, 4]
    best = max(sweep["silhouette"], key=lambda ks: ks[1])[0]
    assert sweep["best_k"] == best
    assert json.loads((run / rd.SEGMENTS).read_text())["num_segments"] == best
    assert json.loads((run / rd.METRICS).read_text())["segment_sweep"]["best_k"] == best
    assert sweep["split"] == "valid"  # the silhouette of the validation queries' embeddings
    assert json.loads((run / rd.METRICS).read_text())["selection"]["num_segments"]["chosen"] == best
    # --select-metric ndcg@10: the epoch and beta were picked on validation NDCG@10, and said so.
    metrics = json.loads((run / rd.METRICS).read_text())
    sel = metrics["selection"]
    assert sel["metric"] == "ndcg@10" and sel["checkpoint"]["monitor"] == "val_ndcg_at_10"
    assert metrics["history"]["val_ndcg_at_10"] == sel["checkpoint"]["per_epoch"]
    grid = dict((b, v) for b, v in sel["beta"]["grid"])
    assert grid[sel["beta"]["chosen"]] == max(grid.values()) == metrics["final"]["ndcg@10"]
    config = json.loads((run / rd.TRAIN_CONFIG).read_text())
    assert (config["select_metric"], config["lr_schedule"], config["weight_decay"]) == ("ndcg@10", "constant", 1e-4)
    # The model rebuilt for K got a fresh optimizer whose step counter (the schedule's clock) carried on from
    # the warm-up: (1 warm-up + 1 joint epoch) x ceil(train examples / 64); Keras's TF backend also counts
    # the step that finds the data exhausted, hence the + 1 per epoch at most. A restarted counter gives ~half.
    per_epoch = -(-json.loads((dataset / "metadata.json").read_text())["examples"]["train"] // 64)
    assert sweep["best_k"] != 2  # the sweep starts the model at K=2: it was rebuilt
    assert 2 * per_epoch <= metrics["optimizer_steps"] <= 2 * (per_epoch + 1)


def test_the_optimizer_follows_lr_schedule_and_weight_decay():
    import keras

    from trainer.training import job

    config = job.TrainConfig(dataset_dir="d", output_dir="o", epochs=3, warmup_epochs=1, steps_per_epoch=10,
                             learning_rate=0.01, lr_schedule="constant")
    steps = job.total_train_steps(config, num_train_examples=10_000)
    assert steps == 40  # (1 warm-up + 3 joint epochs) x 10 steps: --steps-per-epoch wins over the data size
    assert job.total_train_steps(dataclasses.replace(config, steps_per_epoch=None), 1000) == 4 * 4  # ceil(1000 / 256)
    constant = job._optimizer(config, steps)
    assert type(constant) is keras.optimizers.Adam and float(constant.learning_rate) == pytest.approx(0.01)
    cosine = job._optimizer(dataclasses.replace(config, lr_schedule="cosine", weight_decay=1e-3), steps)
    assert isinstance(cosine, keras.optimizers.AdamW) and cosine.weight_decay == pytest.approx(1e-3)
    schedule = cosine._learning_rate
    assert [float(schedule(s)) for s in (0, 20, 40)] == pytest.approx([0.01, 0.005, 0.0], abs=1e-7)
