"""The steps of `segrec segments refresh`, one function, DoFn or CombineFn each (see `refresh`).

Module-level so they pickle to Beam workers:
    unpack_embedding       keyed RunInference result -> (window, user_id, history, embedding)
    rejected_dead_letter   a user the model rejects even alone -> dead letter + count (either window)
    assign_one             (user_id, embedding) -> (user_id, nearest segment, cosine)
    mini_batch_kmeans      centroids after `iterations` mini-batches (batch_member, KMeansStatsFn,
                           update_centroids: trainer.segments.drift's batch_stats / apply_batch in Beam)
    CountsFn               segment ids -> sizes [K]; (old, new) pairs -> migration [K, K]
    parse_assignment       a previous refresh's assignments line -> (user_id, segment) or dead letter
    join_user              a user's new/old segment, history and profile -> assignment, migration pair,
                           profile row, embedding-sample row
Every aggregate is of bounded size ([K, d] sums, [K] / [K, K] counts).
"""

from __future__ import annotations

import json

import apache_beam as beam
import numpy as np

from beam_pipelines import transforms as T
from beam_pipelines.inference import retrying
from beam_pipelines.sources import records
from trainer import features
from trainer.segments import drift as sd

CURRENT, PREVIOUS = "current", "previous"  # the two windows (keys of the keyed RunInference)


def unpack_embedding(kv):
    """(window, PredictionResult of user_embedding) -> (window, user_id, history, embedding [d])."""
    window, result = kv
    q = result.example
    return window, q.user_id, tuple(q.history_item_ids), np.asarray(result.inference[features.EMBEDDING], np.float32)


def rejected_dead_letter(failed):
    """((window, UserQuery), error) of RunInferenceRetrying -> its dead letter and count."""
    (window, query), error = failed
    prefix = "" if window == CURRENT else f"{window}."
    where = "" if window == CURRENT else f" ({window} window)"
    yield beam.pvalue.TaggedOutput(T.DEAD, retrying.inference_dead_letter(query, error, where))
    yield beam.pvalue.TaggedOutput(T.COUNTS, (f"{prefix}dead.{retrying.MODEL_SOURCE}.{retrying.INFERENCE_ERROR}", 1))


def assign_one(uid_emb, centroids):
    """(user_id, embedding) -> (user_id, nearest centroid, its cosine)."""
    uid, emb = uid_emb
    labels, cos = sd.assign(emb[None, :], centroids)
    return uid, int(labels[0]), float(cos[0])


def batch_member(uid_emb, state):
    """(user_id, embedding), k-means state (centroids, counts) -> (nearest centroid, embedding)."""
    _, emb = uid_emb
    labels, _ = sd.assign(emb[None, :], state[0])
    return int(labels[0]), emb


class KMeansStatsFn(beam.CombineFn):
    """(segment, embedding [d]) -> (sums [K, d], counts [K]): one mini-batch's k-means statistics."""

    def __init__(self, k: int, d: int):
        self._k, self._d = k, d

    def create_accumulator(self):
        return np.zeros((self._k, self._d)), np.zeros(self._k)

    def add_input(self, acc, element):
        label, emb = element
        sums, counts = acc
        sums[label] += sd.unit(emb[None, :])[0]
        counts[label] += 1
        return sums, counts

    def merge_accumulators(self, accs):
        accs = list(accs)
        return sum(a[0] for a in accs), sum(a[1] for a in accs)

    def extract_output(self, acc):
        return acc


class CountsFn(beam.CombineFn):
    """Integer ids (or (a, b) pairs) -> counts [K] (or [K, K])."""

    def __init__(self, shape: tuple):
        self._shape = shape

    def create_accumulator(self):
        return np.zeros(self._shape, np.int64)

    def add_input(self, acc, element):
        acc[element] += 1
        return acc

    def merge_accumulators(self, accs):
        return sum(accs)

    def extract_output(self, acc):
        return acc


def update_centroids(state, stats):
    """(centroids, counts) + one mini-batch's (sums, counts) -> the next (centroids, counts)."""
    centroids, counts = state
    return sd.apply_batch(centroids, counts, stats[0], stats[1])


def parse_assignment(line: str, k: int):
    """A previous refresh's assignments line -> (user_id, segment), or a dead letter."""
    try:
        row = json.loads(line)
        seg = int(row["segment"])
        if not 0 <= seg < k:
            raise ValueError(f"segment {seg} outside 0..{k - 1}")
        yield str(row["user_id"]), seg
    except (ValueError, KeyError, TypeError) as err:
        yield beam.pvalue.TaggedOutput(T.DEAD, records.DeadLetter("previous_assignments", "line", "bad_assignment",
                                                                   str(err), line[:500]))


def join_user(element):
    """(user_id, {new, old, hist, user}) -> one tagged output per kind of record."""
    uid, g = element
    new, old = list(g["new"]), list(g["old"])
    prev = old[0] if old else None
    if not new:
        if old:
            yield beam.pvalue.TaggedOutput(T.COUNTS, ("users.left", 1))  # in the previous window only
        return
    _, seg, cos, emb = new[0]
    yield {"user_id": uid, "previous_segment": prev, "segment": seg, "similarity": round(cos, 6)}
    if prev is not None:
        yield beam.pvalue.TaggedOutput("pairs", (prev, seg))
    else:
        yield beam.pvalue.TaggedOutput(T.COUNTS, ("users.entered", 1))
    hist = list(g["hist"])
    users = list(g["user"])
    yield beam.pvalue.TaggedOutput("profile", json.dumps(
        {"user_id": uid, "segment": seg, "history": list(hist[0]) if hist else [],
         "attributes": users[0] if users else {}}, sort_keys=True, ensure_ascii=False))
    yield beam.pvalue.TaggedOutput("sample", (uid, -1 if prev is None else prev, seg, emb.tolist()))


def mini_batch_kmeans(emb, init, km: sd.KMeansSettings, k: int, d: int, prefix: str):
    """(user_id, embedding) pcoll + singleton (centroids, counts) -> singleton after km.iterations mini-batches."""
    state = init
    for it in range(km.iterations):
        member = emb | f"{prefix}Batch{it}" >> beam.Filter(
            lambda r, it=it: sd.in_batch(r[0], it, km.batch_fraction, km.seed))
        stats = (member | f"{prefix}Nearest{it}" >> beam.Map(batch_member, beam.pvalue.AsSingleton(state))
                 | f"{prefix}Stats{it}" >> beam.CombineGlobally(KMeansStatsFn(k, d)))
        state = state | f"{prefix}Update{it}" >> beam.Map(update_centroids, beam.pvalue.AsSingleton(stats))
    return state
