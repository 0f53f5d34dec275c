"""Tests of trainer.sasrec: SASRec learns order, is causal, selects its epoch on validation."""

import copy
import pickle

import numpy as np
import pytest

import trainer  # noqa: F401  (environment before tensorflow)
from trainer.evaluation import baselines
from trainer.evaluation import ranking as metrics
from trainer.evaluation.sasrec import SASRecBaseline

N_ITEMS = 30
N_CHAIN = 25  # items 0..24 form a ring; 25..29 are blockbusters
WALK = 7  # chain items per user: 5 train, 1 validation, 1 test
TINY = {"embedding_dim": 16, "max_len": 8, "dropout": 0.1, "learning_rate": 5e-3, "batch_size": 32, "seed": 0}


def _chains(seed=0, n_users=120):
    """Users walk the ring i -> i+1 (mod 25), so the next item is set by the last one.

    Before its walk, each user watches some of 5 blockbusters (each with
    probability 0.6): they are the most popular items by far, so
    popularity recommends the blockbusters a user has not seen yet instead
    of the next chain item. Returns per-split (users, items, timestamps),
    every user's items in order (`seen`, a list) and walks [U, WALK].
    Training pairs are shuffled: order must come from the timestamps.
    """
    rng = np.random.default_rng(seed)
    walks = (rng.integers(0, N_CHAIN, n_users)[:, None] + np.arange(WALK)[None, :]) % N_CHAIN  # [U, WALK]
    seen, split = [], {"train": ([], [], []), "valid": ([], [], []), "test": ([], [], [])}
    for u in range(n_users):
        hits = np.flatnonzero(rng.random(N_ITEMS - N_CHAIN) < 0.6) + N_CHAIN
        seq = np.r_[rng.permutation(hits), walks[u]]
        seen.append(seq)
        for t, item in enumerate(seq):
            name = "test" if t == seq.size - 1 else "valid" if t == seq.size - 2 else "train"
            for col, value in zip(split[name], (u, item, 1000 + 10 * t + u % 5)):
                col.append(value)
    out = {k: tuple(np.array(c) for c in cols) for k, cols in split.items()}
    perm = rng.permutation(out["train"][0].size)
    out["train"] = tuple(c[perm] for c in out["train"])
    return {**out, "seen": seen, "walks": walks}


@pytest.fixture(scope="module")
def fitted():
    d = _chains()
    (tu, ti, tts), (vu, vi, _) = d["train"], d["valid"]
    model = SASRecBaseline(max_epochs=40, eval_every=5, patience=3, **TINY)
    model.fit(tu, ti, N_ITEMS, timestamps=tts, valid_user_idx=vu, valid_item_idx=vi)
    return model, d


def _recall(score_fn, split, seen, k):
    users, targets, _ = split
    exclude = [seen[u][:-1] for u in users]  # everything before the test item
    r = metrics.rank_targets(lambda q: score_fn(users[q]), users.size, targets, exclude)
    return metrics.summarize(r, ks=(k,))[f"recall@{k}"]


def test_sasrec_beats_popularity_on_sequential_toy(fitted):
    model, d = fitted
    (tu, ti, tts), (vu, vi, vts) = d["train"], d["valid"]
    pop = baselines.PopularityBaseline().fit(np.r_[tu, vu], np.r_[ti, vi], N_ITEMS)
    model.set_history(np.r_[tu, vu], np.r_[ti, vi], timestamps=np.r_[tts, vts])
    sas_r = _recall(model.score, d["test"], d["seen"], k=3)
    pop_r = _recall(pop.score, d["test"], d["seen"], k=3)
    assert pop_r < 0.3, pop_r  # the toy does mislead popularity
    assert sas_r >= 0.9 and sas_r > pop_r + 0.4, (sas_r, pop_r)


def test_set_history_moves_the_prediction_along_the_chain(fitted):
    model, d = fitted
    (tu, ti, tts), (vu, vi, vts) = d["train"], d["valid"]
    walks = d["walks"]
    model.set_history(tu, ti, timestamps=tts)
    before = np.argmax(model.score(np.arange(walks.shape[0])), axis=1)
    model.set_history(np.r_[tu, vu], np.r_[ti, vi], timestamps=np.r_[tts, vts])
    after = np.argmax(model.score(np.arange(walks.shape[0])), axis=1)
    assert np.mean(before == walks[:, WALK - 2]) >= 0.9
    assert np.mean(after == walks[:, WALK - 1]) >= 0.9


