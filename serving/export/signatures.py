"""The exported tf.Module: a trained SegRecModel, an item index, and the
serving signatures over explicit TensorSpecs.

Signatures (names from trainer.features):

  serving_default      user_text [B] string, history_item_ids [B, H] string
                       ("" padded), k [B] int32, beta [B] float32
                       -> item_ids [B, max(k)] string, scores [B, max(k)] float32,
                          segment_id [B] int32, segment_probs [B, K] float32
  recommend_defaults   user_text, history_item_ids -> as serving_default, with
                       the export's default k and beta baked in
  serving_tf_example   examples [B] serialized tf.Example (user_text,
                       history_item_ids) -> as recommend_defaults
  user_embedding       user_text, history_item_ids -> embedding [B, d],
                       segment_id [B], segment_probs [B, K]
  serving_exclude      serving_default's inputs + exclude_item_ids [B, E] string
                       ("" padded; E >= 0) -> as serving_default, with every
                       item in the row's history OR its exclude_item_ids
                       removed (a user's whole consumed set, which can be far
                       longer than the <= 50 history items the model reads;
                       the exclusions do not change the query)

(plus user_id [B] string on every signature when the model hashes user ids.)

Text exports split serving_default in two as well, for the text-vector cache
of `segrec serve` and batch scoring (serving/server/text_cache.py), which
encode each distinct user_text once:

  encode_text          user_text [B] -> user_text_vector [B, D] float32, the
                       pooled encoder output (SegRecModel.text_vectors)
  serving_text_vector  user_text_vector [B, D], history_item_ids, k, beta,
                       exclude_item_ids [B, E] -> as serving_exclude (E = 0:
                       as serving_default)

serving_text_vector(encode_text(t)) answers as serving_default(t); the export
checks it on its warm-up users (`check_text_vector_path`).

Token-id exports (text_input="token_ids") take input_ids [B, T] int32 and
padding_mask [B, T] int32 (1 = token) in place of user_text, tokenised by
the client with the export's vocabulary (trainer/model/token_ids.py), so the
graph holds no text ops; they have no serving_tf_example (its examples carry
text).

Every input has the batch dimension, k and beta included (one knob per row),
so TF Serving's server-side batching, which concatenates the inputs of
concurrent requests along dim 0, can batch serving_default: stock TF Serving
batches a brute-force export as is (history_item_ids must then have one
width across the batch, see k8s/base/config/batching_parameters.txt).

k and beta: a TF Serving signature has no optional inputs (a PredictRequest
must carry exactly the signature's inputs), so "optional" is two signatures:
serving_default takes both knobs (the client fills its defaults), and
recommend_defaults / serving_tf_example use the defaults the export recorded
(k = ExportConfig.default_k, beta = the run's beta unless overridden; both in
the model card). A k outside [1, k_max] or a non-finite beta fails with
INVALID_ARGUMENT naming the input, and so does a k or beta whose length is
not user_text's.

Retrieval, row by row: q_i = normalise(u_i + beta_i * c_seg_i) (cold users:
their centroid), exactly as SegRecModel computes it; the index returns
min(max(k) + H, N) candidates, items in the row's history are dropped, the
best are kept (serving_exclude: min(max(k) + H + E, N) candidates, items in
the row's history or exclude_item_ids dropped). Row i holds its best k_i items in columns 0..k_i-1; the
columns after k_i, and slots that cannot be filled (k_i greater than the
catalog minus the history), hold item id "" and score -inf.
"""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from trainer import features
from trainer.contracts import (  # noqa: F401  (the signature names live in trainer/contracts.py)
    RECOMMEND_DEFAULTS,
    SERVING_DEFAULT,
    SERVING_EXCLUDE,
    SERVING_TF_EXAMPLE,
    SIGNATURES,
    TEXT_VECTOR_SIGNATURES,
    TOKEN_ID_SIGNATURES,
    USER_EMBEDDING,
)

