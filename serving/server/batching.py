"""Server-side batching: concurrent requests merged into one model call.

Adaptive, like Triton's dynamic batcher: a request that finds the model
idle (no batch executing) runs at once, with whatever compatible requests
are already queued; requests that arrive while a batch executes accumulate
and go together into the next call. So a lone request never waits for a
batch to fill, and under load batches grow by themselves.

`num_threads` batches may execute at the same time (TF Serving's
num_batch_threads; default 1). With more than one, a free thread that finds
the model busy on another thread waits up to `timeout_s` (from the oldest
queued request) for the batch to fill to `max_batch_size` rows before it
runs a partial one; with one thread the timeout never applies (there is no
free thread while the model is busy, and none is needed when it is idle).

Requests share a call when they are for the same loaded version and
signature (and, for exports whose k / beta are scalars, the same knobs).
Their inputs are concatenated along the batch axis, k and beta included
(one value per row); history_item_ids (and serving_exclude's
exclude_item_ids) of different widths are right-padded with "" (the pad id
the model masks), so a merged row scores as it would alone. The outputs are split back by rows, and item_ids / scores of each
request are cut to its own max(k) columns, so a request's answer does not
depend on what it was batched with.

The queue is bounded: `submit` raises `QueueFull` (the server answers
RESOURCE_EXHAUSTED) instead of letting latency grow without limit. A merged
call that fails is retried task by task, so one bad request cannot fail the
others it was batched with.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Callable, Optional

import numpy as np

from trainer import features

_LOG = logging.getLogger("segrec.serve")

# Outputs with one column per result; cut to the request's own max(k) after a merged call.
_K_COLUMNS = (features.OUT_ITEM_IDS, features.OUT_SCORES)
# [B, width] item-id inputs padded with "" (the model ignores the pad): requests of different widths merge.
_PADDED_IDS = (features.HISTORY_ITEM_IDS, features.EXCLUDE_ITEM_IDS)


class QueueFull(RuntimeError):
    """The bounded queue is full (RESOURCE_EXHAUSTED)."""


class ShuttingDown(RuntimeError):
    """The batcher is stopping and takes no new requests (UNAVAILABLE)."""


@dataclasses.dataclass(eq=False)  # identity: tasks are removed from the queue by `is`
class Task:
    loaded: object  # model_manager.LoadedVersion
    signature: str
    inputs: dict  # name -> numpy array, batch axis first (rank-0 knobs of old exports excepted)
    future: concurrent.futures.Future
    rows: int = 0
    key: tuple = ()
    enqueued: float = 0.0


def _task_key(loaded, signature: str, inputs: dict) -> tuple:
    scalars = tuple(sorted((k, v.item()) for k, v in inputs.items() if v.ndim == 0))
    # Only rank-1 inputs and the ""-padded id matrices can be merged; anything else runs alone.
    mergeable = all(v.ndim <= 1 or k in _PADDED_IDS for k, v in inputs.items())
    return (id(loaded), signature, scalars, mergeable or object())


def merge(tasks: list) -> dict:
    """Concatenates the tasks' inputs along axis 0 (history padded with "")."""
    merged = {}
    for name, first in tasks[0].inputs.items():
        if first.ndim == 0:
            merged[name] = first
            continue
        parts = [t.inputs[name] for t in tasks]
        if first.ndim == 2:
            width = max(p.shape[1] for p in parts)
            # Decoded request strings are bytes: pad with b"" so the array stays all-bytes.
            pad = features.PAD_ITEM_ID.encode() if first.dtype == object else features.PAD_ITEM_ID
            parts = [np.pad(p, [(0, 0), (0, width - p.shape[1])], constant_values=pad)
                     if p.shape[1] < width else p for p in parts]
        merged[name] = np.concatenate(parts, axis=0)
    return merged


def split(outputs: dict, tasks: list) -> list:
    """The merged outputs back per task: its rows, and its own max(k) columns of item_ids / scores."""
    result, start = [], 0
    for t in tasks:
        part = {k: v[start:start + t.rows] for k, v in outputs.items()}
        result.append(trim_to_k(part, t.inputs))
        start += t.rows
    return result


def trim_to_k(outputs: dict, inputs: dict) -> dict:
    k = inputs.get(features.K)
    if k is None or k.ndim != 1 or k.size == 0:
        return outputs
    cols = int(k.max())
    return {name: (v[:, :cols] if name in _K_COLUMNS and v.ndim == 2 else v) for name, v in outputs.items()}


