"""Retrieval indexes over the catalog's item embeddings, as tf.Modules.

Both kinds answer `search(queries [B, d], n) -> (scores [B, n] float32,
indices [B, n] int32)` (indices into the catalog, best first) inside a
`tf.function`, so they can be saved in a SavedModel:

  * `BruteForceIndex`: exact, q . E^T + top_k. Stock TF ops only, so it runs
    on any TF Serving build.
  * `ScannIndex`: a ScaNN searcher (scann_ops) whose state lives in the
    SavedModel as variables; loading it needs the ScaNN ops registered
    (`from scann.scann_ops.py import scann_ops`) and saving needs
    `SaveOptions(namespace_whitelist=["Scann"])` (see SAVE_NAMESPACES).

ScaNN's parameters follow the catalog size (`ScannParams.for_catalog`): exact
ScaNN scoring below PARTITION_MIN items, where partitioning would only cost
recall; a tree with ~sqrt(N) leaves, anisotropic hashing and exact reordering
above it. How many leaves a query searches is a variable of the saved index:
`tune_leaves` picks the smallest of 1, 2, 4, ... leaves whose recall@k against brute force on sample queries
reaches a target, so the saved index meets the recall it was checked for
whatever the geometry of the embeddings (well-clustered embeddings stop at a
few leaves; unclustered ones need most of them). `recall_at_k` measures an
index against brute force.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)

SCANN = "scann"
BRUTE_FORCE = "brute_force"
INDEX_KINDS = (SCANN, BRUTE_FORCE)
SAVE_NAMESPACES = ["Scann"]  # custom-op namespace a ScaNN SavedModel holds
PARTITION_MIN = 1024  # catalogs smaller than this are scored exactly by ScaNN


def scann_ops():
    """The ScaNN TF ops module (imported on use: it loads a custom-op .so)."""
    try:
        from scann.scann_ops.py import scann_ops as ops
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "the ScaNN index needs the `scann` package (pip install 'scann[tf]'); "
            "or export with --index brute_force"
        ) from e
    return ops


@dataclasses.dataclass(frozen=True)
class ScannParams:
    """How the ScaNN searcher is built (see ScannParams.for_catalog).

    num_leaves = 0 means no partitioning and exact (brute-force) scoring.
    """

    num_leaves: int = 0
    num_leaves_to_search: int = 0
    dimensions_per_block: int = 2
    anisotropic_threshold: float = 0.2
    reorder: int = 0  # exact re-scoring of this many AH candidates (0: none)

    @classmethod
    def for_catalog(cls, num_items: int, k_max: int = 100) -> "ScannParams":
        if num_items < PARTITION_MIN:
            return cls()
        leaves = max(2, int(round(math.sqrt(num_items))))
        # A tenth of the leaves until tune_leaves sets the smallest depth that reaches the recall target.
        return cls(
            num_leaves=leaves,
            num_leaves_to_search=max(1, int(math.ceil(leaves / 10))),
            reorder=min(num_items, max(250, 4 * k_max)),
        )

    @property
    def partitioned(self) -> bool:
        return self.num_leaves > 0

    def describe(self) -> str:
        if not self.partitioned:
            return "exact scoring (no partitioning)"
        return (
            f"tree {self.num_leaves} leaves, search {self.num_leaves_to_search}; "
            f"AH {self.dimensions_per_block} dims/block; reorder {self.reorder}"
        )


class BruteForceIndex(tf.Module):
    """Exact top-n by dot product over embeddings [N, d]."""

    kind = BRUTE_FORCE

    def __init__(self, embeddings, name: str = "brute_force_index"):
        super().__init__(name=name)
        embeddings = np.asarray(embeddings, np.float32)
        self.num_items = int(embeddings.shape[0])
        self.dim = int(embeddings.shape[1])
        self.embeddings = tf.Variable(embeddings, trainable=False, name="embeddings")

    def search(self, queries: tf.Tensor, n) -> tuple[tf.Tensor, tf.Tensor]:
        """queries [B, d], n <= N -> (scores [B, n], indices [B, n] int32)."""
        scores = tf.matmul(tf.cast(queries, tf.float32), self.embeddings, transpose_b=True)
        top = tf.math.top_k(scores, k=n)
        return top.values, tf.cast(top.indices, tf.int32)


class ScannIndex(tf.Module):
    """ScaNN approximate top-n by dot product over embeddings [N, d]."""

    kind = SCANN

    def __init__(self, embeddings, params: ScannParams, name: str = "scann_index"):
        super().__init__(name=name)
        ops = scann_ops()
        embeddings = np.asarray(embeddings, np.float32)
        self.num_items = int(embeddings.shape[0])
        self.dim = int(embeddings.shape[1])
        self.params = params
        self._reorder = int(params.reorder)
        builder = ops.builder(embeddings, 10, "dot_product")
        if params.partitioned:
            builder = builder.tree(
                num_leaves=params.num_leaves,
                num_leaves_to_search=params.num_leaves_to_search,
                training_sample_size=self.num_items,
            ).score_ah(
                params.dimensions_per_block,
                anisotropic_quantization_threshold=params.anisotropic_threshold,
            )
            if params.reorder:
                builder = builder.reorder(params.reorder)
        else:
            builder = builder.score_brute_force()
        searcher = builder.build(shared_name=f"{name}/{id(self)}")
        # ScannState: the searcher as variables, rebuilt into a handle in-graph.
        self.state = searcher.serialize_to_module()
        self.leaves_to_search = tf.Variable(
            max(1, params.num_leaves_to_search), dtype=tf.int32, trainable=False, name="leaves_to_search"
        )

    def search(self, queries: tf.Tensor, n) -> tuple[tf.Tensor, tf.Tensor]:
        """queries [B, d], n <= N -> (scores [B, n], indices [B, n] int32)."""
        ops = scann_ops()
        searcher = ops.searcher_from_module(self.state)
        n = tf.cast(n, tf.int32)
        pre = tf.maximum(n, self._reorder) if self._reorder else None
        result = searcher.search_batched_parallel(
            tf.cast(queries, tf.float32),
            final_num_neighbors=n,
            pre_reorder_num_neighbors=pre,
            leaves_to_search=self.leaves_to_search if self.params.partitioned else None,
        )
        return result.distances, tf.cast(result.indices, tf.int32)


def build_index(kind: str, embeddings, k_max: int = 100):
    """An index of `kind` ("scann" | "brute_force") over embeddings [N, d]."""
    embeddings = np.asarray(embeddings, np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"the index needs embeddings [N, d] with N > 0, got shape {embeddings.shape}")
    if kind == BRUTE_FORCE:
        return BruteForceIndex(embeddings)
    if kind == SCANN:
        return ScannIndex(embeddings, ScannParams.for_catalog(len(embeddings), k_max))
    raise ValueError(f"unknown index kind {kind!r}; expected one of {INDEX_KINDS}")


def exact_top_k(queries: np.ndarray, embeddings: np.ndarray, k: int) -> np.ndarray:
    """Indices [Q, k] of the exact top-k by dot product (numpy reference)."""
    scores = np.asarray(queries, np.float32) @ np.asarray(embeddings, np.float32).T
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _traced_search(index, dim: int):
    return tf.function(
        index.search, input_signature=[tf.TensorSpec([None, dim], tf.float32), tf.TensorSpec([], tf.int32)]
    )


def recall_at_k(
    index, queries: np.ndarray, embeddings: np.ndarray, k: int = 10, batch_size: int = 256, search=None
) -> float:
    """Mean share of the exact top-k (brute force over `embeddings`) that
    `index` returns in its top-k, over queries [Q, d]. `search`: an already
    traced index.search, to trace once across calls."""
    queries = np.asarray(queries, np.float32)
    k = min(k, len(embeddings))
    exact = exact_top_k(queries, embeddings, k)
    search = search or _traced_search(index, queries.shape[1])
    hits = 0
    for s in range(0, len(queries), batch_size):
        _, got = search(tf.constant(queries[s : s + batch_size]), tf.constant(k, tf.int32))
        got = got.numpy()
        for row, truth in zip(got, exact[s : s + batch_size]):
            hits += len(set(row.tolist()) & set(truth.tolist()))
    return hits / float(max(1, len(queries) * k))


def tune_leaves(index, queries: np.ndarray, embeddings: np.ndarray, target: float, k: int = 10,
                margin: float = 0.01) -> float:
    """Sets a partitioned ScaNN index's leaves_to_search to the smallest of
    1, 2, 4, ... whose recall@k on `queries` reaches `target` + `margin`
    (capped at 1.0; every leaf if none does); returns that recall.

    Searching fewer leaves is what makes ScaNN fast, so the ladder starts at
    one leaf rather than at a guess; the margin keeps recall on unseen
    queries at the target.
    """
    search = _traced_search(index, np.shape(queries)[1])  # reads leaves_to_search at run time
    if not isinstance(index, ScannIndex) or not index.params.partitioned:
        return recall_at_k(index, queries, embeddings, k, search=search)
    goal = min(1.0, target + margin)
    leaves = 1
    while True:
        index.leaves_to_search.assign(min(leaves, index.params.num_leaves))
        recall = recall_at_k(index, queries, embeddings, k, search=search)
        if recall >= goal or leaves >= index.params.num_leaves:
            return recall
        leaves *= 2
    while recall < target and int(index.leaves_to_search.numpy()) < index.params.num_leaves:
        index.leaves_to_search.assign(min(index.params.num_leaves, 2 * int(index.leaves_to_search.numpy())))
        recall = recall_at_k(index, queries, embeddings, k, search=search)
    return recall
