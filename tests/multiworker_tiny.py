"""Local multi-worker training: the harness, and a tiny worker that uses it.

`run_workers(cmd_for_index, num_workers, timeout, env_extra)` starts one
process per worker, each with a TF_CONFIG naming every worker on its own
free localhost port and its own task index, waits for all of them with a
deadline, kills the rest when one fails or time runs out, and returns each
worker's exit code and output. It imports no TensorFlow; any command that
reads TF_CONFIG (this script, `segrec train`) can be the worker.

Run as a script, this file is that worker: a 2-layer MLP trained for 2
epochs on 64 seeded random rows (global batch 16) under
`distribution.choose_strategy(os.environ)`; the chief saves the weights and
a result.json to `--out`, every worker prints `STRATEGY:` and a checksum of
its final weights (`WEIGHTS:`) so a test can see they stayed in sync.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from typing import Callable, List, Mapping, Optional, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class WorkerResult:
    index: int
    returncode: Optional[int]  # None: killed (timeout, or a peer failed)
    stdout: str
    stderr: str
    seconds: float


class WorkersFailed(AssertionError):
    """A worker exited non-zero or the deadline passed; the message holds every worker's output."""


def free_ports(n: int) -> List[int]:
    """n distinct free TCP ports on localhost (kept bound until all are chosen)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]


def tf_configs(num_workers: int, ports: Optional[Sequence[int]] = None) -> List[dict]:
    """One TF_CONFIG per worker: cluster {"worker": [localhost:p0, ...]}, task index i (worker 0 is chief)."""
    ports = list(ports) if ports is not None else free_ports(num_workers)
    hosts = [f"localhost:{p}" for p in ports]
    return [{"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}} for i in range(num_workers)]


def run_workers(cmd_for_index: Callable[[int], Sequence[str]], num_workers: int, timeout: float = 120,
                env_extra: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
                check: bool = True) -> List[WorkerResult]:
    """Runs `cmd_for_index(i)` for i in range(num_workers) as one local cluster.

    Each process gets the current environment + `env_extra` + its TF_CONFIG,
    and PYTHONPATH with the repo root first. Output goes to temp files (a
    full pipe would block a worker). When a worker fails, its peers would
    wait for it forever in the next collective, so they are killed; so is
    everything still running at `timeout` seconds. With `check`, raises
    WorkersFailed (with every worker's stdout/stderr) unless all exit 0.
    """
    configs = tf_configs(num_workers)
    base_env = dict(os.environ)
    base_env.update(env_extra or {})
    base_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), base_env.get("PYTHONPATH")]))
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="workers-") as logs, ExitStack() as stack:
        procs, files = [], []
        for i, config in enumerate(configs):
            out = stack.enter_context(open(os.path.join(logs, f"{i}.out"), "w+"))
            err = stack.enter_context(open(os.path.join(logs, f"{i}.err"), "w+"))
            env = dict(base_env, TF_CONFIG=json.dumps(config))
            procs.append(subprocess.Popen(list(cmd_for_index(i)), env=env, stdout=out, stderr=err,
                                          cwd=cwd or str(REPO), start_new_session=True))
            files.append((out, err))
        ended = [None] * num_workers
        reason = None
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                if p.poll() is not None and ended[i] is None:
                    ended[i] = time.monotonic() - start
            if any(p.returncode not in (None, 0) for p in procs):
                reason = "a worker failed; its peers were killed"
                break
            if time.monotonic() - start > timeout:
                reason = f"timed out after {timeout:.0f} s; the workers still running were killed"
                break
            time.sleep(0.2)
        killed = set()
        for i, p in enumerate(procs):
            if p.poll() is None:
                _kill(p)
                killed.add(i)
        results = []
        for i, (p, (out, err)) in enumerate(zip(procs, files)):
            out.seek(0)
            err.seek(0)
            seconds = ended[i] if ended[i] is not None else time.monotonic() - start
            results.append(WorkerResult(i, None if i in killed else p.returncode, out.read(), err.read(), seconds))
    if check and (reason or any(r.returncode != 0 for r in results)):
        raise WorkersFailed(format_failure(reason or "a worker failed", results))
    return results


def _kill(p: subprocess.Popen) -> None:
    # Each worker leads its own session (start_new_session), so this ends the
    # worker and anything it started, and nothing else.
    try:
        os.killpg(p.pid, 9)
    except ProcessLookupError:
        pass
    p.wait()


def format_failure(reason: str, results: Sequence[WorkerResult], tail: int = 4000) -> str:
    parts = [reason]
    for r in results:
        status = "killed" if r.returncode is None else f"exit {r.returncode}"
        parts.append(f"--- worker {r.index}: {status} after {r.seconds:.1f} s ---")
        parts.append("stdout:\n" + r.stdout[-tail:])
        parts.append("stderr:\n" + r.stderr[-tail:])
    return "\n".join(parts)


def as_cluster_spec(tf_config: dict) -> dict:
    """A local {"worker": [...]} TF_CONFIG as Vertex AI's CLUSTER_SPEC:
    worker 0 -> workerpool0 (the chief), worker i -> workerpool1 index i-1."""
    hosts, index = tf_config["cluster"]["worker"], tf_config["task"]["index"]
    task = {"type": "workerpool0", "index": 0} if index == 0 else {"type": "workerpool1", "index": index - 1}
    return {"cluster": {"workerpool0": hosts[:1], "workerpool1": hosts[1:]}, "task": task}


def _train_tiny(out_dir: str) -> int:
    import keras
    import numpy as np
    import tensorflow as tf

    import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before tensorflow)
    from trainer.training import distribution

    keras.utils.set_random_seed(0)
    # Before any other op: MultiWorkerMirroredStrategy configures collectives.
    strategy, description = distribution.choose_strategy(os.environ)
    cluster = distribution.cluster_from_env(os.environ)
    print("STRATEGY:", description, flush=True)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (x[:, :4].sum(axis=1, keepdims=True) > 0).astype("float32")
    # Global batch 16: each of the N workers gets 16 / N rows a step.
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    with strategy.scope():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    history = model.fit(dataset, epochs=2, verbose=2)

    weights_sum = float(sum(np.abs(w).sum() for w in model.get_weights()))
    print(f"WEIGHTS: {weights_sum:.6f}", flush=True)
    # Every worker saves; only the chief's copy stays.
    target = distribution.chief_or_temp_dir(out_dir, cluster)
    tf.io.gfile.makedirs(target)
    model.save_weights(os.path.join(target, "model.weights.h5"))
    if cluster is None or cluster.is_chief:
        result = {"strategy": description, "num_replicas_in_sync": strategy.num_replicas_in_sync,
                  "loss": [float(v) for v in history.history["loss"]], "weights_sum": weights_sum}
        with open(os.path.join(target, "result.json"), "w") as f:
            json.dump(result, f)
    distribution.discard_temp_dir(out_dir, cluster)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output dir (the chief's; workers use a temp dir beside it)")
    parser.add_argument("--as-cluster-spec", action="store_true",
                        help="move TF_CONFIG to CLUSTER_SPEC first (how a Vertex AI replica sees it)")
    args = parser.parse_args(argv)
    if args.as_cluster_spec:
        os.environ["CLUSTER_SPEC"] = json.dumps(as_cluster_spec(json.loads(os.environ.pop("TF_CONFIG"))))
    return _train_tiny(args.out)


if __name__ == "__main__":
    sys.exit(main())
