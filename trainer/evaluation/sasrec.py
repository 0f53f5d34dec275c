"""SASRec (Kang & McAuley 2018, "Self-Attentive Sequential Recommendation").

The strong, common sequential baseline: a user is the ordered sequence of the
items they consumed, and the next item is predicted from the last `max_len`
of them by a small causal Transformer. It answers a question the
order-free baselines in `trainer.evaluation.baselines` cannot: how much of the signal is
"what comes next" rather than "what this user likes".

Model, on a left-padded item sequence [batch, len] (internal id = item + 1,
0 = padding):

  x = item_emb[seq] * sqrt(d) + pos_emb[0..len)     [batch, len, d]
  num_blocks x (pre-LN):  x += Drop(CausalAttn(LN(x)));  x += Drop(FFN(LN(x)))
  h = LN(x)                                           [batch, len, d]
  logits = h @ item_emb[1:]ᵀ                          [batch, len, n_items]

The item table is tied between input and output. Attention is causal and
never attends to padding keys, so position t sees only items <= t. Training
uses every position of every training sequence: each user's sequence is cut
(from its end) into windows of `max_len` next-item steps, and the loss is the
full-catalog softmax cross-entropy at every non-padding position (one matmul
against the item table; the catalogs here are small). Adam, plain TensorFlow
(tf.Variable + tf.function, no tf.keras, whose meaning depends on
TF_USE_LEGACY_KERAS); TensorFlow is imported only when the model is fitted.

Epochs are chosen on validation (see `fit`), never on test.
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np

from trainer.evaluation import ranking as metrics
from trainer.evaluation.baselines import Baseline, check_pairs

logger = logging.getLogger(__name__)

SELECT_METRICS = ("ndcg@10", "recall@10")


def _ordered_sequences(users, items, n_users, timestamps=None) -> list:
    """Pairs -> per-user item arrays, ordered by (timestamp, given order); stable."""
    if timestamps is None:
        order = np.lexsort((np.arange(users.size), users))
    else:
        order = np.lexsort((np.arange(users.size), timestamps, users))
    bounds = np.searchsorted(users[order], np.arange(n_users + 1))
    ordered = items[order]
    return [ordered[bounds[u] : bounds[u + 1]] for u in range(n_users)]


def _check_timestamps(timestamps, n: int, what: str):
    if timestamps is None:
        return None
    ts = np.asarray(timestamps).reshape(-1)
    if ts.shape[0] != n:
        raise ValueError(f"timestamps has {ts.shape[0]} entries; {what} has {n}")
    if not np.issubdtype(ts.dtype, np.number):
        raise ValueError(f"timestamps must be numeric; got dtype {ts.dtype}")
    return ts


class SASRecBaseline(Baseline):
    """SASRec next-item model; see the module docstring for the architecture.

    fit(train_user_idx [P], train_item_idx [P], n_items, n_users=None, *,
        timestamps=None [P], valid_user_idx=None [V], valid_item_idx=None [V])
    score(user_slice [b]) -> [b, n_items] float32: the scores of the next item
        after the user's current history (fit sets it to the training
        sequence; its last `max_len` items are used).
    set_history(user_idx, item_idx, timestamps=None): replaces every user's
        history, e.g. with train + validation pairs before scoring test, so
        the test query sees all training-period events. Weights are kept.

    Users with an empty history or an index >= n_users score 0 everywhere.
    After fit, `selection_` records how the epoch was chosen:
      {"split": "validation" | None, "metric", "best_epoch", "best_value",
       "epochs_run", "curve": [{"epoch", "loss", metric}, ...]}.
    """

    name = "sasrec"

    def __init__(
        self,
        embedding_dim: int = 64,
        num_blocks: int = 2,
        num_heads: int = 1,
        max_len: int = 50,
        dropout: float = 0.2,
        learning_rate: float = 1e-3,
        batch_size: int = 128,
        max_epochs: int = 200,
        eval_every: int = 5,
        patience: int = 5,
        select_metric: str = "ndcg@10",
        seed: int = 0,
    ):
        if embedding_dim < 1 or num_heads < 1 or embedding_dim % num_heads:
            raise ValueError(f"embedding_dim ({embedding_dim}) must be a positive multiple of num_heads ({num_heads})")
        for arg, value in (("num_blocks", num_blocks), ("max_len", max_len), ("batch_size", batch_size),
                           ("max_epochs", max_epochs), ("eval_every", eval_every), ("patience", patience)):
            if value < 1:
                raise ValueError(f"{arg} must be >= 1; got {value}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0; got {learning_rate}")
        if select_metric not in SELECT_METRICS:
            raise ValueError(f"select_metric must be one of {SELECT_METRICS}; got {select_metric!r}")
        self.embedding_dim, self.num_blocks, self.num_heads = int(embedding_dim), int(num_blocks), int(num_heads)
        self.max_len, self.dropout, self.learning_rate = int(max_len), float(dropout), float(learning_rate)
        self.batch_size, self.max_epochs = int(batch_size), int(max_epochs)
        self.eval_every, self.patience = int(eval_every), int(patience)
        self.select_metric, self.seed = select_metric, int(seed)
        self.weights_ = None  # name -> np.ndarray, the selected weights
        self.history_ = None  # [U, max_len] int32, left-padded internal ids (item + 1)
        self.n_items_ = None
        self.selection_ = None

    def get_config(self):
        return {k: getattr(self, k) for k in (
            "embedding_dim", "num_blocks", "num_heads", "max_len", "dropout", "learning_rate", "batch_size",
            "max_epochs", "eval_every", "patience", "select_metric", "seed")}

    # ----------------------------------------------------------------- model
    def _init_weights(self, n_items: int) -> dict:
        """Glorot-uniform matrices, N(0, 1/d) embeddings, LN = identity; seeded by numpy."""
        rng = np.random.default_rng(self.seed)
        d = self.embedding_dim

        def glorot(n_in, n_out):
            lim = math.sqrt(6.0 / (n_in + n_out))
            return rng.uniform(-lim, lim, (n_in, n_out)).astype(np.float32)

        w = {"item_emb": rng.normal(0.0, d**-0.5, (n_items + 1, d)).astype(np.float32),
             "pos_emb": rng.normal(0.0, d**-0.5, (self.max_len, d)).astype(np.float32)}
        w["item_emb"][0] = 0.0  # padding
        for b in range(self.num_blocks):
            for m in ("wq", "wk", "wv", "wo", "w1", "w2"):
                w[f"b{b}_{m}"] = glorot(d, d)
            for v in ("b1", "b2", "ln1_b", "ln2_b"):
                w[f"b{b}_{v}"] = np.zeros(d, np.float32)
            w[f"b{b}_ln1_g"] = np.ones(d, np.float32)
            w[f"b{b}_ln2_g"] = np.ones(d, np.float32)
        w["ln_g"], w["ln_b"] = np.ones(d, np.float32), np.zeros(d, np.float32)
        return w

    def _build(self, weights: dict):
        """tf.Variables and compiled functions for the given numpy weights."""
        import tensorflow as tf  # after trainer._env (imported with trainer.evaluation.ranking above)

        v = {k: tf.Variable(a, name=k) for k, a in weights.items()}
        d, h, n_blocks, rate = self.embedding_dim, self.num_heads, self.num_blocks, self.dropout
        gen = tf.random.Generator.from_seed(self.seed)

        def drop(x, training):
            if not training or rate == 0.0:
                return x
            keep = tf.cast(gen.uniform(tf.shape(x)) >= rate, x.dtype)
            return x * keep / (1.0 - rate)

        def ln(x, g, b):
            mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
            return (x - mean) * tf.math.rsqrt(var + 1e-8) * g + b

        def heads(x):  # [B, T, d] -> [B, h, T, d/h]
            s = tf.shape(x)
            return tf.transpose(tf.reshape(x, [s[0], s[1], h, d // h]), [0, 2, 1, 3])

        def encode(seq, training):
            """seq [B, T] int32 internal ids -> [B, T, d] hidden states."""
            T = tf.shape(seq)[1]
            valid = tf.cast(seq > 0, tf.float32)[..., None]  # [B, T, 1]
            x = tf.gather(v["item_emb"], seq) * math.sqrt(d) + v["pos_emb"][None, :T]
            x = drop(x, training) * valid
            causal = tf.linalg.band_part(tf.ones([T, T], tf.bool), -1, 0)  # [T(query), T(key)]
            # Never attend to padding keys; a padding query may attend to itself (no empty softmax).
            allowed = causal[None] & ((seq > 0)[:, None, :] | tf.eye(T, dtype=tf.bool)[None])  # [B, T, T]
            bias = tf.where(allowed, 0.0, -1e9)[:, None]  # [B, 1, T, T]
            for b in range(n_blocks):
                p = {name[len(f"b{b}_"):]: x_ for name, x_ in v.items() if name.startswith(f"b{b}_")}
                y = ln(x, p["ln1_g"], p["ln1_b"])
                q, k, val = heads(y @ p["wq"]), heads(y @ p["wk"]), heads(y @ p["wv"])
                att = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) / math.sqrt(d // h) + bias)  # [B, h, T, T]
                o = tf.transpose(tf.matmul(drop(att, training), val), [0, 2, 1, 3])  # [B, T, h, d/h]
                x = x + drop(tf.reshape(o, tf.shape(x)) @ p["wo"], training)
                y = ln(x, p["ln2_g"], p["ln2_b"])
                y = drop(tf.nn.relu(y @ p["w1"] + p["b1"]), training) @ p["w2"] + p["b2"]
                x = (x + drop(y, training)) * valid
            return ln(x, v["ln_g"], v["ln_b"])

        opt_m = {k: tf.Variable(tf.zeros_like(x)) for k, x in v.items()}
        opt_v = {k: tf.Variable(tf.zeros_like(x)) for k, x in v.items()}
        step = tf.Variable(0.0)
        lr, beta1, beta2, eps = self.learning_rate, 0.9, 0.98, 1e-9  # Adam as in the reference code
        spec = tf.TensorSpec([None, self.max_len], tf.int32)

        @tf.function(input_signature=[spec, spec])
        def train_step(seq, target):
            """seq, target [B, T]: target[:, t] is the item after seq[:, t] (0 = no loss)."""
            with tf.GradientTape() as tape:
                hid = encode(seq, True)  # [B, T, d]
                logits = tf.matmul(tf.reshape(hid, [-1, d]), v["item_emb"][1:], transpose_b=True)  # [B*T, N]
                tgt = tf.reshape(target, [-1])
                mask = tf.cast(tgt > 0, tf.float32)
                ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.maximum(tgt - 1, 0), logits=logits)
                loss = tf.reduce_sum(ce * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
            grads = tape.gradient(loss, v)
            step.assign_add(1.0)
            corr = tf.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
            for k, var in v.items():
                g = tf.convert_to_tensor(grads[k])
                opt_m[k].assign(beta1 * opt_m[k] + (1 - beta1) * g)
                opt_v[k].assign(beta2 * opt_v[k] + (1 - beta2) * tf.square(g))
                var.assign_sub(lr * corr * opt_m[k] / (tf.sqrt(opt_v[k]) + eps))
            return loss

        @tf.function(input_signature=[spec])
        def hidden(seq):
            """seq [B, T] -> [B, T, d], inference mode (for tests and scoring)."""
            return encode(seq, False)

        return v, train_step, hidden

    # ------------------------------------------------------------------ data
    def _windows(self, seqs: list) -> tuple[np.ndarray, np.ndarray]:
        """Training windows covering every next-item step of every sequence.

        A sequence s of length L has L-1 steps (s[t] -> s[t+1]); they are cut
        from the end into chunks of max_len, left-padded. Returns inputs and
        targets, both [W, max_len] int32 internal ids.
        """
        T = self.max_len
        inputs, targets = [], []
        for s in seqs:
            s = s.astype(np.int32) + 1
            end = s.size  # steps end..: inputs s[a:end-1], targets s[a+1:end]
            while end >= 2:
                a = max(0, end - 1 - T)
                row_in, row_tg = np.zeros(T, np.int32), np.zeros(T, np.int32)
                row_in[T - (end - 1 - a):] = s[a : end - 1]
                row_tg[T - (end - 1 - a):] = s[a + 1 : end]
                inputs.append(row_in)
                targets.append(row_tg)
                end = a + 1
        if not inputs:
            raise ValueError("SASRec needs at least one user with two or more training items")
        return np.stack(inputs), np.stack(targets)

    def _history_matrix(self, seqs: list) -> np.ndarray:
        """Per-user sequences -> [U, max_len] int32, the last max_len items left-padded."""
        out = np.zeros((len(seqs), self.max_len), np.int32)
        for u, s in enumerate(seqs):
            tail = s[-self.max_len :].astype(np.int32) + 1
            if tail.size:
                out[u, self.max_len - tail.size :] = tail
        return out

    # ------------------------------------------------------------------- API
    def fit(self, train_user_idx, train_item_idx, n_items, n_users=None, *,
            timestamps=None, valid_user_idx=None, valid_item_idx=None):
        """Trains on ordered training sequences; selects the epoch on validation.

        Args:
          train_user_idx, train_item_idx: [P] training pairs; each user's
            pairs are ordered by `timestamps` [P] (stable: equal timestamps
            keep the given order), or by the given order when None.
          valid_user_idx, valid_item_idx: [V] validation pairs (one held-out
            next item per query). Every `eval_every` epochs, validation
            `select_metric` is computed over the full catalog with the user's
            training items excluded (pessimistic ties); the best weights are
            kept, training stops after `patience` evaluations without
            improvement or at `max_epochs`. Without them: `max_epochs` epochs.
        """
        users, items, n_items, n_users = check_pairs(train_user_idx, train_item_idx, n_items, n_users)
        ts = _check_timestamps(timestamps, users.size, "train_user_idx")
        if (valid_user_idx is None) != (valid_item_idx is None):
            raise ValueError("pass both valid_user_idx and valid_item_idx, or neither")
        has_valid = valid_user_idx is not None and np.asarray(valid_user_idx).size > 0
        if has_valid:
            vu, vi, _, _ = check_pairs(valid_user_idx, valid_item_idx, n_items, n_users)
        seqs = _ordered_sequences(users, items, n_users, ts)
        inputs, targets = self._windows(seqs)
        self.n_items_ = n_items
        self.history_ = self._history_matrix(seqs)
        v, train_step, hidden = self._build(self._init_weights(n_items))
        self._hidden = hidden
        self._vars = v
        rng = np.random.default_rng(self.seed)
        if has_valid:
            exclude = [seqs[u] for u in vu]
        curve, best, best_epoch, best_w, bad = [], -np.inf, 0, None, 0
        epoch = 0
        for epoch in range(1, self.max_epochs + 1):
            perm = rng.permutation(inputs.shape[0])
            losses = [float(train_step(inputs[i], targets[i]))
                      for i in np.array_split(perm, max(1, math.ceil(perm.size / self.batch_size)))]
            if not has_valid or (epoch % self.eval_every and epoch != self.max_epochs):
                continue
            self.weights_ = {k: x.numpy() for k, x in v.items()}
            value = metrics.summarize(metrics.rank_targets(lambda q: self.score(vu[q]), vu.size, vi, exclude),
                                      ks=(10,))[self.select_metric]
            curve.append({"epoch": epoch, "loss": float(np.mean(losses)), self.select_metric: value})
            logger.info("sasrec epoch %d: loss %.4f, validation %s %.4f", epoch, np.mean(losses),
                        self.select_metric, value)
            if value > best:
                best, best_epoch, best_w, bad = value, epoch, self.weights_, 0
            else:
                bad += 1
                if bad >= self.patience:
                    break
        if has_valid:
            self.weights_ = best_w
            for k, x in v.items():
                x.assign(best_w[k])
        else:
            self.weights_ = {k: x.numpy() for k, x in v.items()}
            best_epoch, best = epoch, None
            logger.info("sasrec: no validation pairs; trained %d epochs, loss %.4f", epoch, np.mean(losses))
        self.selection_ = {"split": "validation" if has_valid else None, "metric": self.select_metric,
                           "best_epoch": best_epoch, "best_value": best, "epochs_run": epoch, "curve": curve}
        return self

    def set_history(self, user_idx, item_idx, timestamps=None, n_users=None) -> SASRecBaseline:
        """Replaces every user's scoring history with these (user, item) pairs.

        Ordered like `fit` (by `timestamps` [P], stable). Use it before
        scoring test with train + validation pairs, so the model predicts the
        item after the validation item. Users without pairs get an empty
        history (they score 0). Returns self.
        """
        self._check_fitted("weights_")
        n_users = max(self.history_.shape[0], int(np.max(user_idx, initial=-1)) + 1) if n_users is None else n_users
        users, items, _, n_users = check_pairs(user_idx, item_idx, self.n_items_, n_users)
        ts = _check_timestamps(timestamps, users.size, "user_idx")
        self.history_ = self._history_matrix(_ordered_sequences(users, items, n_users, ts))
        return self

    def hidden_states(self, seq: np.ndarray) -> np.ndarray:
        """seq [B, max_len] left-padded item indices (-1 = padding) -> [B, max_len, d] (inference)."""
        self._check_fitted("weights_")
        seq = np.asarray(seq, np.int64)
        if seq.ndim != 2 or seq.shape[1] != self.max_len:
            raise ValueError(f"seq must have shape [batch, {self.max_len}]; got {seq.shape}")
        if seq.size and (seq.min() < -1 or seq.max() >= self.n_items_):
            raise ValueError(f"seq holds indices outside [-1, n_items={self.n_items_})")
        return self._encoder()(np.asarray(seq + 1, np.int32)).numpy()

    def _encoder(self):
        if getattr(self, "_hidden", None) is None:  # e.g. after copy/unpickle: rebuild from weights_
            self._vars, _, self._hidden = self._build(self.weights_)
        return self._hidden

    def score(self, user_slice):
        """[b] user indices -> [b, n_items] float32 next-item scores (see class docstring)."""
        self._check_fitted("weights_")
        user_slice = np.asarray(user_slice, np.int64).reshape(-1)
        if user_slice.size and user_slice.min() < 0:
            raise ValueError("user_slice holds negative user indices")
        inside = user_slice < self.history_.shape[0]
        seq = self.history_[np.where(inside, user_slice, 0)]
        seq[~inside] = 0
        last = self._encoder()(seq).numpy()[:, -1]  # [b, d]
        out = last @ self.weights_["item_emb"][1:].T  # [b, N]
        out[seq[:, -1] == 0] = 0.0  # empty history (or unknown user)
        return out.astype(np.float32, copy=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_hidden", None)
        state.pop("_vars", None)
        return state

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        new.__dict__.update(copy.deepcopy(self.__getstate__(), memo))
        return new
