"""The sequence-aware user tower, the full-catalog softmax and the item prior
served from the one index (trainer/model/towers.py, segrec_model.py)."""

import numpy as np
import pytest
import tensorflow as tf
from model_fixtures import (  # noqa: F401
    TINY_MODEL,
    all_user_texts,
    clear_keras_session,
    dataset_dir,
    tiny_encoder,
    user_texts,
    valid_dataset_dir,
)

import trainer  # noqa: F401
from trainer import features
from trainer.data import tf_dataset as data
from trainer.model.segrec_model import SegRecModel
from trainer.model.text_encoder import TextCache
from trainer.model.towers import HistoryTransformer

pytestmark = pytest.mark.usefixtures("clear_keras_session")

SEQUENCE = {"history_encoder": "transformer", "loss": "full", "item_prior": "segment", "cold_query": "user",
            "history_dropout": 0.0}


def _setup(dataset_dir, texts, batch_size=16, **overrides):
    catalog = data.load_catalog(dataset_dir)
    enc = tiny_encoder(texts)
    cache = TextCache.build(enc, texts, progress=False)
    model = SegRecModel.from_catalog(catalog, text_encoder=enc, **{**TINY_MODEL, **SEQUENCE, **overrides})
    train = data.make_dataset(dataset_dir, "train", batch_size, shuffle=True, seed=1, text_cache=cache)
    return model, train, catalog


def _randomize_prior(model, seed=0):
    rng = np.random.default_rng(seed)
    model.item_bias.assign(rng.normal(size=model.item_bias.shape).astype(np.float32))
    if model.item_prior == "segment":
        model.segment_bias.assign(rng.normal(size=model.segment_bias.shape).astype(np.float32))


def test_transformer_is_causal_a_later_item_never_changes_an_earlier_position():
    layer = HistoryTransformer(dim=8, max_len=6, num_layers=2, num_heads=2, dropout=0.0, seed=1)
    layer.build()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], bool)
    base = layer.sequence(x, mask).numpy()
    # History is most recent first: slot 2 came after slots 3.. and before slots 1 and 0.
    changed = x.copy()
    changed[:, 2] = rng.normal(size=(2, 8))
    out = layer.sequence(changed, mask).numpy()
    np.testing.assert_array_equal(out[:, 3:], base[:, 3:])  # earlier positions: untouched
    assert np.abs(out[:, :3] - base[:, :3]).max() > 1e-3  # it and everything after it: changed
    # Padding slots neither contribute nor get an output.
    padded = x.copy()
    padded[1, 3:] = 100.0
    np.testing.assert_array_equal(layer.sequence(padded, mask).numpy()[1], base[1])
    np.testing.assert_array_equal(base[1, 3:], 0.0)
    np.testing.assert_array_equal(layer(x, mask).numpy(), base[:, 0])


