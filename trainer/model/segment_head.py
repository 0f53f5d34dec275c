"""User segments: K unit-norm centroids on the embedding sphere.

p = softmax(u . C^T / tau) [B, K]; segment = argmax p.

Clustering loss: DEC (Xie et al., 2016, "Unsupervised Deep Embedding for
Clustering Analysis") with the soft assignment Q = p and the self-training
target P_ik ∝ Q_ik^2 / f_k, f_k = sum_i Q_ik (stop-gradient), loss KL(P || Q).
Chosen over a VQ-style commitment loss ||u - sg(c_argmax)||^2 because
  * it is soft: every centroid gets gradient from every user in proportion
    to its responsibility, so centroids that lose the argmax early are not
    dead (the classic failure of hard-assignment commitment losses);
  * the f_k normalisation of the target already penalises big clusters;
  * it trains exactly the segment_probs that serving emits.
As DEC can still collapse when the encoder is trained jointly, a balance
term KL(mean_batch Q || uniform) = sum_k qbar_k log(K qbar_k) pushes the
batch's average assignment toward uniform; its weight is small (default
0.1) so real size differences between segments survive.
"""

from __future__ import annotations

from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@keras.saving.register_keras_serializable(package="segrec")
class SegmentHead(keras.layers.Layer):
    """Soft assignment of unit-norm embeddings u [B, d] to K segments.

    Args:
      num_segments: K.
      dim: d, the embedding size.
      temperature: tau of the assignment softmax (cosines lie in [-1, 1], so
        tau ~ 0.1 gives usefully sharp probabilities).
      balance_weight: weight of the anti-collapse balance term.
      seed: seeds the random initial centroids (before `init_centroids`).
    """

    def __init__(
        self,
        num_segments: int = 8,
        dim: int = 32,
        temperature: float = 0.1,
        balance_weight: float = 0.1,
        seed: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_segments < 1:
            raise ValueError(f"num_segments must be >= 1, got {num_segments}")
        self.num_segments = int(num_segments)
        self.dim = int(dim)
        self.temperature = float(temperature)
        self.balance_weight = float(balance_weight)
        self.seed = seed

    def build(self, input_shape=None):
        # Variables are float32 even under mixed precision: losses stay float32.
        self.centroids_var = self.add_weight(
            name="centroids",
            shape=(self.num_segments, self.dim),
            initializer=keras.initializers.RandomNormal(seed=self.seed),
            trainable=True,
            dtype="float32",
        )
        self.built = True

    @property
    def centroids(self) -> tf.Tensor:
        """[K, d] unit-norm centroids (normalised on read, so always unit)."""
        return tf.math.l2_normalize(tf.convert_to_tensor(self.centroids_var), axis=-1)

    def renormalize(self) -> None:
        """Projects the stored centroids back onto the sphere (after a step)."""
        self.centroids_var.assign(tf.math.l2_normalize(self.centroids_var, axis=-1))

    def logits(self, u: tf.Tensor) -> tf.Tensor:
        """u [B, d] -> [B, K] scaled cosines."""
        return tf.matmul(tf.cast(u, tf.float32), self.centroids, transpose_b=True) / self.temperature

    def call(self, u, training=None):
        """u [B, d] -> (segment_probs [B, K] float32, segment_id [B] int32)."""
        probs = tf.nn.softmax(self.logits(u), axis=-1)
        return probs, tf.argmax(probs, axis=-1, output_type=tf.int32)

    def clustering_loss(self, u: tf.Tensor, sample_weight: Optional[tf.Tensor] = None) -> dict:
        """DEC KL(P||Q) and the balance term, float32 scalars.

        Returns {"kl": ..., "balance": ..., "loss": kl + balance_weight * balance}.
        """
        q = tf.nn.softmax(self.logits(u), axis=-1)
        w = tf.ones_like(q[:, 0]) if sample_weight is None else tf.cast(sample_weight, tf.float32)
        eps = 1e-8
        f = tf.reduce_sum(q * w[:, None], axis=0)  # soft segment sizes
        p = tf.square(q) / (f + eps)
        p = tf.stop_gradient(p / tf.reduce_sum(p, axis=-1, keepdims=True))
        kl_rows = tf.reduce_sum(p * (tf.math.log(p + eps) - tf.math.log(q + eps)), axis=-1)
        kl = tf.reduce_sum(kl_rows * w) / tf.maximum(tf.reduce_sum(w), eps)
        q_bar = f / tf.maximum(tf.reduce_sum(f), eps)
        balance = tf.reduce_sum(q_bar * tf.math.log(q_bar * self.num_segments + eps))
        return {"kl": kl, "balance": balance, "loss": kl + self.balance_weight * balance}

    def query(self, u: tf.Tensor, beta, cold: Optional[tf.Tensor] = None) -> tf.Tensor:
        """Segment-aware query [B, d]: normalise(u + beta * c_segment(u)).

        beta: a scalar, [B] (one per row) or [B, 1].

        Rows where `cold` [B] bool is True (no history) get their segment's
        centroid instead.
        """
        u = tf.cast(u, tf.float32)
        _, seg = self(u)
        c = tf.gather(self.centroids, seg)
        beta = tf.cast(beta, tf.float32)
        if beta.shape.rank == 1:  # one beta per row: [B] -> [B, 1]
            beta = beta[:, None]
        q = tf.math.l2_normalize(u + beta * c, axis=-1)
        if cold is not None:
            q = tf.where(tf.reshape(cold, [-1, 1]), c, q)
        return q

    def init_centroids(self, embeddings: np.ndarray, seed: Optional[int] = None) -> np.ndarray:
        """Sets the centroids to spherical-ish k-means of `embeddings` [N, d].

        Returns the [N] k-means labels.
        """
        if not self.built:
            self.build()
        centers, labels = kmeans(embeddings, self.num_segments, seed=self.seed if seed is None else seed)
        self.centroids_var.assign(centers.astype(np.float32))
        return labels

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_segments": self.num_segments,
                "dim": self.dim,
                "temperature": self.temperature,
                "balance_weight": self.balance_weight,
                "seed": self.seed,
            }
        )
        return config


