import numpy as np
import pytest
import tensorflow as tf
from model_fixtures import clear_keras_session  # noqa: F401
from sklearn.metrics import adjusted_rand_score

import trainer  # noqa: F401
from trainer.model.segment_head import SegmentHead, choose_k, kmeans

pytestmark = pytest.mark.usefixtures("clear_keras_session")


def planted(n_per=20, dim=8, noise=0.05, seed=0):
    """3 groups of unit vectors around 3 orthogonal directions."""
    rng = np.random.default_rng(seed)
    centers = np.eye(dim)[:3]
    x = np.concatenate([c + noise * rng.normal(size=(n_per, dim)) for c in centers])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(3), n_per)


def test_init_centroids_recovers_planted_segments():
    x, labels = planted()
    head = SegmentHead(num_segments=3, dim=8, temperature=0.1, seed=0)
    head.init_centroids(x)
    probs, seg = head(tf.constant(x))
    assert probs.shape == (60, 3) and seg.shape == (60,) and seg.dtype == tf.int32
    np.testing.assert_allclose(probs.numpy().sum(axis=1), 1.0, atol=1e-5)
    assert adjusted_rand_score(labels, seg.numpy()) == 1.0
    np.testing.assert_allclose(np.linalg.norm(head.centroids.numpy(), axis=1), 1.0, atol=1e-5)


def test_choose_k_finds_three():
    x, _ = planted()
    best, sweep = choose_k(x, k_range=(2, 6), seed=0)
    assert best == 3
    assert [k for k, _ in sweep] == [2, 3, 4, 5, 6]
    assert max(s for _, s in sweep) == dict(sweep)[3]


def test_kmeans_needs_enough_points():
    with pytest.raises(ValueError, match="at least k=4"):
        kmeans(np.eye(3), 4)


def test_clustering_loss_by_hand():
    head = SegmentHead(num_segments=2, dim=2, temperature=0.01, balance_weight=0.5, seed=0)
    head.build()
    head.centroids_var.assign(np.eye(2, dtype=np.float32))
    # tau = 0.01 makes q one-hot: q = [[1,0],[0,1]] -> P = Q, KL = 0;
    # qbar = [.5,.5] -> balance = 0.
    split = head.clustering_loss(tf.constant([[1.0, 0.0], [0.0, 1.0]]))
    assert abs(float(split["kl"])) < 1e-5 and abs(float(split["balance"])) < 1e-5
    # Both users in segment 0: qbar = [1, 0] -> balance = 1 * log(2 * 1) = log 2.
    together = head.clustering_loss(tf.constant([[1.0, 0.0], [1.0, 0.0]]))
    assert np.isclose(float(together["balance"]), np.log(2), atol=1e-4)
    assert np.isclose(float(together["loss"]), float(together["kl"]) + 0.5 * np.log(2), atol=1e-4)


def test_clustering_loss_pulls_embeddings_to_centroids():
    x, _ = planted(noise=0.3, seed=1)
    head = SegmentHead(num_segments=3, dim=8, temperature=0.2, seed=0)
    head.init_centroids(x)
    u = tf.Variable(x)
    cos_before = np.max(x @ head.centroids.numpy().T, axis=1).mean()
    opt = tf.keras.optimizers.SGD(0.5)
    for _ in range(20):
        with tf.GradientTape() as tape:
            loss = head.clustering_loss(tf.math.l2_normalize(u, axis=-1))["kl"]
        opt.apply_gradients([(tape.gradient(loss, u), u)])
    un = tf.math.l2_normalize(u, axis=-1).numpy()
    assert np.max(un @ head.centroids.numpy().T, axis=1).mean() > cos_before


def test_query_mixes_centroid_and_cold_users_get_centroid():
    x, _ = planted()
    head = SegmentHead(num_segments=3, dim=8, seed=0)
    head.init_centroids(x)
    u = tf.constant(x[[0, 25, 50]])
    _, seg = head(u)
    c = tf.gather(head.centroids, seg).numpy()
    np.testing.assert_allclose(head.query(u, 0.0).numpy(), u.numpy(), atol=1e-6)
    q = head.query(u, 1.0).numpy()
    expected = (u.numpy() + c) / np.linalg.norm(u.numpy() + c, axis=1, keepdims=True)
    np.testing.assert_allclose(q, expected, atol=1e-5)
    cold = head.query(u, 0.3, cold=tf.constant([False, True, False])).numpy()
    np.testing.assert_allclose(cold[1], c[1], atol=1e-6)
    np.testing.assert_allclose(cold[0], head.query(u, 0.3).numpy()[0], atol=1e-6)


def test_config_round_trip_and_renormalize():
    head = SegmentHead(num_segments=4, dim=6, temperature=0.2, balance_weight=0.05, seed=3)
    head.build()
    config = head.get_config()
    clone = SegmentHead.from_config(config)
    assert clone.get_config() == config
    clone.build()
    np.testing.assert_array_equal(clone.centroids.numpy(), head.centroids.numpy())
    head.centroids_var.assign(head.centroids_var * 3.0)
    head.renormalize()
    np.testing.assert_allclose(np.linalg.norm(head.centroids_var.numpy(), axis=1), 1.0, atol=1e-5)
