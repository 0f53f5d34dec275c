import keras
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
from trainer.data import arrays as da
from trainer.data import tf_dataset as data
from trainer.model.segrec_model import SegRecModel
from trainer.model.text_encoder import TextCache
from trainer.training import fit as training

pytestmark = pytest.mark.usefixtures("clear_keras_session")


@pytest.fixture
def catalog(dataset_dir):
    return data.load_catalog(dataset_dir)


def cached_setup(dataset_dir, user_texts, catalog, batch_size=16, held_out="eval", with_cache=False, **overrides):
    enc = tiny_encoder(user_texts)
    cache = TextCache.build(enc, user_texts, progress=False)
    model = SegRecModel.from_catalog(catalog, text_encoder=enc, **{**TINY_MODEL, **overrides})
    train = data.make_dataset(dataset_dir, "train", batch_size, shuffle=True, seed=1, text_cache=cache)
    evals = data.make_dataset(dataset_dir, held_out, batch_size, text_cache=cache)
    return (model, train, evals, cache) if with_cache else (model, train, evals)


def test_outputs_have_documented_shapes(dataset_dir, user_texts, catalog):
    model, train, _ = cached_setup(dataset_dir, user_texts, catalog)
    batch = next(iter(train))
    out = model.user_outputs(batch, beta=0.5)
    assert set(out) == {features.EMBEDDING, features.QUERY, features.SEGMENT_PROBS, features.SEGMENT_ID}
    assert out[features.EMBEDDING].shape == (16, 8)
    assert out[features.QUERY].shape == (16, 8)
    assert out[features.SEGMENT_PROBS].shape == (16, 3)
    assert out[features.SEGMENT_ID].shape == (16,) and out[features.SEGMENT_ID].dtype == tf.int32
    assert model.item_embeddings().shape == (24, 8)
    np.testing.assert_allclose(np.linalg.norm(out[features.QUERY], axis=1), 1.0, atol=1e-5)
    # logQ table: row 0 (unknown) then the catalog's probabilities.
    np.testing.assert_allclose(model.sampling_probability.numpy()[1:], catalog.sampling_probabilities)


def test_cached_vectors_and_on_the_fly_encoding_agree(dataset_dir, user_texts, catalog):
    model, train, _ = cached_setup(dataset_dir, user_texts, catalog)
    batch = next(iter(train))
    raw = {k: v for k, v in batch.items() if k != features.USER_TEXT_VECTOR}
    np.testing.assert_allclose(
        model(batch)[features.EMBEDDING].numpy(), model(raw)[features.EMBEDDING].numpy(), atol=1e-5
    )


def test_loss_decreases_and_fit_reports_recall(valid_dataset_dir):
    texts = all_user_texts(valid_dataset_dir)
    catalog = data.load_catalog(valid_dataset_dir)
    model, train, valid, cache = cached_setup(valid_dataset_dir, texts, catalog, held_out="valid", with_cache=True)
    queries = da.load_queries(valid_dataset_dir, "valid", catalog.item_ids)
    model.compile(keras.optimizers.Adam(0.02))
    history = training.fit(
        model, train, valid, epochs=4, warmup_epochs=1, init_batches=5, recall_k=8, patience=3, verbose=0,
        valid_queries=queries, text_cache=cache,
    )
    losses = history["retrieval_loss"]
    assert len(losses) == 5 and losses[-1] < losses[0]
    recall = history["val_recall_at_8"]
    assert all(0.0 <= r <= 1.0 for r in recall)
    # 3 planted groups of 8 items: a trained model ranks the user's group first;
    # chance is about 8/22.
    assert max(recall) > 0.6
    assert "val_loss" in history


def test_finetuning_moves_only_the_top_encoder_layers(dataset_dir, user_texts, catalog):
    enc = tiny_encoder(user_texts)
    model = SegRecModel.from_catalog(catalog, text_encoder=enc, finetune_layers=1, **TINY_MODEL)
    model.compile(keras.optimizers.Adam(0.05))
    batch = next(iter(data.make_dataset(dataset_dir, "train", 16, shuffle=True, seed=1)))
    before = {w.path: w.numpy().copy() for w in enc.weights}
    model.train_on_batch(batch)
    after = {w.path: w.numpy() for w in enc.weights}
    moved = {p for p in before if not np.array_equal(before[p], after[p])}
    top = {p for p in before if p.startswith("transformer_layer_1/")}
    # Every top-layer weight moves; nothing else in the encoder does.
    assert moved == top


def test_frozen_encoder_stays_exactly_fixed(dataset_dir, user_texts, catalog):
    enc = tiny_encoder(user_texts, trainable_layers=2)
    model = SegRecModel.from_catalog(catalog, text_encoder=enc, finetune_layers=0, **TINY_MODEL)
    assert enc.trainable_weights == []
    model.compile(keras.optimizers.Adam(0.05))
    # No cached vectors: the model runs the (frozen) encoder itself.
    batch = next(iter(data.make_dataset(dataset_dir, "train", 16, shuffle=True, seed=1)))
    before = [w.numpy().copy() for w in enc.weights]
    towers_before = [w.numpy().copy() for w in model.user_tower.weights]
    model.train_on_batch(batch)
    for b, w in zip(before, enc.weights):
        np.testing.assert_array_equal(b, w.numpy())
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(towers_before, model.user_tower.weights))