TEXT, TOKEN_IDS = "text", "token_ids"
TEXT_INPUTS = (TEXT, TOKEN_IDS)

RECOMMEND_OUTPUTS = (features.OUT_ITEM_IDS, features.OUT_SCORES, features.SEGMENT_ID, features.SEGMENT_PROBS)
EMBEDDING_OUTPUTS = (features.EMBEDDING, features.SEGMENT_ID, features.SEGMENT_PROBS)


def user_specs(with_user_id: bool, text_input: str = TEXT) -> dict:
    """TensorSpecs of the user inputs every signature but serving_tf_example takes."""
    if text_input == TOKEN_IDS:
        specs = {name: tf.TensorSpec([None, None], tf.int32, name=name)
                 for name in (features.INPUT_IDS, features.PADDING_MASK)}
    else:
        specs = {features.USER_TEXT: tf.TensorSpec([None], tf.string, name=features.USER_TEXT)}
    specs[features.HISTORY_ITEM_IDS] = tf.TensorSpec([None, None], tf.string, name=features.HISTORY_ITEM_IDS)
    if with_user_id:
        specs[features.USER_ID] = tf.TensorSpec([None], tf.string, name=features.USER_ID)
    return specs


def text_vector_specs(with_user_id: bool, text_dim: int) -> dict:
    """TensorSpecs of serving_text_vector's user inputs: user_text_vector [B, D] in place of user_text."""
    specs = user_specs(with_user_id)
    del specs[features.USER_TEXT]
    return {features.USER_TEXT_VECTOR: tf.TensorSpec([None, text_dim], tf.float32, name=features.USER_TEXT_VECTOR),
            **specs}


def exclude_specs() -> dict:
    """serving_exclude's extra input: the items a row must never get back."""
    return {features.EXCLUDE_ITEM_IDS: tf.TensorSpec([None, None], tf.string, name=features.EXCLUDE_ITEM_IDS)}


def knob_specs() -> dict:
    return {
        features.K: tf.TensorSpec([None], tf.int32, name=features.K),
        features.BETA: tf.TensorSpec([None], tf.float32, name=features.BETA),
    }