def kmeans(embeddings: np.ndarray, k: int, seed: Optional[int] = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means of L2-normalised `embeddings` [N, d] -> (unit centers [k, d], labels [N]).

    On unit vectors Euclidean k-means orders points like cosine, and the
    centers are renormalised onto the sphere afterwards.
    """
    from sklearn.cluster import KMeans

    x = _unit(embeddings)
    if len(x) < k:
        raise ValueError(f"need at least k={k} embeddings to fit {k} segments, got {len(x)}")
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x)
    return _unit(km.cluster_centers_), km.labels_


def choose_k(
    embeddings: np.ndarray,
    k_range: tuple[int, int] = (2, 12),
    seed: Optional[int] = 0,
    sample_size: int = 5000,
) -> tuple[int, list[tuple[int, float]]]:
    """Picks K by silhouette (cosine) over k_range (inclusive) for `--num-segments auto`.

    Returns (best_k, [(k, silhouette), ...]). Silhouette is computed on at
    most `sample_size` points (seeded) to stay O(sample^2).
    """
    from sklearn.metrics import silhouette_score

    x = _unit(embeddings)
    lo, hi = k_range
    hi = min(hi, len(x) - 1)
    if hi < lo:
        raise ValueError(f"{len(x)} embeddings are too few for k in {k_range}")
    sweep: list[tuple[int, float]] = []
    for k in range(lo, hi + 1):
        _, labels = kmeans(x, k, seed=seed)
        score = silhouette_score(
            x, labels, metric="cosine", sample_size=min(sample_size, len(x)), random_state=seed
        )
        sweep.append((k, float(score)))
    best_k = max(sweep, key=lambda ks: ks[1])[0]
    return best_k, sweep


def segment_sizes(segment_ids: Sequence[int], num_segments: int) -> np.ndarray:
    """[K] counts of users per segment."""
    return np.bincount(np.asarray(segment_ids, np.int64), minlength=num_segments)
