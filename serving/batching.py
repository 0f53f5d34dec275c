"""Server-side batching: concurrent requests merged into one model call.

One worker thread takes the oldest queued task, waits at most `timeout_s`
for more tasks that can share its call (same loaded version, signature and
scalar inputs such as k and beta), up to `max_batch_size` rows, concatenates
their inputs along the batch axis, runs the signature once and splits the
outputs back by rows. history_item_ids of different widths are right-padded
with "" (the pad id the model masks), so a merged row scores as it would
alone. The queue is bounded: `submit` raises `QueueFull` (the server answers
RESOURCE_EXHAUSTED) instead of letting latency grow without limit.

A merged call that fails is retried task by task, so one bad request cannot
fail the others it was batched with.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, Optional

import numpy as np

from trainer import features

_LOG = logging.getLogger("segrec.serve")


class QueueFull(RuntimeError):
    pass


@dataclasses.dataclass
class Task:
    loaded: object  # model_manager.LoadedVersion
    signature: str
    inputs: dict  # name -> numpy array, batch axis first (scalars excepted)
    future: concurrent.futures.Future
    rows: int = 0
    key: tuple = ()


def _task_key(loaded, signature: str, inputs: dict) -> tuple:
    scalars = tuple(sorted((k, v.item()) for k, v in inputs.items() if v.ndim == 0))
    # Only rank-1 inputs and the history matrix can be merged; anything else runs alone.
    mergeable = all(v.ndim <= 1 or k == features.HISTORY_ITEM_IDS for k, v in inputs.items())
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
            parts = [np.pad(p, [(0, 0), (0, width - p.shape[1])], constant_values=features.PAD_ITEM_ID)
                     if p.shape[1] < width else p for p in parts]
        merged[name] = np.concatenate(parts, axis=0)
    return merged


def split(outputs: dict, tasks: list) -> list:
    result, start = [], 0
    for t in tasks:
        result.append({k: v[start:start + t.rows] for k, v in outputs.items()})
        start += t.rows
    return result


class Batcher:
    """run(loaded, signature, inputs) -> outputs is the model call; on_batch(rows, tasks)
    is told the size of each call (metrics)."""

    def __init__(self, run: Callable, max_batch_size: int = 64, timeout_s: float = 0.005, max_queue: int = 256,
                 on_batch: Optional[Callable] = None):
        self._run = run
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._on_batch = on_batch
        self._leftover: list = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="segrec-batcher", daemon=True)
        self._thread.start()

    def submit(self, loaded, signature: str, inputs: dict) -> concurrent.futures.Future:
        if self._stopping.is_set():
            raise QueueFull("the server is shutting down")
        rows = max((v.shape[0] for v in inputs.values() if v.ndim >= 1), default=1)
        task = Task(loaded, signature, inputs, concurrent.futures.Future(), rows,
                    _task_key(loaded, signature, inputs))
        try:
            self._queue.put_nowait(task)
        except queue.Full:
            raise QueueFull(f"the request queue is full ({self._queue.maxsize} waiting); retry later") from None
        return task.future

    def queued(self) -> int:
        return self._queue.qsize() + len(self._leftover)

    # --- worker --------------------------------------------------------------------
    def _next(self, timeout: float) -> Optional[Task]:
        if self._leftover:
            return self._leftover.pop(0)
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _loop(self) -> None:
        while True:
            first = self._next(0.05)
            if first is None:
                if self._stopping.is_set() and self._queue.empty():
                    return
                continue
            batch, rows = [first], first.rows
            deadline = time.monotonic() + self.timeout_s
            skipped = []
            mergeable = first.key[3] is True
            while mergeable and rows < self.max_batch_size:
                # Leftovers first (they are older), then the queue until the timeout.
                if self._leftover:
                    task = self._leftover.pop(0)
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        task = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if task.key == first.key and rows + task.rows <= self.max_batch_size:
                    batch.append(task)
                    rows += task.rows
                else:
                    skipped.append(task)
            self._leftover = skipped + self._leftover
            self._execute(batch, rows)

    def _execute(self, batch: list, rows: int) -> None:
        live = [t for t in batch if t.future.set_running_or_notify_cancel()]
        if not live:
            return
        if self._on_batch is not None:
            self._on_batch(sum(t.rows for t in live), len(live))
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
        """Stops taking tasks, answers the queued ones, ends the worker."""
        self._stopping.set()
        self._thread.join(timeout=timeout)