class ServingModule(tf.Module):
    """SegRecModel + index -> the signatures above.

    Args:
      model: a trained trainer.model.segrec_model.SegRecModel with a text_encoder (serving
        tokenises and encodes user_text in the graph).
      index: serving.export.index.BruteForceIndex or ScannIndex over
        model.item_embeddings(), rows in model.item_ids order.
      k_max: the largest k a request may ask for.
      default_k, default_beta: the knobs of recommend_defaults and
        serving_tf_example.
      text_input: "text" (user_text, tokenised in the graph) or "token_ids"
        (input_ids + padding_mask, tokenised by the client).
    """

    def __init__(self, model, index, k_max: int = 100, default_k: int = 10, default_beta: float = 0.0,
                 text_input: str = TEXT):
        super().__init__(name="segrec_serving")
        if model.text_encoder is None:
            raise ValueError("the model has no text encoder; serving needs one to encode user_text")
        if text_input not in TEXT_INPUTS:
            raise ValueError(f"text_input must be one of {TEXT_INPUTS}, got {text_input!r}")
        if not 1 <= default_k <= k_max:
            raise ValueError(f"default_k must be in [1, k_max={k_max}], got {default_k}")
        self.model = model
        self.index = index
        self.k_max = int(k_max)
        self.default_k = int(default_k)
        self.default_beta = float(default_beta)
        self.num_items = len(model.item_ids)
        self.with_user_id = model.user_id_buckets > 0
        self.text_input = text_input
        self.user_keys = (features.INPUT_IDS, features.PADDING_MASK) if text_input == TOKEN_IDS else (features.USER_TEXT,)
        self.item_id_table = tf.Variable(
            np.array(model.item_ids, dtype=object), dtype=tf.string, trainable=False, name="item_ids"
        )
        users = user_specs(self.with_user_id, text_input)
        self.serving_default = tf.function(self._serving_default, input_signature=[{**users, **knob_specs()}])
        self.recommend_defaults = tf.function(self._recommend_defaults, input_signature=[users])
        if text_input == TEXT:
            self.serving_tf_example = tf.function(
                self._serving_tf_example,
                input_signature=[tf.TensorSpec([None], tf.string, name=features.EXAMPLES)],
            )
        self.user_embedding = tf.function(self._user_embedding, input_signature=[users])
        self.serving_exclude = tf.function(self._serving_exclude,
                                           input_signature=[{**users, **knob_specs(), **exclude_specs()}])
        if text_input == TEXT:
            self._add_text_vector_signatures()

    def signatures(self) -> dict:
        names = TOKEN_ID_SIGNATURES if self.text_input == TOKEN_IDS else SIGNATURES
        out = {name: getattr(self, name) for name in names}
        out.update(self.text_vector_signatures())
        return out

    def _add_text_vector_signatures(self) -> None:
        text = {features.USER_TEXT: tf.TensorSpec([None], tf.string, name=features.USER_TEXT)}
        self.encode_text = tf.function(self._encode_text, input_signature=[text])
        vectors = text_vector_specs(self.with_user_id, self.model.text_input_dim)
        self.serving_text_vector = tf.function(self._serving_text_vector,
                                               input_signature=[{**vectors, **knob_specs(), **exclude_specs()}])

    def text_vector_signatures(self) -> dict:
        """encode_text and serving_text_vector (text exports; none for token-id exports)."""
        return {name: getattr(self, name) for name in TEXT_VECTOR_SIGNATURES if hasattr(self, name)}

    # --- graph pieces -----------------------------------------------------------
    def _batch(self, inputs: dict, user_keys: tuple = ()) -> dict:
        keys = ((user_keys or self.user_keys) + (features.HISTORY_ITEM_IDS,)
                + ((features.USER_ID,) if self.with_user_id else ()))
        return {key: inputs[key] for key in keys}

    def recommend(self, inputs: dict, k, beta, exclude=None, user_keys: tuple = ()) -> dict:
        """User inputs, k and beta ([B] each, or scalars for every row) -> RECOMMEND_OUTPUTS.

        exclude: None, or item ids [B, E] ("" padded) removed from the row's
        results besides its history (serving_exclude).
        user_keys: the inputs that stand for the user's text (default: the export's own)."""
        user_keys = user_keys or self.user_keys
        batch = self._batch(inputs, user_keys)
        rows = tf.shape(batch[user_keys[0]])[0]
        k = self._per_row(tf.convert_to_tensor(k, tf.int32), rows, features.K, user_keys[0])
        beta = self._per_row(tf.convert_to_tensor(beta, tf.float32), rows, features.BETA, user_keys[0])
        checks = [
            tf.debugging.assert_greater_equal(k, 1, message=f"inputs.k: k must be in [1, {self.k_max}]"),
            tf.debugging.assert_less_equal(k, self.k_max, message=f"inputs.k: k must be in [1, {self.k_max}]"),
            tf.debugging.assert_all_finite(beta, message="inputs.beta: beta must be finite"),
        ]
        with tf.control_dependencies(checks):
            k = tf.identity(k)
            beta = tf.identity(beta)
        # [B, 1] so that each row's beta scales its own centroid [B, d].
        out = self.model(batch, training=False, beta=beta[:, None])
        history = self.model.item_tower.rows(batch[features.HISTORY_ITEM_IDS])  # [B, H], 0 = pad/unknown
        cols = tf.maximum(tf.reduce_max(k), 1)  # max(k); 1 for an empty batch (no rows to fill)
        if exclude is not None:
            history = self._blocked_rows(history, exclude, rows)
        n = tf.minimum(cols + tf.shape(history)[1], self.num_items)
        scores, idx = self.index.search(out[features.QUERY], n)
        # Candidate row = catalog index + 1 (row 0 is the pad/unknown item).
        candidates = idx + 1
        if exclude is None:
            seen = tf.reduce_any(
                tf.logical_and(candidates[:, :, None] == history[:, None, :], history[:, None, :] > 0), axis=-1
            )
        else:
            seen = self._member(candidates, history)
        invalid = tf.logical_or(seen, idx < 0)  # ScaNN marks missing neighbours with -1
        neg_inf = tf.fill(tf.shape(scores), tf.constant(-np.inf, tf.float32))
        scores = tf.where(invalid, neg_inf, scores)
        top = tf.math.top_k(scores, k=tf.minimum(cols, tf.shape(scores)[1]))
        best = tf.gather(tf.maximum(idx, 0), top.indices, batch_dims=1)
        ids = tf.gather(self.item_id_table, best)
        # Pad to exactly max(k) columns when the catalog (minus history) is smaller.
        missing = cols - tf.shape(top.values)[1]
        ids = tf.pad(ids, [[0, 0], [0, missing]], constant_values=features.PAD_ITEM_ID)
        values = tf.pad(top.values, [[0, 0], [0, missing]], constant_values=-np.inf)
        # Row i keeps columns 0..k_i-1; unfillable slots and the columns past k_i are ""/-inf.
        keep = tf.logical_and(tf.range(cols)[None, :] < k[:, None], tf.math.is_finite(values))
        return {
            features.OUT_ITEM_IDS: tf.where(keep, ids, features.PAD_ITEM_ID),
            features.OUT_SCORES: tf.where(keep, values, tf.constant(-np.inf, tf.float32)),
            features.SEGMENT_ID: out[features.SEGMENT_ID],
            features.SEGMENT_PROBS: out[features.SEGMENT_PROBS],
        }

    def _blocked_rows(self, history: tf.Tensor, exclude, rows) -> tf.Tensor:
        """History rows [B, H] + the rows of exclude_item_ids [B, E] -> [B, H + E] (0 = pad/unknown)."""
        exclude = tf.convert_to_tensor(exclude, tf.string)
        check = tf.debugging.assert_equal(
            tf.shape(exclude)[0], rows,
            message=f"inputs.{features.EXCLUDE_ITEM_IDS}: needs one row per row of {self.user_keys[0]} (shape [B, E])",
        )
        with tf.control_dependencies([check]):
            excluded = self.model.item_tower.rows(exclude)
        return tf.concat([history, excluded], axis=1)

    @staticmethod
    def _member(candidates: tf.Tensor, blocked: tf.Tensor) -> tf.Tensor:
        """candidates [B, n] in blocked [B, M] (row by row) -> [B, n] bool; row 0 (pad/unknown) never blocks.

        Sorted search, O(B n log M): a consumed set of thousands of items
        would make the pairwise [B, n, M] comparison of the history too big.
        Candidates are rows >= 1 (ScaNN's missing -1 becomes 0, invalid anyway).
        """
        # One extra 0 column so that M >= 1 even for an empty exclusion list and a history of width 0.
        blocked = tf.sort(tf.pad(blocked, [[0, 0], [1, 0]]), axis=1)
        pos = tf.searchsorted(blocked, candidates, side="left")
        found = tf.gather(blocked, tf.minimum(pos, tf.shape(blocked)[1] - 1), batch_dims=1)
        return tf.logical_and(tf.equal(found, candidates), candidates > 0)

    @staticmethod
    def _per_row(value: tf.Tensor, rows, name: str, of: str) -> tf.Tensor:
        """A scalar knob -> [B] (the defaults); a [B] knob is checked to have one value per row."""
        if value.shape.rank == 0:
            return tf.fill([rows], value)
        check = tf.debugging.assert_equal(
            tf.shape(value)[0], rows,
            message=f"inputs.{name}: needs one value per row of {of} (shape [B])",
        )
        with tf.control_dependencies([check]):
            return tf.identity(value)

    # --- signature bodies ------------------------------------------------------------
    def _serving_default(self, inputs):
        return self.recommend(inputs, inputs[features.K], inputs[features.BETA])

    def _serving_exclude(self, inputs):
        return self.recommend(inputs, inputs[features.K], inputs[features.BETA],
                              exclude=inputs[features.EXCLUDE_ITEM_IDS])

    def _recommend_defaults(self, inputs):
        return self.recommend(inputs, self.default_k, self.default_beta)

    def _serving_tf_example(self, examples):
        spec = features.example_feature_spec()
        keys = [features.USER_TEXT, features.HISTORY_ITEM_IDS] + ([features.USER_ID] if self.with_user_id else [])
        if self.with_user_id:
            spec[features.USER_ID] = tf.io.FixedLenFeature([], tf.string, default_value="")
        parsed = tf.io.parse_example(examples, {key: spec[key] for key in keys})
        inputs = dict(parsed)
        history = parsed[features.HISTORY_ITEM_IDS].to_tensor(default_value=features.PAD_ITEM_ID)
        # At least one column, so a batch of cold users still has a [B, 1] history.
        inputs[features.HISTORY_ITEM_IDS] = tf.pad(
            history, [[0, 0], [0, tf.maximum(0, 1 - tf.shape(history)[1])]], constant_values=features.PAD_ITEM_ID
        )
        return self.recommend(inputs, self.default_k, self.default_beta)

    def _user_embedding(self, inputs):
        out = self.model(self._batch(inputs), training=False, beta=0.0)
        return {key: out[key] for key in EMBEDDING_OUTPUTS}

    def _encode_text(self, inputs):
        vectors = self.model.text_vectors({features.USER_TEXT: inputs[features.USER_TEXT]}, training=False)
        return {features.USER_TEXT_VECTOR: tf.cast(vectors, tf.float32)}

    def _serving_text_vector(self, inputs):
        with _reading_text_vectors(self.model):
            return self.recommend(inputs, inputs[features.K], inputs[features.BETA],
                                  exclude=inputs[features.EXCLUDE_ITEM_IDS], user_keys=(features.USER_TEXT_VECTOR,))


