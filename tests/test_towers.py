import numpy as np
import pytest
import tensorflow as tf
from model_fixtures import clear_keras_session, dataset_dir  # noqa: F401

import trainer  # noqa: F401
from trainer import features
from trainer.data import tf_dataset as data
from trainer.model.towers import ItemTower, UserTower, item_tokens

pytestmark = pytest.mark.usefixtures("clear_keras_session")

TOWER = dict(text_buckets=64, dim=8, id_dim=8, category_dim=4, text_dim=8, seed=0)


@pytest.fixture
def catalog(dataset_dir):
    return data.load_catalog(dataset_dir)


def test_item_tokens_are_distinct_lowercase_words():
    assert item_tokens("Trail Boots. outdoor gift, trail!") == ["trail", "boots", "outdoor", "gift"]
    assert item_tokens("a b c", limit=2) == ["a", "b"]


def test_item_tower_shapes_and_unit_norm(catalog):
    tower = ItemTower.from_catalog(catalog, **TOWER)
    one = tower(tf.constant(["o0", "m1", "k7"])).numpy()
    assert one.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(one, axis=-1), 1.0, atol=1e-5)
    two = tower(tf.constant([["o0", "m1"], ["k7", ""]])).numpy()
    assert two.shape == (2, 2, 8)
    # An item is embedded from its id alone, whatever the batch shape.
    np.testing.assert_allclose(two[0, 0], one[0], atol=1e-6)
    np.testing.assert_allclose(two[1, 0], one[2], atol=1e-6)
    assert tower.catalog_embeddings().shape == (24, 8)


def test_item_tower_tables_hold_catalog_features(catalog):
    tower = ItemTower.from_catalog(catalog, **TOWER)
    # "o0" has categories (outdoor, gift): category vocab index + 1.
    row = int(tower.rows(tf.constant(["o0"]))[0])
    assert row == catalog.item_ids.index("o0") + 1
    cats = tower.category_table.numpy()[row]
    vocab = list(catalog.category_vocab)
    assert sorted(cats[cats > 0]) == sorted([vocab.index("outdoor") + 1, vocab.index("gift") + 1])
    # Item text "Trail Boots. outdoor gift" -> 4 token buckets.
    assert (tower.text_table.numpy()[row] > 0).sum() == 4
    # Unknown ids and PAD are row 0, whose tables are empty.
    assert tower.rows(tf.constant(["nope", features.PAD_ITEM_ID])).numpy().tolist() == [0, 0]
    assert not tower.category_table.numpy()[0].any()


def test_item_tower_config_and_weights_round_trip(catalog, tmp_path):
    tower = ItemTower.from_catalog(catalog, **TOWER)
    config = tower.get_config()
    clone = ItemTower.from_config(config)
    assert clone.get_config() == config
    clone.build()
    clone.set_weights(tower.get_weights())
    ids = tf.constant(list(catalog.item_ids))
    np.testing.assert_array_equal(clone(ids).numpy(), tower(ids).numpy())


def _user_inputs(batch=4, history=3, dim=8, text_dim=16, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "text_vector": tf.constant(rng.normal(size=(batch, text_dim)), tf.float32),
        "history_embeddings": tf.constant(rng.normal(size=(batch, history, dim)), tf.float32),
        "history_mask": tf.constant([[True, True, False], [True, False, False], [False] * 3, [True] * 3]),
        "user_id": tf.constant(["u1", "u2", "u3", "u4"]),
    }


@pytest.mark.parametrize("buckets", [0, 16])
def test_user_tower_shapes_and_masking(buckets):
    tower = UserTower(dim=8, text_input_dim=16, text_dim=8, hidden_units=[16], user_id_buckets=buckets, seed=0)
    inputs = _user_inputs()
    u = tower(inputs).numpy()
    assert u.shape == (4, 8)
    np.testing.assert_allclose(np.linalg.norm(u, axis=-1), 1.0, atol=1e-5)
    # Padded positions do not matter: change them, the output stays.
    changed = dict(inputs)
    noise = np.array(inputs["history_embeddings"])
    noise[~np.array(inputs["history_mask"])] = 99.0
    changed["history_embeddings"] = tf.constant(noise)
    np.testing.assert_allclose(tower(changed).numpy(), u, atol=1e-6)


def test_user_tower_config_round_trip():
    tower = UserTower(dim=8, text_input_dim=16, text_dim=8, hidden_units=[16, 8], user_id_buckets=16, seed=1)
    tower.build()
    config = tower.get_config()
    clone = UserTower.from_config(config)
    assert clone.get_config() == config
    clone.build()
    clone.set_weights(tower.get_weights())
    inputs = _user_inputs()
    np.testing.assert_array_equal(clone(inputs).numpy(), tower(inputs).numpy())