def test_segment_prior_served_from_the_index_equals_the_dense_score(dataset_dir, user_texts):
    from serving.export.index import BruteForceIndex

    model, train, _ = _setup(dataset_dir, user_texts)
    _randomize_prior(model)
    batch = next(iter(train))
    out = model.user_outputs(batch, beta=0.0)
    u = out[features.EMBEDDING].numpy()
    p = out[features.SEGMENT_PROBS].numpy()
    v = model.item_tower.catalog_embeddings().numpy()
    b = model.item_bias.numpy()[1:]
    seg_b = model.segment_bias.numpy()[1:]
    tau = model.retrieval_temperature
    # The training logit, computed densely, times tau (a positive scale: the same ranking).
    dense = u @ v.T + tau * (b[None, :] + p @ seg_b.T)
    served = out[features.QUERY].numpy() @ model.item_embeddings().numpy().T
    np.testing.assert_allclose(served, dense, atol=1e-5)
    assert model.item_embeddings().shape == (len(model.item_ids), model.embedding_dim + 1 + model.num_segments)
    index = BruteForceIndex(model.item_embeddings())
    scores, idx = index.search(out[features.QUERY], 5)
    np.testing.assert_array_equal(idx.numpy(), np.argsort(-dense, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(scores.numpy(), np.sort(dense, axis=1)[:, ::-1][:, :5], atol=1e-5)


def test_segments_on_and_off_share_every_other_weight_path(dataset_dir, user_texts):
    on, train, _ = _setup(dataset_dir, user_texts, item_prior="segment")
    off, _, _ = _setup(dataset_dir, user_texts, item_prior="global")
    def named(model):
        # Strip the model's own (auto-numbered) name: the paths below it are the weight paths.
        return {w.path.split("/", 1)[-1]: w.numpy() for w in model.weights}

    on_w, off_w = named(on), named(off)
    # The only extra weight of the segment-aware model is its per-segment item bias.
    assert set(on_w) - set(off_w) == {"segment_bias"}
    assert set(off_w) <= set(on_w)
    for path, value in off_w.items():
        np.testing.assert_array_equal(on_w[path], value)  # same seed, same initial values
    # With the segment bias at zero the two score every item identically.
    batch = next(iter(train))
    q_on = on.user_outputs(batch)[features.QUERY].numpy()
    q_off = off.user_outputs(batch)[features.QUERY].numpy()
    np.testing.assert_allclose(q_on @ on.item_embeddings().numpy().T, q_off @ off.item_embeddings().numpy().T,
                               atol=1e-6)


def test_full_softmax_loss_is_the_catalog_cross_entropy_without_seen_items(dataset_dir, user_texts):
    model, train, _ = _setup(dataset_dir, user_texts)
    _randomize_prior(model, seed=3)
    batch = next(iter(train))
    got = float(model.compute_losses(batch, training=False)["retrieval_loss"])
    out = model.user_outputs(batch)
    logits = out[features.QUERY].numpy() @ model.item_embeddings().numpy().T / model.retrieval_temperature
    ids = {i: n for n, i in enumerate(model.item_ids)}
    targets = [ids[t.decode()] for t in batch[features.ITEM_ID].numpy()]
    weights = batch[features.WEIGHT].numpy()
    losses = []
    for row, target in enumerate(targets):
        seen = {ids[h.decode()] for h in batch[features.HISTORY_ITEM_IDS].numpy()[row] if h} - {target}
        keep = np.array([j not in seen for j in range(len(ids))])
        z = logits[row][keep]
        losses.append(weights[row] * (np.log(np.exp(z - z.max()).sum()) + z.max() - logits[row][target]))
    assert got == pytest.approx(float(np.mean(losses)), rel=1e-4)


def test_full_softmax_transformer_model_learns_the_planted_groups(valid_dataset_dir):
    import keras

    from trainer.data import arrays as da
    from trainer.training import fit as training

    texts = all_user_texts(valid_dataset_dir)
    model, train, catalog = _setup(valid_dataset_dir, texts)
    cache = TextCache.build(model.text_encoder, texts, progress=False)
    queries = da.load_queries(valid_dataset_dir, "valid", catalog.item_ids)
    model.compile(keras.optimizers.Adam(0.02))
    history = training.fit(model, train, epochs=4, warmup_epochs=1, init_batches=5, recall_k=8, verbose=0,
                           valid_queries=queries, text_cache=cache)
    assert history["retrieval_loss"][-1] < history["retrieval_loss"][0]
    assert max(history["val_recall_at_8"]) > 0.6  # chance is about 8/22


def test_cold_users_get_a_history_free_list_from_their_own_vector(dataset_dir, user_texts):
    from serving.export.index import BruteForceIndex
    from serving.export.signatures import ServingModule

    model, train, _ = _setup(dataset_dir, user_texts)
    _randomize_prior(model)
    module = ServingModule(model, BruteForceIndex(model.item_embeddings()), k_max=10, default_k=5)
    texts = tf.constant(["loves hiking and camping", "plays guitar in a band"])
    users = {features.USER_TEXT: texts, features.USER_ID: tf.constant(["new-1", "new-2"]),
             features.HISTORY_ITEM_IDS: tf.fill([2, 1], features.PAD_ITEM_ID)}
    cold = module.recommend(users, 5, 0.0)
    ids = cold[features.OUT_ITEM_IDS].numpy()
    assert (ids != b"").all() and all(len(set(row)) == 5 for row in ids)
    assert np.isfinite(cold[features.OUT_SCORES].numpy()).all()
    # Not the centroid: two cold users with different text get their own query.
    out = model.user_outputs(users)
    assert not np.allclose(out[features.QUERY].numpy()[0], out[features.QUERY].numpy()[1])


def test_old_configs_load_as_the_mean_in_batch_model(dataset_dir, user_texts):
    model, _, _ = _setup(dataset_dir, user_texts)
    config = model.get_config()
    for key in ("history_encoder", "max_history", "history_layers", "history_heads", "history_dropout", "loss",
                "exclude_seen", "item_prior", "cold_query"):
        config.pop(key)
    old = SegRecModel.from_config(config)
    assert (old.history_encoder, old.loss_kind, old.item_prior, old.cold_query) == \
        ("mean", "in_batch", "none", "centroid")
    assert old.query_dim == old.embedding_dim


def test_every_position_loss_trains_each_slot_on_the_item_that_followed_it(dataset_dir, user_texts):
    model, train, _ = _setup(dataset_dir, user_texts, positions="all")
    _randomize_prior(model, seed=5)
    batch = next(iter(train))
    got = float(model.compute_losses(batch, training=False)["retrieval_loss"])
    # Dense reference: slot i's user vector (history slots i..) against the whole catalog.
    table = model.item_tower.embed_rows(tf.range(len(model.item_ids) + 1))
    rows = model.item_tower.rows(batch[features.HISTORY_ITEM_IDS]).numpy()
    inputs = {"text_vector": batch[features.USER_TEXT_VECTOR], "history_embeddings": tf.gather(table, rows),
              "history_mask": rows > 0, "user_id": batch[features.USER_ID]}
    users = model.user_tower.sequence_outputs(inputs).numpy()
    target = model.item_tower.rows(batch[features.ITEM_ID]).numpy()
    items = model.item_embeddings().numpy()
    losses = []
    for b in range(rows.shape[0]):
        for i in range(rows.shape[1]):
            t = target[b] if i == 0 else rows[b, i - 1]
            if t == 0 or (i > 0 and rows[b, i] == 0):
                continue
            p = model.segment_head(users[b:b + 1, i])[0]
            q = model._query_with_prior(users[b:b + 1, i], p).numpy()[0]
            z = q @ items.T / model.retrieval_temperature
            seen = {r for r in rows[b, i:] if r > 0} - {t}
            keep = np.array([r + 1 not in seen for r in range(len(items))])
            zk = z[keep]
            losses.append(batch[features.WEIGHT].numpy()[b] * (np.log(np.exp(zk - zk.max()).sum()) + zk.max() - z[t - 1]))
    assert len(losses) > rows.shape[0]  # more signals than examples
    assert got == pytest.approx(float(np.mean(losses)), rel=1e-4)
    # Slot 0 of the sequence is the served user vector.
    np.testing.assert_allclose(users[:, 0], model.user_outputs(batch)[features.EMBEDDING].numpy(), atol=1e-5)


def test_sampled_softmax_is_the_logq_corrected_mixed_pool_cross_entropy(dataset_dir, user_texts):
    model, train, _ = _setup(dataset_dir, user_texts, loss="sampled", sampled_negatives=5)
    _randomize_prior(model, seed=7)
    batch = next(iter(train))
    u = model.user_outputs(batch)[features.EMBEDDING]
    rows = model.item_tower.rows(batch[features.ITEM_ID])
    negatives = tf.constant([1, 2, 3, 3, 7], tf.int32)
    got = float(model._sampled_softmax_loss(u, rows, negatives, batch[features.WEIGHT], training=False))
    pool = np.concatenate([rows.numpy(), negatives.numpy()])
    q = model.user_outputs(batch)[features.QUERY].numpy()
    items = np.concatenate([np.zeros((1, q.shape[1]), np.float32), model.item_embeddings().numpy()])[pool]
    probs = model.sampling_probability.numpy()[pool]
    n, b = len(model.item_ids), len(pool) - 5
    logits = q @ items.T / model.retrieval_temperature - np.log(b * probs + 5 / n)[None, :]
    losses = []
    for i in range(b):
        keep = np.array([j == i or pool[j] != pool[i] for j in range(len(pool))])  # duplicates of the positive out
        z = logits[i][keep]
        target = logits[i, i]
        losses.append(batch[features.WEIGHT].numpy()[i] * (np.log(np.exp(z - z.max()).sum()) + z.max() - target))
    assert got == pytest.approx(float(np.mean(losses)), rel=1e-4)
    # It trains: one step lowers the loss on the same batch.
    import keras

    keras.utils.set_random_seed(0)  # the uniform negatives
    model.compile(keras.optimizers.Adam(0.05))
    before = float(model.compute_losses(batch, training=False)["retrieval_loss"])
    for _ in range(5):
        model.train_on_batch(batch)
    assert float(model.compute_losses(batch, training=False)["retrieval_loss"]) < before


def test_empty_history_rate_blanks_whole_histories_in_training_only(dataset_dir, user_texts):
    """A blanked row's query is exactly the new-user query (text + prior, no history); the others and
    inference are untouched; rate 0 changes nothing."""
    model, train, _ = _setup(dataset_dir, user_texts, empty_history_rate=0.5, seed=3)
    batch = next(iter(train))
    tf.random.set_seed(7)
    trained, cold = model.user_embedding(batch, training=True)
    served, served_cold = model.user_embedding(batch, training=False)
    blank = dict(batch, **{features.HISTORY_ITEM_IDS: tf.fill(tf.shape(batch[features.HISTORY_ITEM_IDS]),
                                                            features.PAD_ITEM_ID)})
    new_user, _ = model.user_embedding(blank, training=False)
    cold, served_cold = cold.numpy(), served_cold.numpy()
    blanked = cold & ~served_cold  # rows with a history that training read as empty
    assert 0 < blanked.sum() < len(cold), "about half the rows should be blanked"
    np.testing.assert_allclose(trained.numpy()[blanked], new_user.numpy()[blanked], atol=1e-6)
    np.testing.assert_allclose(trained.numpy()[~blanked], served.numpy()[~blanked], atol=1e-6)
    # Inference never blanks; the rate is saved with the model.
    again, _ = model.user_embedding(batch, training=False)
    np.testing.assert_array_equal(again.numpy(), served.numpy())
    assert SegRecModel.from_config(model.get_config()).empty_history_rate == 0.5
    off, _, _ = _setup(dataset_dir, user_texts, seed=3)
    a, _ = off.user_embedding(batch, training=True)
    b, _ = off.user_embedding(batch, training=False)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="empty_history_rate"):
        _setup(dataset_dir, user_texts, empty_history_rate=1.0)