@contextlib.contextmanager
def _reading_text_vectors(model):
    """While serving_text_vector is traced, the model reads USER_TEXT_VECTOR from its batch.

    SegRecModel.text_vectors prefers the vector over user_text only when the
    encoder is frozen (finetune_layers 0); a fine-tuned model's encoder is
    the same at serving time, so the vector encode_text returned is what it
    would compute. Only the trace reads the flag; `check_text_vector_path`
    proves the result at export.
    """
    finetune = model.finetune_layers
    model.finetune_layers = 0
    try:
        yield
    finally:
        model.finetune_layers = finetune


def check_text_vector_path(module: ServingModule, inputs: dict, expected: dict, atol: float = 1e-5) -> None:
    """serving_text_vector(encode_text(user_text)) must answer `inputs` (serving_default's) as
    serving_default did (`expected`); a RuntimeError otherwise. No-op without the split signatures."""
    if not module.text_vector_signatures():
        return
    vectors = module.encode_text({features.USER_TEXT: inputs[features.USER_TEXT]})[features.USER_TEXT_VECTOR]
    split = {name: value for name, value in inputs.items() if name != features.USER_TEXT}
    rows = tf.shape(vectors)[0]
    got = module.serving_text_vector({**split, features.USER_TEXT_VECTOR: vectors,
                                      features.EXCLUDE_ITEM_IDS: tf.fill([rows, 0], features.PAD_ITEM_ID)})
    for key in (features.OUT_ITEM_IDS, features.SEGMENT_ID):
        if not np.array_equal(got[key].numpy(), expected[key].numpy()):
            raise RuntimeError(f"serving_text_vector(encode_text(...)) answers {key} unlike serving_default")
    for key in (features.OUT_SCORES, features.SEGMENT_PROBS):
        if not np.allclose(got[key].numpy(), expected[key].numpy(), atol=atol):
            raise RuntimeError(f"serving_text_vector(encode_text(...)) answers {key} unlike serving_default")
