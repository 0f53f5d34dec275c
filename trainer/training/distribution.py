"""Where training runs: the cluster, the tf.distribute strategy, the output dirs.

One `segrec train` runs on a laptop CPU, one GPU, several GPUs of one machine
(MirroredStrategy) or several machines (MultiWorkerMirroredStrategy), locally
or on Vertex AI. What differs is only the environment the process starts in:

- `TF_CONFIG` (json): the TensorFlow cluster, set by hand for local
  multi-worker runs and by Vertex AI for its prebuilt TensorFlow containers.
- `CLUSTER_SPEC` (json): Vertex AI's framework-neutral form of the same,
  `{"cluster": {"workerpool0": [host:port], "workerpool1": [...]},
    "task": {"type": "workerpool0", "index": 0}}`; worker pool i of the job
  is pool i here (0: the primary replica, 1: workers, 2: parameter servers
  or Reduction Server, 3: evaluators).
- `AIP_MODEL_DIR`, `AIP_CHECKPOINT_DIR`, `AIP_TENSORBOARD_LOG_DIR`: where
  Vertex AI wants the model, checkpoints and TensorBoard logs (under the
  job's base output dir, usually gs://).

The environment is always an argument (a Mapping): only the CLI and
trainer/task.py read `os.environ`. The single write to it is in
`choose_strategy` (see there why).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Mapping, Optional, Tuple

if TYPE_CHECKING:
    import tensorflow as tf

# Vertex AI worker pool -> TensorFlow task type.
_POOL_TO_TASK = {"workerpool0": "chief", "workerpool1": "worker", "workerpool2": "ps", "workerpool3": "evaluator"}
# Task types that take part in synchronous (all-reduce) training.
_TRAINING_TASKS = ("chief", "worker")
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"


class ClusterError(ValueError):
    """TF_CONFIG / CLUSTER_SPEC is malformed or asks for something segrec cannot do."""


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """This process's place in a multi-process cluster.

    tf_config: the TF_CONFIG dict ({"cluster": {type: [host:port]}, "task":
      {"type", "index"}}), converted from CLUSTER_SPEC where that was given;
    num_workers: the replicas that train (chief + workers), 1 for a
      single-machine cluster;
    source: "TF_CONFIG" or "CLUSTER_SPEC".
    """

    tf_config: dict
    task_type: str
    task_index: int
    is_chief: bool
    num_workers: int
    source: str = "TF_CONFIG"

    @property
    def is_multi_worker(self) -> bool:
        """True when this process takes part in training across more than one replica."""
        return self.num_workers > 1 and self.task_type in _TRAINING_TASKS


@dataclasses.dataclass(frozen=True)
class RunDirs:
    model_dir: str
    checkpoint_dir: str
    tensorboard_dir: str


def cluster_from_spec(cluster_spec: dict) -> dict:
    """Vertex AI's CLUSTER_SPEC dict -> the equivalent TF_CONFIG dict.

    workerpool0 -> chief, workerpool1 -> worker, workerpool3 -> evaluator;
    workerpool2 (parameter servers) is rejected: segrec trains synchronously
    (all-reduce), and Reduction Server needs no task of its own in TF_CONFIG.
    """
    try:
        pools = cluster_spec["cluster"]
        task = cluster_spec["task"]
        pool, index = task["type"], int(task["index"])
    except (KeyError, TypeError, ValueError) as err:
        raise ClusterError(f"CLUSTER_SPEC: expected {{'cluster': {{...}}, 'task': {{'type', 'index'}}}}, "
                           f"missing or bad {err}") from None
    cluster = {}
    for name, hosts in pools.items():
        if name not in _POOL_TO_TASK:
            raise ClusterError(f"CLUSTER_SPEC: unknown worker pool {name!r}; expected one of {sorted(_POOL_TO_TASK)}")
        if name == "workerpool2" and hosts:
            raise ClusterError(
                "CLUSTER_SPEC: worker pool 2 (parameter servers) is not supported: segrec trains with "
                "synchronous all-reduce (MultiWorkerMirroredStrategy). Submit the job without a third "
                "worker pool (`segrec vertex submit` never creates one).")
        if hosts:
            cluster[_POOL_TO_TASK[name]] = list(hosts)
    if pool not in _POOL_TO_TASK:
        raise ClusterError(f"CLUSTER_SPEC: unknown task type {pool!r}; expected one of {sorted(_POOL_TO_TASK)}")
    return {"cluster": cluster, "task": {"type": _POOL_TO_TASK[pool], "index": index}}


def cluster_from_env(env: Mapping[str, str]) -> Optional[ClusterInfo]:
    """The cluster described by TF_CONFIG (preferred) or CLUSTER_SPEC; None when neither is set.

    Vertex AI sets both for TensorFlow containers; they agree, and TF_CONFIG
    is what TensorFlow itself reads.
    """
    for source in ("TF_CONFIG", "CLUSTER_SPEC"):
        raw = (env.get(source) or "").strip()
        if not raw:
            continue
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ClusterError(f"{source} is not valid JSON ({err}): {raw[:200]!r}") from None
        tf_config = parsed if source == "TF_CONFIG" else cluster_from_spec(parsed)
        return _cluster_info(tf_config, source)
    return None


def _cluster_info(tf_config: dict, source: str) -> Optional[ClusterInfo]:
    cluster = tf_config.get("cluster") or {}
    task = tf_config.get("task") or {}
    if not cluster:
        return None  # e.g. TF_CONFIG='{}': no cluster, a local run.
    if "ps" in cluster:
        raise ClusterError(f"{source}: parameter-server training ('ps' tasks) is not supported; "
                           "segrec trains with synchronous all-reduce (chief + workers)")
    task_type, task_index = task.get("type"), task.get("index", 0)
    if task_type not in cluster:
        raise ClusterError(f"{source}: task type {task_type!r} is not in the cluster {sorted(cluster)}")
    task_index = int(task_index)
    if not 0 <= task_index < len(cluster[task_type]):
        raise ClusterError(f"{source}: task index {task_index} is out of range for {len(cluster[task_type])} "
                           f"{task_type} task(s)")
    num_workers = sum(len(cluster.get(t, [])) for t in _TRAINING_TASKS)
    # TensorFlow's rule: the chief task if there is one, else worker 0.
    is_chief = task_type == "chief" or (task_type == "worker" and task_index == 0 and "chief" not in cluster)
    return ClusterInfo(tf_config=tf_config, task_type=task_type, task_index=task_index, is_chief=is_chief,
                       num_workers=num_workers, source=source)


def choose_strategy(env: Mapping[str, str], *, num_gpus: Optional[int] = None) -> Tuple["tf.distribute.Strategy", str]:
    """The tf.distribute strategy for this process and a one-line description of it.

    - chief/worker of a cluster with >1 training replica:
      MultiWorkerMirroredStrategy (NCCL all-reduce on GPUs, ring on CPUs);
    - one machine with >1 GPU: MirroredStrategy over its GPUs;
    - otherwise: OneDeviceStrategy on /gpu:0, or on /cpu:0.

    In the multi-worker case it must be called before any other TensorFlow
    op runs (collective ops are configured at program start-up). Keras 3
    (TensorFlow backend) honours `with strategy.scope():` around model
    building and compile; `fit` then distributes the dataset itself. For
    MultiWorkerMirroredStrategy that needs `patch_keras_for_multi_worker`,
    which this function applies.
    `num_gpus` overrides the count of visible GPUs (tests, or to use fewer).
    """
    import tensorflow as tf  # after trainer/__init__ (this package) set TF_USE_LEGACY_KERAS

    cluster = cluster_from_env(env)
    if cluster is not None and cluster.is_multi_worker:
        # TensorFlow reads the cluster from os.environ["TF_CONFIG"], not from
        # an argument: TFConfigClusterResolver inside this strategy, and again
        # any later strategy, tf-keras multi-worker callback or tf.data service
        # code in the process. When the cluster came from CLUSTER_SPEC alone
        # (Vertex AI's framework-neutral variable), TF_CONFIG must be written
        # so all of them see the same cluster. This is the one write to the
        # process environment in library code; it precedes the strategy.
        os.environ["TF_CONFIG"] = json.dumps(cluster.tf_config)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        patch_keras_for_multi_worker()
        gpus = len(tf.config.list_physical_devices("GPU")) if num_gpus is None else num_gpus
        role = f"{cluster.task_type} {cluster.task_index}" + (" (chief)" if cluster.is_chief else "")
        device = f"{gpus} GPU(s)" if gpus else "CPU"
        return strategy, (f"MultiWorkerMirroredStrategy: multi-worker, {cluster.num_workers} workers, "
                          f"this is {role}, {device} each, {strategy.num_replicas_in_sync} replicas in sync")
    gpus = len(tf.config.list_physical_devices("GPU")) if num_gpus is None else num_gpus
    note = ""
    if cluster is not None and cluster.task_type not in _TRAINING_TASKS:
        note = f" ({cluster.task_type} task: not part of synchronous training)"
    if gpus > 1:
        devices = [f"/gpu:{i}" for i in range(gpus)]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
        return strategy, f"MirroredStrategy: one machine, {gpus} GPUs{note}"
    device = "/gpu:0" if gpus == 1 else "/cpu:0"
    return tf.distribute.OneDeviceStrategy(device), f"OneDeviceStrategy: {device}{note}"


def _join(base: str, name: str) -> str:
    # os.path.join is right for local paths and for gs://bucket/dir alike; the
    # rstrip avoids "gs://b/dir//name" when Vertex hands a trailing slash.
    return os.path.join(base.rstrip("/") or "/", name)


def run_dirs(output_dir: Optional[str], env: Mapping[str, str]) -> RunDirs:
    """Model (run) dir, checkpoint dir and TensorBoard dir of this run.

    Vertex AI's AIP_MODEL_DIR / AIP_CHECKPOINT_DIR / AIP_TENSORBOARD_LOG_DIR
    win when set (the job's base output dir decides them); otherwise the
    run dir is `output_dir` with `checkpoints/` and `tensorboard/` inside.
    Paths are returned as given (gs:// included), without trailing slash;
    all I/O on them goes through tf.io.gfile.
    """
    model_dir = env.get("AIP_MODEL_DIR") or output_dir
    if not model_dir:
        raise ValueError("no output dir: pass --output-dir (or run on Vertex AI with a base output dir, "
                         "which sets AIP_MODEL_DIR)")
    model_dir = model_dir.rstrip("/") or "/"
    checkpoint_dir = env.get("AIP_CHECKPOINT_DIR") or _join(model_dir, CHECKPOINTS)
    tensorboard_dir = env.get("AIP_TENSORBOARD_LOG_DIR") or _join(model_dir, TENSORBOARD)
    return RunDirs(model_dir=model_dir, checkpoint_dir=checkpoint_dir.rstrip("/") or "/",
                   tensorboard_dir=tensorboard_dir.rstrip("/") or "/")


def _temp_root(path: str, cluster: ClusterInfo) -> str:
    parent = os.path.dirname(path.rstrip("/"))
    return _join(parent, f"workertemp_{cluster.task_type}_{cluster.task_index}")


def chief_or_temp_dir(path: str, cluster: Optional[ClusterInfo]) -> str:
    """Where this process writes what belongs at `path`.

    In multi-worker training every worker must run the save (the variables
    are synchronised by collective ops), but only the chief's copy is kept:
    the others write to `<parent>/workertemp_<type>_<index>/<name>` and
    delete it afterwards (`discard_temp_dir`) — the pattern of TensorFlow's
    multi-worker Keras tutorial. Without a cluster, or on the chief: `path`.
    """
    if cluster is None or cluster.is_chief:
        return path
    return _join(_temp_root(path, cluster), os.path.basename(path.rstrip("/")))


def discard_temp_dir(path: str, cluster: Optional[ClusterInfo]) -> None:
    """Deletes the non-chief temp dir `chief_or_temp_dir(path, cluster)` pointed
    into (the whole `workertemp_*` dir); nothing on the chief or without a cluster."""
    if cluster is None or cluster.is_chief:
        return
    import tensorflow as tf

    root = _temp_root(path, cluster)
    if tf.io.gfile.exists(root):
        tf.io.gfile.rmtree(root)


# --- Keras 3 + MultiWorkerMirroredStrategy -----------------------------------
#
# Keras 3's TensorFlow trainer (3.15 and earlier) breaks `fit` under
# MultiWorkerMirroredStrategy in two places (keras-team/keras#20585,
# tensorflow/tensorflow#72388), while MirroredStrategy and OneDeviceStrategy
# work:
#   1. `_maybe_symbolic_build` takes the shapes of the first batch by calling
#      `strategy.reduce("MEAN", batch)` on the whole (x, y) structure; the
#      collective path cannot convert a tuple of PerReplica values -> error.
#   2. `reduce_per_replica` averages the step's logs across workers with
#      `strategy.reduce("MEAN", v, axis=0)`; the logs are scalars -> error.
# The patch below changes only what happens under a multi-worker
# strategy: (1) shapes come from this worker's first replica batch (what
# MirroredStrategy's MEAN yields too: per-replica shapes), (2) scalar logs
# are averaged over all replicas (axis=None), so every worker reports the
# same, global loss. Everything else is delegated to Keras unchanged.

_PATCHED = False


def patch_keras_for_multi_worker() -> bool:
    """Makes Keras 3 `fit`/`evaluate` work under MultiWorkerMirroredStrategy; idempotent.

    Returns whether the patch is in place (False when this Keras no longer
    has the internals it replaces: then it presumably fixed them itself).
    """
    global _PATCHED
    if _PATCHED:
        return True
    import logging

    import tensorflow as tf

    try:
        from keras.src import tree
        from keras.src.backend.tensorflow import trainer as tf_trainer

        original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
        original_reduce = tf_trainer.reduce_per_replica
        is_multi_worker = tf_trainer._collective_all_reduce_multi_worker
    except (ImportError, AttributeError) as err:  # pragma: no cover - depends on the Keras version
        logging.getLogger("segrec.distribution").warning(
            "Keras internals changed (%s); multi-worker fit runs unpatched", err)
        return False

    def first_local(strategy, value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if strategy is None or iterator is None or not is_multi_worker(strategy):
            return original_build(self, iterator=iterator, data_batch=data_batch)
        for _, _, it in iterator:
            data_batch = tree.map_structure(lambda v: first_local(strategy, v), next(it))
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and is_multi_worker(strategy):
            def mean(v):
                return strategy.reduce("MEAN", v, axis=None) if tf.is_tensor(v) or isinstance(
                    v, tf.distribute.DistributedValues) else v

            return tree.map_structure(mean, values)
        return original_reduce(values, strategy, reduction)

    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    _PATCHED = True
    return True
