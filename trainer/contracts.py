"""Names of the artifacts segrec's parts hand to each other, in one place.

Beside trainer/features.py (feature and dataset-dir names): the exported
model's signature names and the files of a run dir and of an export version
dir. Every module that writes or reads one of these imports the name from
here; see ARCHITECTURE.md for what each file holds.
"""

# --- The export: <base>/segrec/<version>/ (serving/export/layout.py) ---------
MODEL_NAME = "segrec"  # the model's dir under a TF Serving model base path
SAVED_MODEL = "saved_model.pb"
EXPORT_INFO = "export.json"  # the export's defaults (k, beta, k_max, index...), machine-readable
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
VOCAB_FILE = "assets.extra/vocab.txt"  # token-id exports: the WordPiece vocabulary clients tokenise with

# Signature names of the SavedModel.
SERVING_DEFAULT = "serving_default"  # user_text, history_item_ids, k [B], beta [B] -> top-k + segment
RECOMMEND_DEFAULTS = "recommend_defaults"  # the same with the export's k and beta baked in
SERVING_TF_EXAMPLE = "serving_tf_example"  # serialized tf.Example -> as recommend_defaults
USER_EMBEDDING = "user_embedding"  # user_text, history_item_ids -> embedding, segment
# serving_default's inputs + exclude_item_ids [B, E]: items in the history OR the exclusions are never
# returned (a user's whole consumed set, not only the <= 50 history items the model reads).
SERVING_EXCLUDE = "serving_exclude"
SIGNATURES = (SERVING_DEFAULT, RECOMMEND_DEFAULTS, SERVING_TF_EXAMPLE, USER_EMBEDDING, SERVING_EXCLUDE)
# Token-id exports (--text-input token_ids) take input_ids/padding_mask for user_text and have no
# serving_tf_example (its examples carry text).
TOKEN_ID_SIGNATURES = (SERVING_DEFAULT, RECOMMEND_DEFAULTS, USER_EMBEDDING, SERVING_EXCLUDE)
# Text exports also split serving_default in two, so a server or batch scorer can encode each
# distinct user_text once and cache its vector (serving/server/text_cache.py):
ENCODE_TEXT = "encode_text"  # user_text [B] -> user_text_vector [B, D] float32 (SegRecModel.text_vectors)
SERVING_TEXT_VECTOR = "serving_text_vector"  # user_text_vector, history_item_ids, k, beta, exclude_item_ids -> as serving_exclude
TEXT_VECTOR_SIGNATURES = (ENCODE_TEXT, SERVING_TEXT_VECTOR)

# --- Files shared by a run dir and an export version dir ---------------------
SEGMENTS_FILE = "segments.json"  # trainer/segments/document.py reads and writes it
MODEL_CARD = "model_card.md"  # human-readable; never parsed back