def test_cold_user_query_is_its_centroid(dataset_dir, user_texts, catalog):
    model, train, _ = cached_setup(dataset_dir, user_texts, catalog)
    batch = next(iter(train))
    cold = np.all(batch[features.HISTORY_ITEM_IDS].numpy() == features.PAD_ITEM_ID.encode(), axis=1)
    assert cold.any() and not cold.all()
    out = model.user_outputs(batch, beta=0.3)
    centroids = tf.gather(model.segment_head.centroids, out[features.SEGMENT_ID]).numpy()
    np.testing.assert_allclose(out[features.QUERY].numpy()[cold], centroids[cold], atol=1e-6)
    assert not np.allclose(out[features.QUERY].numpy()[~cold], centroids[~cold], atol=1e-3)


def test_config_and_weights_round_trip(dataset_dir, user_texts, catalog, tmp_path):
    model, train, _ = cached_setup(dataset_dir, user_texts, catalog)
    model.compile(keras.optimizers.Adam(0.02))
    model.fit(train, epochs=1, verbose=0)
    batch = next(iter(train))
    expected = model.user_outputs(batch, beta=0.5)
    config = model.get_config()
    clone = SegRecModel.from_config(config)
    assert clone.get_config() == config
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    clone.load_weights(path)
    got = clone.user_outputs(batch, beta=0.5)
    for key in expected:
        np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy())
    np.testing.assert_array_equal(clone.item_embeddings().numpy(), model.item_embeddings().numpy())


def test_with_num_segments_keeps_towers(dataset_dir, user_texts, catalog):
    model, train, _ = cached_setup(dataset_dir, user_texts, catalog)
    batch = next(iter(train))
    best, sweep = training.choose_segments(model, train, k_range=(2, 4))
    assert [k for k, _ in sweep] == [2, 3, 4] and best in (2, 3, 4)
    clone = model.with_num_segments(best)
    assert clone.segment_head.num_segments == best
    out = clone.user_outputs(batch)
    assert out[features.SEGMENT_PROBS].shape == (16, best)
    np.testing.assert_array_equal(
        out[features.EMBEDDING].numpy(), model.user_outputs(batch)[features.EMBEDDING].numpy()
    )


def test_mixed_precision_keeps_outputs_and_losses_float32(dataset_dir, user_texts, catalog, monkeypatch):
    import trainer.model.segrec_model as model_lib

    if not tf.config.list_physical_devices("GPU"):
        assert model_lib.compute_policy(True) == "float32"
    # Force the GPU branch so the float16 wiring is exercised on CPU too.
    monkeypatch.setattr(model_lib, "compute_policy", lambda mp: "mixed_float16" if mp else "float32")
    model, train, _ = cached_setup(dataset_dir, user_texts, catalog, mixed_precision=True)
    assert model.user_tower.hidden[0].compute_dtype == "float16"
    model.compile(keras.optimizers.Adam(0.02))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    logs = model.train_on_batch(next(iter(train)), return_dict=True)
    assert np.isfinite(logs["loss"])
    out = model.user_outputs(next(iter(train)))
    assert out[features.EMBEDDING].dtype == tf.float32 and out[features.SEGMENT_PROBS].dtype == tf.float32


@pytest.mark.pretrained
def test_model_with_pretrained_minilm_round_trips_through_a_run_dir(tmp_path):
    """The saved config names the package preset; reloading it must not trip Keras' safe mode."""
    import numpy as np
    from model_fixtures import write_dataset

    from trainer import features as F
    from trainer.data import tf_dataset as data_lib
    from trainer.model import run_dir as rd
    from trainer.model.segrec_model import SegRecModel
    from trainer.model.text_encoder import TextEncoder

    root = write_dataset(str(tmp_path / "ds"), users=6, per_user=3)
    catalog = data_lib.load_catalog(root)
    model = SegRecModel.from_catalog(catalog, embedding_dim=8, item_id_dim=8, category_dim=4, item_text_dim=8,
                                     text_input_dim=384, user_text_dim=8, user_hidden_units=(8,), num_segments=2,
                                     text_encoder=TextEncoder.pretrained(sequence_length=16), seed=0)
    rd.save_model(str(tmp_path / "run"), model)
    again = rd.load_model(str(tmp_path / "run"))
    batch = next(iter(data_lib.make_dataset(root, "eval", batch_size=4)))
    a, b = model(batch, training=False, beta=0.5), again(batch, training=False, beta=0.5)
    np.testing.assert_allclose(a[F.QUERY].numpy(), b[F.QUERY].numpy(), atol=1e-6)
