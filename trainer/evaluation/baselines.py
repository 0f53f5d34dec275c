"""Baselines that `segrec evaluate` reports beside the segrec model.

They tell whether the two-tower model with text and segments earns its
complexity: popularity (no personalisation), EASE (a strong linear
item-item model, Steck 2019) and an ID-only two-tower (the TFRS retrieval
tutorial: same loss as segrec, no text, no segments).

All baselines share one interface, on integer indices (users 0..n_users-1,
items 0..n_items-1):

  fit(train_user_idx [P], train_item_idx [P], n_items, n_users=None) -> self
  score(user_slice [b]) -> [b, n_items] float32, higher is better
  get_config() / from_config(config); `name`
  fit_grid(param, values, *fit_args, **fit_kwargs) -> {value: fitted model}
    (one fit per value by default; IdTwoTowerBaseline trains once for
    "epochs" and snapshots each epoch of the grid)

`segrec evaluate` fits every baseline on every training interaction (the
event log's training period), chooses its hyper-parameters on the validation
split (trainer.evaluation.evaluate.TUNING), refits the chosen configuration
on the training and validation periods, and scores test once.

`score` fits `trainer.evaluation.ranking.rank_targets`'s score_fn once the caller maps
query positions to user indices (e.g. `lambda q: model.score(users[q])`).
TensorFlow is imported only by IdTwoTowerBaseline, when it is fitted.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.linalg
import scipy.sparse as sp

logger = logging.getLogger(__name__)


def check_pairs(train_user_idx, train_item_idx, n_items, n_users):
    users = np.asarray(train_user_idx, np.int64).reshape(-1)
    items = np.asarray(train_item_idx, np.int64).reshape(-1)
    if users.shape != items.shape:
        raise ValueError(f"train_user_idx ({users.shape[0]}) and train_item_idx ({items.shape[0]}) differ in length")
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1; got {n_items}")
    if items.size and (items.min() < 0 or items.max() >= n_items):
        raise ValueError(f"train_item_idx holds indices outside [0, n_items={n_items})")
    if n_users is None:
        n_users = int(users.max()) + 1 if users.size else 0
    if users.size and (users.min() < 0 or users.max() >= n_users):
        raise ValueError(f"train_user_idx holds indices outside [0, n_users={n_users})")
    return users, items, int(n_items), int(n_users)


class Baseline:
    """Common interface; subclasses set `name` and implement fit/score."""

    name = "baseline"

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config: dict) -> "Baseline":
        return cls(**config)

    def fit(self, train_user_idx, train_item_idx, n_items: int, n_users: int | None = None) -> "Baseline":
        raise NotImplementedError

    def score(self, user_slice: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fit_grid(self, param: str, values, *fit_args, **fit_kwargs) -> dict:
        """{value: a copy of this baseline with `param` = value, fitted}: one fit per value."""
        config = self.get_config()
        if param not in config:
            raise ValueError(f"{type(self).__name__} has no hyper-parameter {param!r} (has {sorted(config)})")
        return {v: type(self)(**{**config, param: v}).fit(*fit_args, **fit_kwargs) for v in values}

    def _check_fitted(self, attr: str) -> None:
        if getattr(self, attr, None) is None:
            raise RuntimeError(f"{type(self).__name__}.score called before fit()")


class PopularityBaseline(Baseline):
    """Scores every item by its number of training interactions.

    Every user gets the same ranking; ties (equal counts) are ranked
    pessimistically by `rank_targets`, so unseen items do not profit from
    sharing a count of zero.
    """

    name = "popularity"

    def __init__(self):
        self.item_counts_ = None

    def fit(self, train_user_idx, train_item_idx, n_items, n_users=None):
        _, items, n_items, _ = check_pairs(train_user_idx, train_item_idx, n_items, n_users)
        self.item_counts_ = np.bincount(items, minlength=n_items).astype(np.float32)  # [N]
        return self

    def score(self, user_slice):
        """[b] user indices -> [b, N] counts (the same row for every user)."""
        self._check_fitted("item_counts_")
        b = np.asarray(user_slice).shape[0]
        return np.repeat(self.item_counts_[None, :], b, axis=0)


class EASEBaseline(Baseline):
    """EASE^R (Steck 2019, "Embarrassingly Shallow Autoencoders").

    With X [U, M] the binary user-item matrix: G = XᵀX + l2·I, P = G⁻¹,
    B = -P / diag(P) (column j divided by P_jj), diag(B) = 0, and
    score(u) = X_u B.

    G and P are dense [M, M]; to keep that in memory, catalogs larger than
    `max_items` are restricted to the `max_items` most popular items (ties by
    lower index) and every other item scores -inf (never recommended, ranked
    last). The inversion runs in float64 up to `float64_max_items` items
    (accurate) and in float32 above it (half the memory of an already large
    matrix; EASE's heavy l2 keeps G well conditioned). B is kept as float32.
    """

    name = "ease"

    def __init__(self, l2: float = 500.0, max_items: int = 20000, float64_max_items: int = 8000):
        if l2 <= 0:
            raise ValueError(f"l2 must be > 0 (it makes XᵀX invertible); got {l2}")
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1; got {max_items}")
        self.l2 = float(l2)
        self.max_items = int(max_items)
        self.float64_max_items = int(float64_max_items)
        self.B_ = None  # [M, M] float32
        self.kept_items_ = None  # [M] int64, catalog index of each column of B
        self.X_ = None  # [U, M] csr float32, users' training rows (kept items)
        self.n_items_ = None

    def get_config(self):
        return {"l2": self.l2, "max_items": self.max_items, "float64_max_items": self.float64_max_items}

    def fit(self, train_user_idx, train_item_idx, n_items, n_users=None):
        users, items, n_items, n_users = check_pairs(train_user_idx, train_item_idx, n_items, n_users)
        counts = np.bincount(items, minlength=n_items)
        if n_items > self.max_items:
            order = np.lexsort((np.arange(n_items), -counts))
            kept = np.sort(order[: self.max_items])
            logger.warning(
                "EASE: catalog of %d items restricted to the %d most popular (%.1f%% of training interactions); "
                "the other items score -inf",
                n_items,
                self.max_items,
                100.0 * counts[kept].sum() / max(counts.sum(), 1),
            )
        else:
            kept = np.arange(n_items)
        col = np.full(n_items, -1, np.int64)
        col[kept] = np.arange(kept.size)
        keep_pair = col[items] >= 0
        X = sp.csr_matrix(
            (np.ones(int(keep_pair.sum()), np.float32), (users[keep_pair], col[items[keep_pair]])),
            shape=(n_users, kept.size),
        )
        X.sum_duplicates()
        X.data[:] = 1.0  # binary: repeated interactions count once
        m = kept.size
        dtype = np.float64 if m <= self.float64_max_items else np.float32
        G = (X.T @ X).toarray().astype(dtype)  # [M, M]
        G[np.diag_indices(m)] += self.l2
        P = scipy.linalg.inv(G, overwrite_a=True, check_finite=False)
        del G
        # In place on P (at 20000 items every [M, M] copy costs 1.6-3.2 GB).
        P /= -np.diag(P).copy()[None, :]  # B = -P / diag(P), column-wise
        P[np.diag_indices(m)] = 0.0
        self.B_ = P.astype(np.float32, copy=False)
        self.kept_items_ = kept
        self.X_ = X
        self.n_items_ = n_items
        return self

    def score(self, user_slice):
        """[b] user indices -> [b, N] X_u B; users unseen in training score 0."""
        self._check_fitted("B_")
        user_slice = np.asarray(user_slice, np.int64)
        inside = user_slice < self.X_.shape[0]
        rows = self.X_[np.where(inside, user_slice, 0)]
        dense = np.asarray(rows @ self.B_, np.float32)  # [b, M]
        dense[~inside] = 0.0
        if self.kept_items_.size == self.n_items_:
            return dense
        out = np.full((user_slice.shape[0], self.n_items_), -np.inf, np.float32)
        out[:, self.kept_items_] = dense
        return out


class IdTwoTowerBaseline(Baseline):
    """The TFRS retrieval tutorial model on ids only.

    User tower: Embedding(n_users, embedding_dim); item tower:
    Embedding(n_items, embedding_dim); loss: tfrs.tasks.Retrieval (in-batch
    softmax) on (user, item) training pairs; Adagrad as in the tutorial.
    Plain tf-keras + tfrs.Model is fine here because no Keras 3 layer is
    involved (see ARCHITECTURE.md). Training is deterministic given `seed`
    (tf.keras.utils.set_random_seed seeds Python, numpy and TF; the shuffle
    has its own seed). score = dot product of the learned embeddings.
    """

    name = "id_two_tower"

    def __init__(
        self,
        embedding_dim: int = 64,
        epochs: int = 3,
        batch_size: int = 4096,
        learning_rate: float = 0.1,
        seed: int = 0,
        verbose: int = 0,
    ):
        self.embedding_dim = int(embedding_dim)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.learning_rate = float(learning_rate)
        self.seed = int(seed)
        self.verbose = int(verbose)
        self.user_embeddings_ = None  # [U, d] float32
        self.item_embeddings_ = None  # [N, d] float32
        self.history_ = None

    def get_config(self):
        return {
            "embedding_dim": self.embedding_dim,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "seed": self.seed,
            "verbose": self.verbose,
        }

    def fit(self, train_user_idx, train_item_idx, n_items, n_users=None):
        users, items, n_items, n_users = check_pairs(train_user_idx, train_item_idx, n_items, n_users)
        if users.size == 0:
            raise ValueError("IdTwoTowerBaseline.fit needs at least one (user, item) training pair")
        import tensorflow as tf
        import tensorflow_recommenders as tfrs

        import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before tensorflow)

        tf.keras.utils.set_random_seed(self.seed)
        dim = self.embedding_dim

        class _Model(tfrs.Model):
            def __init__(self):
                super().__init__()
                self.user_tower = tf.keras.layers.Embedding(n_users, dim, name="user_embedding")
                self.item_tower = tf.keras.layers.Embedding(n_items, dim, name="item_embedding")
                self.task = tfrs.tasks.Retrieval()

            def compute_loss(self, features, training=False):
                u = self.user_tower(features["user"])  # [batch, dim]
                i = self.item_tower(features["item"])  # [batch, dim]
                # No top-K metrics during training: they would score the whole
                # catalog every step; evaluation does that once, in numpy.
                return self.task(u, i, compute_metrics=False)

        model = _Model()
        model.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate=self.learning_rate))
        ds = (
            tf.data.Dataset.from_tensor_slices({"user": users, "item": items})
            .shuffle(users.size, seed=self.seed, reshuffle_each_iteration=True)
            .batch(self.batch_size)
        )
        snapshots = {}
        keep = set(int(e) for e in getattr(self, "_snapshot_epochs", ()))

        class _Snapshot(tf.keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch + 1 in keep:
                    snapshots[epoch + 1] = (model.user_tower.embeddings.numpy().astype(np.float32),
                                            model.item_tower.embeddings.numpy().astype(np.float32))

        hist = model.fit(ds, epochs=self.epochs, verbose=self.verbose, callbacks=[_Snapshot()] if keep else [])
        self.history_ = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
        self.user_embeddings_ = model.user_tower.embeddings.numpy().astype(np.float32)
        self.item_embeddings_ = model.item_tower.embeddings.numpy().astype(np.float32)
        self.snapshots_ = snapshots
        return self

    def fit_grid(self, param, values, *fit_args, **fit_kwargs):
        """For "epochs": one training run of max(values) epochs, the embeddings
        snapshotted after each epoch in `values` - the same models as one fit
        per value (the seeded shuffle gives every epoch the same order), at
        the cost of the longest. Other params: one fit per value."""
        if param != "epochs":
            return super().fit_grid(param, values, *fit_args, **fit_kwargs)
        values = sorted({int(v) for v in values})
        if not values or values[0] < 1:
            raise ValueError(f"epochs grid must hold positive integers, got {values}")
        longest = IdTwoTowerBaseline(**{**self.get_config(), "epochs": values[-1]})
        longest._snapshot_epochs = tuple(values)
        longest.fit(*fit_args, **fit_kwargs)
        out = {}
        for e in values:
            m = IdTwoTowerBaseline(**{**self.get_config(), "epochs": e})
            m.user_embeddings_, m.item_embeddings_ = longest.snapshots_[e]
            m.history_ = {k: v[:e] for k, v in longest.history_.items()}
            out[e] = m
        return out

    def score(self, user_slice):
        """[b] user indices -> [b, N] dot products; users unseen in training score 0."""
        self._check_fitted("user_embeddings_")
        user_slice = np.asarray(user_slice, np.int64)
        inside = user_slice < self.user_embeddings_.shape[0]
        u = self.user_embeddings_[np.where(inside, user_slice, 0)]
        u[~inside] = 0.0
        return u @ self.item_embeddings_.T


BASELINES = {cls.name: cls for cls in (PopularityBaseline, EASEBaseline, IdTwoTowerBaseline)}


def make_baseline(name: str, **config) -> Baseline:
    """Builds a baseline by its `name` ("popularity", "ease", "id_two_tower")."""
    try:
        cls = BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}") from None
    return cls(**config)