def test_causal_later_items_never_change_earlier_positions(fitted):
    model, _ = fitted
    rng = np.random.default_rng(1)
    seq = rng.integers(0, N_ITEMS, (4, model.max_len))
    seq[0, :3] = -1  # left padding
    base = model.hidden_states(seq)
    assert base.shape == (4, model.max_len, model.embedding_dim)
    for t in (3, 5, model.max_len - 1):
        changed = seq.copy()
        changed[:, t] = (changed[:, t] + 7) % N_ITEMS
        out = model.hidden_states(changed)
        np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-5)
        assert np.abs(out[:, t] - base[:, t]).max() > 1e-4


def test_validation_selection_is_recorded(fitted):
    model, _ = fitted
    sel = model.selection_
    assert sel["split"] == "validation" and sel["metric"] == "ndcg@10"
    values = [c["ndcg@10"] for c in sel["curve"]]
    assert [c["epoch"] for c in sel["curve"]] == list(range(5, 5 * len(values) + 1, 5))
    assert sel["best_value"] == max(values)
    assert sel["best_epoch"] == sel["curve"][int(np.argmax(values))]["epoch"]
    assert sel["epochs_run"] == sel["curve"][-1]["epoch"] <= 40


def test_patience_stops_a_run_that_does_not_improve():
    (tu, ti, tts), (vu, vi, _) = _chains()["train"], _chains()["valid"]
    model = SASRecBaseline(**{**TINY, "learning_rate": 1e-12, "dropout": 0.0},
                           max_epochs=50, eval_every=1, patience=2)
    model.fit(tu, ti, N_ITEMS, timestamps=tts, valid_user_idx=vu, valid_item_idx=vi)
    assert model.selection_["epochs_run"] == 3 and model.selection_["best_epoch"] == 1


def test_without_validation_trains_max_epochs_and_is_seeded():
    tu, ti, tts = _chains()["train"]
    runs = [SASRecBaseline(max_epochs=2, **TINY).fit(tu, ti, N_ITEMS, timestamps=tts) for _ in range(2)]
    assert runs[0].selection_["split"] is None and runs[0].selection_["epochs_run"] == 2
    np.testing.assert_allclose(runs[0].score(np.arange(5)), runs[1].score(np.arange(5)), atol=1e-5)


def test_score_shape_dtype_and_unknown_users(fitted):
    model, _ = fitted
    s = model.score(np.array([0, 3, 10_000]))
    assert s.shape == (3, N_ITEMS) and s.dtype == np.float32
    assert np.all(s[2] == 0.0) and np.all(np.isfinite(s))
    model.set_history(np.array([0, 0]), np.array([3, 4]), n_users=3)  # users 1, 2: empty history
    s = model.score(np.arange(3))
    assert np.all(s[1:] == 0.0) and np.argmax(s[0]) == 5


def test_config_round_trip():
    model = SASRecBaseline(embedding_dim=32, num_heads=2, num_blocks=1, max_len=20, dropout=0.3, seed=4)
    clone = SASRecBaseline.from_config(model.get_config())
    assert clone.get_config() == model.get_config() and clone.name == "sasrec"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"embedding_dim": 10, "num_heads": 3}, "multiple of num_heads"),
        ({"dropout": 1.0}, "dropout"),
        ({"max_len": 0}, "max_len"),
        ({"select_metric": "mrr"}, "select_metric"),
    ],
)
def test_bad_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SASRecBaseline(**kwargs)


def test_bad_input_errors():
    tu, ti, tts = _chains()["train"]
    model = SASRecBaseline(max_epochs=1, **TINY)
    with pytest.raises(RuntimeError, match="before fit"):
        model.score(np.array([0]))
    with pytest.raises(ValueError, match="timestamps has"):
        model.fit(tu, ti, N_ITEMS, timestamps=tts[:-1])
    with pytest.raises(ValueError, match="both valid_user_idx and valid_item_idx"):
        model.fit(tu, ti, N_ITEMS, valid_user_idx=tu[:3])
    with pytest.raises(ValueError, match="outside"):
        model.fit(tu, ti, n_items=5)
    with pytest.raises(ValueError, match="two or more training items"):
        model.fit(np.arange(3), np.arange(3), N_ITEMS)
    model.fit(tu, ti, N_ITEMS, timestamps=tts)
    with pytest.raises(ValueError, match="shape"):
        model.hidden_states(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="outside"):
        model.hidden_states(np.full((1, model.max_len), N_ITEMS))
    with pytest.raises(ValueError, match="negative"):
        model.score(np.array([-1]))


def test_copy_and_pickle_keep_the_selected_weights(fitted):
    model, _ = fitted
    users = np.arange(6)
    expected = model.score(users)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        np.testing.assert_allclose(clone.score(users), expected, atol=1e-5)
        assert clone.selection_ == model.selection_