class Batcher:
    """run(loaded, signature, inputs) -> outputs is the model call.

    on_batch(rows, requests) is told the size of each call; in_model(delta)
    the change in the number of requests inside an executing call (+n when
    a call starts, -n when it ends); both for metrics.
    """

    def __init__(self, run: Callable, max_batch_size: int = 64, timeout_s: float = 0.005, max_queue: int = 256,
                 on_batch: Optional[Callable] = None, num_threads: int = 1, in_model: Optional[Callable] = None):
        if max_batch_size < 1 or max_queue < 1 or num_threads < 1:
            raise ValueError("max_batch_size, max_queue and num_threads must be >= 1")
        self._run = run
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self.max_queue = max_queue
        self.num_threads = num_threads
        self._on_batch = on_batch
        self._in_model = in_model
        self._pending: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._executing = 0  # batches being run now
        self._stopping = False
        self._threads = [threading.Thread(target=self._loop, name=f"segrec-batcher-{i}", daemon=True)
                         for i in range(num_threads)]
        for t in self._threads:
            t.start()

    def submit(self, loaded, signature: str, inputs: dict) -> concurrent.futures.Future:
        rows = max((v.shape[0] for v in inputs.values() if v.ndim >= 1), default=1)
        task = Task(loaded, signature, inputs, concurrent.futures.Future(), rows,
                    _task_key(loaded, signature, inputs), time.monotonic())
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._pending.append(task)
            self._cond.notify()
        return task.future

    def queued(self) -> int:
        """Requests waiting (not yet in a model call)."""
        with self._cond:
            return len(self._pending)

    def executing(self) -> int:
        """Model calls running now."""
        with self._cond:
            return self._executing

    # --- worker --------------------------------------------------------------------
    def _compatible(self) -> tuple:
        """(tasks sharing the oldest task's key, in order, up to max_batch_size rows; their rows).
        The oldest always goes, even alone above the limit."""
        head = self._pending[0]
        batch, rows = [head], head.rows
        if head.key[3] is True:
            for task in list(self._pending)[1:]:
                if rows >= self.max_batch_size:
                    break
                if task.key == head.key and rows + task.rows <= self.max_batch_size:
                    batch.append(task)
                    rows += task.rows
        return batch, rows

    def _take(self) -> Optional[list]:
        """Blocks until a batch should run (see the module doc); None when stopping and drained."""
        with self._cond:
            while True:
                if not self._pending:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                batch, rows = self._compatible()
                wait = self._pending[0].enqueued + self.timeout_s - time.monotonic()
                if self._executing == 0 or rows >= self.max_batch_size or wait <= 0 or self._stopping:
                    for task in batch:
                        self._pending.remove(task)
                    self._executing += 1
                    if self._pending:
                        self._cond.notify()  # another free thread may take what is left
                    return batch
                self._cond.wait(wait)

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._execute(batch)
            except Exception:  # noqa: BLE001  (a bug here must not end the worker)
                _LOG.exception("a batch of %d requests failed outside the model", len(batch))
            finally:
                # Drop the batch before waiting for the next one: an idle thread must not keep its last
                # requests (and the model version they ran on) alive after a swap.
                del batch
                with self._cond:
                    self._executing -= 1
                    self._cond.notify_all()  # the model may be idle now: a waiting thread runs its batch

    def _execute(self, batch: list) -> None:
        live = [t for t in batch if t.future.set_running_or_notify_cancel()]
        if not live:
            return
        if self._on_batch is not None:
            self._on_batch(sum(t.rows for t in live), len(live))
        if self._in_model is not None:
            self._in_model(len(live))
        try:
            self._answer(live)
        finally:
            if self._in_model is not None:
                self._in_model(-len(live))

    def _answer(self, live: list) -> None:
        try:
            inputs = live[0].inputs if len(live) == 1 else merge(live)
            outputs = self._run(live[0].loaded, live[0].signature, inputs)
            parts = split(outputs, live) if len(live) > 1 else [outputs]
        except Exception as err:  # noqa: BLE001  (retried alone below, or handed to the caller)
            if len(live) == 1:
                live[0].future.set_exception(err)
                return
            _LOG.warning("a merged call of %d requests failed (%s); running them one by one", len(live), err)
            for t in live:
                try:
                    t.future.set_result(self._run(t.loaded, t.signature, t.inputs))
                except Exception as one_err:  # noqa: BLE001
                    t.future.set_exception(one_err)
            return
        for t, out in zip(live, parts):
            t.future.set_result(out)

    def stop(self, timeout: float = 30.0) -> None:
        """Stops taking tasks, answers the queued ones, ends the workers."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
