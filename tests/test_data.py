import numpy as np
import pytest
from model_fixtures import clear_keras_session, dataset_dir, tiny_encoder, user_texts  # noqa: F401

import trainer  # noqa: F401
from trainer import features
from trainer.data import tf_dataset as data
from trainer.model.text_encoder import TextCache

pytestmark = pytest.mark.usefixtures("clear_keras_session")


def test_load_catalog_follows_vocab_order(dataset_dir):
    cat = data.load_catalog(dataset_dir)
    with open(f"{dataset_dir}/{features.ITEM_VOCAB}") as f:
        vocab = [line.strip() for line in f]
    assert list(cat.item_ids) == vocab and len(cat) == 24
    i = cat.item_ids.index("o0")
    assert cat.titles[i] == "Trail Boots"
    assert cat.categories[i] == ("outdoor", "gift")
    assert "Trail Boots" in cat.texts[i]
    assert cat.category_vocab == ("gift", "kitchen", "music", "outdoor")
    # 30 users x 5 train positives.
    assert cat.counts.sum() == 150
    p = cat.sampling_probabilities
    assert p.shape == (24,) and np.isclose(p.sum(), 1.0)
    # Counts are sorted descending in the vocab, so are the probabilities.
    assert np.all(np.diff(p) <= 1e-9)


def test_make_dataset_shapes_and_padding(dataset_dir):
    ds = data.make_dataset(dataset_dir, "train", batch_size=8, shuffle=True, seed=3)
    batch = next(iter(ds))
    assert batch[features.HISTORY_ITEM_IDS].shape == (8, features.MAX_HISTORY)
    for key in (features.USER_ID, features.USER_TEXT, features.ITEM_ID, features.WEIGHT, features.TIMESTAMP):
        assert batch[key].shape == (8,)
    hist = batch[features.HISTORY_ITEM_IDS].numpy()
    # Histories hold at most 5 items; the rest is PAD.
    assert np.all(hist[:, 5:] == features.PAD_ITEM_ID.encode())
    rows = sum(int(b[features.ITEM_ID].shape[0]) for b in data.make_dataset(dataset_dir, "eval", 7))
    assert rows == 30


def test_make_dataset_is_deterministic_with_seed(dataset_dir):
    def ids(seed):
        ds = data.make_dataset(dataset_dir, "train", batch_size=16, shuffle=True, seed=seed)
        return np.concatenate([b[features.USER_TEXT].numpy() for b in ds])

    a, b = ids(5), ids(5)
    assert (a == b).all() and len(a) == 150
    assert not (a == ids(6)).all()


def test_make_dataset_adds_cached_text_vectors(dataset_dir, user_texts):
    enc = tiny_encoder(user_texts)
    cache = TextCache.build(enc, user_texts, progress=False)
    ds = data.make_dataset(dataset_dir, "eval", batch_size=4, text_cache=cache)
    batch = next(iter(ds))
    vec = batch[features.USER_TEXT_VECTOR].numpy()
    assert vec.shape == (4, 16)
    expected = enc(batch[features.USER_TEXT], training=False).numpy()
    np.testing.assert_allclose(vec, expected, atol=1e-6)


def test_missing_split_files_name_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-"):
        data.make_dataset(str(tmp_path), "train", batch_size=2)
    with pytest.raises(ValueError, match="split"):
        data.make_dataset(str(tmp_path), "test", batch_size=2)
