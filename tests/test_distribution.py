"""trainer/training/distribution.py: cluster from TF_CONFIG / CLUSTER_SPEC, strategy, run dirs, chief vs temp dirs."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

import trainer  # noqa: F401
from trainer.training import distribution
from trainer.training.distribution import ClusterError

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import multiworker_tiny  # noqa: E402

# Vertex AI's shape: pool 0 the primary replica, 1 workers, 3 an evaluator.
POOLS = {
    "workerpool0": ["cmle-training-workerpool0-ab-0:2222"],
    "workerpool1": ["cmle-training-workerpool1-ab-0:2222", "cmle-training-workerpool1-ab-1:2222"],
    "workerpool3": ["cmle-training-workerpool3-ab-0:2222"],
}


def _spec(pool: str, index: int, pools=None) -> dict:
    return {"CLUSTER_SPEC": json.dumps({"cluster": pools or POOLS, "environment": "cloud",
                                        "task": {"type": pool, "index": index, "trial": ""}, "job": "{}"})}


def test_cluster_spec_worker_converted_to_tf_config():
    info = distribution.cluster_from_env(_spec("workerpool1", 1))
    assert info.tf_config == {
        "cluster": {"chief": POOLS["workerpool0"], "worker": POOLS["workerpool1"], "evaluator": POOLS["workerpool3"]},
        "task": {"type": "worker", "index": 1},
    }
    assert (info.task_type, info.task_index, info.is_chief) == ("worker", 1, False)
    assert info.num_workers == 3  # 1 chief + 2 workers; the evaluator does not train
    assert info.is_multi_worker and info.source == "CLUSTER_SPEC"


def test_cluster_spec_chief_and_evaluator():
    chief = distribution.cluster_from_env(_spec("workerpool0", 0))
    assert (chief.task_type, chief.task_index, chief.is_chief, chief.is_multi_worker) == ("chief", 0, True, True)
    evaluator = distribution.cluster_from_env(_spec("workerpool3", 0))
    assert evaluator.task_type == "evaluator"
    assert not evaluator.is_chief and not evaluator.is_multi_worker


def test_cluster_spec_parameter_servers_rejected():
    pools = dict(POOLS, workerpool2=["cmle-training-workerpool2-ab-0:2222"])
    with pytest.raises(ClusterError, match="parameter servers.*not supported"):
        distribution.cluster_from_env(_spec("workerpool0", 0, pools))
    # The same through TF_CONFIG.
    tf_config = {"cluster": {"chief": ["a:1"], "ps": ["b:1"]}, "task": {"type": "chief", "index": 0}}
    with pytest.raises(ClusterError, match="parameter-server"):
        distribution.cluster_from_env({"TF_CONFIG": json.dumps(tf_config)})


def test_cluster_errors_name_the_variable():
    with pytest.raises(ClusterError, match="TF_CONFIG is not valid JSON"):
        distribution.cluster_from_env({"TF_CONFIG": "{not json"})
    with pytest.raises(ClusterError, match="CLUSTER_SPEC.*unknown worker pool 'workerpool7'"):
        distribution.cluster_from_env(_spec("workerpool0", 0, {"workerpool0": ["a:1"], "workerpool7": ["b:1"]}))
    out_of_range = {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}
    with pytest.raises(ClusterError, match="index 2 is out of range"):
        distribution.cluster_from_env({"TF_CONFIG": json.dumps(out_of_range)})
    assert isinstance(ClusterError("x"), ValueError)  # the CLI reports it without a traceback


def test_tf_config_wins_and_worker_zero_is_chief_without_chief():
    tf_config = {"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", "index": 0}}
    env = {"TF_CONFIG": json.dumps(tf_config), **_spec("workerpool1", 1)}
    info = distribution.cluster_from_env(env)
    assert info.source == "TF_CONFIG" and info.tf_config == tf_config
    assert info.is_chief and info.num_workers == 2
    tf_config["task"]["index"] = 1
    assert not distribution.cluster_from_env({"TF_CONFIG": json.dumps(tf_config)}).is_chief


def test_no_cluster():
    assert distribution.cluster_from_env({}) is None
    assert distribution.cluster_from_env({"TF_CONFIG": "{}", "CLUSTER_SPEC": ""}) is None
    assert distribution.chief_or_temp_dir("/runs/a", None) == "/runs/a"


def test_no_cluster_gives_one_device_cpu_strategy_that_keras_fit_uses(monkeypatch):
    import keras
    import tensorflow as tf

    monkeypatch.delenv("TF_CONFIG", raising=False)
    # A single-replica Vertex AI job: a cluster of one chief is not multi-worker.
    single = {"TF_CONFIG": json.dumps({"cluster": {"chief": ["localhost:1"]}, "task": {"type": "chief", "index": 0}})}
    for env in ({}, single):
        strategy, description = distribution.choose_strategy(env, num_gpus=0)
        assert isinstance(strategy, tf.distribute.OneDeviceStrategy)
        assert "/cpu:0" in description and "MultiWorker" not in description
    assert "TF_CONFIG" not in os.environ  # only the multi-worker case writes it

    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    assert model.distribute_strategy is strategy
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2


def test_run_dirs_local_and_vertex():
    local = distribution.run_dirs("/runs/r1", {})
    assert local == distribution.RunDirs("/runs/r1", "/runs/r1/checkpoints", "/runs/r1/tensorboard")
    gcs = distribution.run_dirs("gs://bucket/runs/r1/", {})
    assert gcs == distribution.RunDirs("gs://bucket/runs/r1", "gs://bucket/runs/r1/checkpoints",
                                       "gs://bucket/runs/r1/tensorboard")
    # Vertex AI sets all three under the job's base output dir (with a trailing slash).
    env = {"AIP_MODEL_DIR": "gs://b/job/model/", "AIP_CHECKPOINT_DIR": "gs://b/job/checkpoints/",
           "AIP_TENSORBOARD_LOG_DIR": "gs://b/job/logs/"}
    assert distribution.run_dirs("/ignored", env) == distribution.RunDirs(
        "gs://b/job/model", "gs://b/job/checkpoints", "gs://b/job/logs")
    only_model = distribution.run_dirs(None, {"AIP_MODEL_DIR": "gs://b/job/model/"})
    assert only_model.checkpoint_dir == "gs://b/job/model/checkpoints"
    with pytest.raises(ValueError, match="--output-dir"):
        distribution.run_dirs(None, {})


def test_chief_keeps_paths_others_write_to_a_temp_dir(tmp_path):
    def info(task_type, index, cluster):
        env = {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})}
        return distribution.cluster_from_env(env)

    workers = {"worker": ["h:1", "h:2", "h:3"]}
    assert distribution.chief_or_temp_dir("gs://b/run", info("worker", 0, workers)) == "gs://b/run"
    worker2 = info("worker", 2, workers)
    assert distribution.chief_or_temp_dir("gs://b/run/", worker2) == "gs://b/workertemp_worker_2/run"
    with_chief = {"chief": ["h:0"], "worker": ["h:1"]}
    assert distribution.chief_or_temp_dir("/r/x", info("chief", 0, with_chief)) == "/r/x"
    assert distribution.chief_or_temp_dir("/r/x", info("worker", 0, with_chief)) == "/r/workertemp_worker_0/x"

    run = str(tmp_path / "run")
    temp = distribution.chief_or_temp_dir(run, worker2)
    os.makedirs(os.path.join(temp, "checkpoints"))
    distribution.discard_temp_dir(run, worker2)
    assert sorted(os.listdir(tmp_path)) == []
    os.makedirs(run)
    distribution.discard_temp_dir(run, info("worker", 0, workers))  # the chief's dir is never removed
    assert os.path.isdir(run)


@pytest.mark.integration
@pytest.mark.parametrize("cluster_from", ["TF_CONFIG", "CLUSTER_SPEC"])
def test_two_local_workers_train_in_sync(tmp_path, cluster_from):
    out = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(HERE, "multiworker_tiny.py"), "--out", out]
    if cluster_from == "CLUSTER_SPEC":
        cmd.append("--as-cluster-spec")  # as on Vertex AI: choose_strategy must write TF_CONFIG itself
    # CPU only: two processes need not share (or fight over) one GPU.
    results = multiworker_tiny.run_workers(lambda i: cmd, num_workers=2, timeout=120,
                                           env_extra={"CUDA_VISIBLE_DEVICES": "-1"})
    assert [r.returncode for r in results] == [0, 0]
    detail = multiworker_tiny.format_failure("outputs", results)
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    assert os.path.getsize(os.path.join(out, "model.weights.h5")) > 0
    assert "multi-worker, 2 workers" in result["strategy"], detail
    assert result["num_replicas_in_sync"] == 2 and len(result["loss"]) == 2
    # Each worker saw half of every batch; all-reduced gradients keep them identical.
    sums = [line.split()[1] for r in results for line in r.stdout.splitlines() if line.startswith("WEIGHTS:")]
    assert len(sums) == 2 and sums[0] == sums[1], detail
    assert sorted(os.listdir(tmp_path)) == ["run"]  # worker 1's temp dir is gone
