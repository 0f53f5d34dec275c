"""The text-vector cache: each distinct user_text goes through the encoder once.

The pretrained encoder's pass over user_text dominates a recommendation, and a
user's text rarely changes between requests. A text export splits
serving_default in two (serving/export/signatures.py): encode_text (user_text
-> user_text_vector [B, D]) and serving_text_vector (user_text_vector,
history_item_ids, k, beta, exclude_item_ids [B, E] -> serving_default's
outputs). `recommend` answers a serving_default, recommend_defaults or
serving_exclude call through them: each row's text
is looked up in a `TextVectorCache`, only the distinct misses are encoded
(one encode_text call), then serving_text_vector runs on the vectors. The
answer is serving_default's: a row's vector is the encoder's own for its
text (batch composition moves scores by float rounding, < 1e-6).

Keys (`text_key`): the text's UTF-8 bytes with ASCII whitespace (space, \\t,
\\n, \\r, \\f, \\v) stripped from both ends, and nothing else. The WordPiece
tokenizer splits on exactly those characters (whitespace and control
characters) and drops them, so stripping never changes the tokens. There is
no Unicode (NFC) normalisation and no lower-casing, although MiniLM's
tokenizer lower-cases: it splits on punctuation *before* it case-folds
(NFKC), so NFC can change the tokens (U+1FEF is NFC "`", a punctuation
split; "=" + U+0338 is NFC "≠", which is no split), and two texts that
encode differently must never share a key. Text that is not UTF-8 is keyed
exactly as sent (bytes); a str that cannot be UTF-8 encoded, as itself (the
model rejects it anyway).

`TextVectorCache` is a bounded LRU (least recently used entries evicted
first), safe to share between threads; it counts hits, misses and evictions.
`segrec serve` keeps one per loaded version (model_manager makes it and
drops it when the version goes; the predictor calls through it; prometheus
reports it); batch scoring keeps one per loaded model in a worker process
(beam_pipelines/inference/model_handler.py).
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from trainer import features
from trainer.contracts import ENCODE_TEXT, RECOMMEND_DEFAULTS, SERVING_DEFAULT, SERVING_EXCLUDE, SERVING_TEXT_VECTOR

DEFAULT_SIZE = 100_000  # entries; MiniLM's 384 floats make one ~1.6 KB with its key
CACHED_SIGNATURES = (SERVING_DEFAULT, RECOMMEND_DEFAULTS, SERVING_EXCLUDE)  # what `recommend` can answer
_ASCII_SPACE = b" \t\n\r\f\v"


def text_key(text):
    """The cache key of one user_text (bytes or str); see the module docstring."""
    if isinstance(text, str):
        try:
            text = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no tf.string can hold it
            return text
    else:
        text = bytes(text)
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return text  # not UTF-8: exactly as sent (never equal to a valid key)
    return text.strip(_ASCII_SPACE)


def has_split(signature_names: Iterable[str]) -> bool:
    """Does a version with these signatures have encode_text and serving_text_vector?"""
    names = set(signature_names)
    return ENCODE_TEXT in names and SERVING_TEXT_VECTOR in names


def usable(signature_names: Iterable[str], signature: str, default_k=None, default_beta=None) -> bool:
    """Can `recommend` answer `signature` for a version with these signatures (and defaults)?"""
    if signature not in CACHED_SIGNATURES or not has_split(signature_names):
        return False
    return signature != RECOMMEND_DEFAULTS or (default_k is not None and default_beta is not None)


class TextVectorCache:
    """text_key -> the text's vector [D] float32 (read-only), at most `max_entries` of them."""

    def __init__(self, max_entries: int = DEFAULT_SIZE):
        if max_entries < 1:
            raise ValueError(f"a text cache holds at least 1 entry, got {max_entries}")
        self.max_entries = int(max_entries)
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, text) -> bool:
        with self._lock:
            return text_key(text) in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _get(self, keys: Sequence) -> list:
        """Vectors (None for a miss) of `keys`; hits become the most recently used."""
        with self._lock:
            found = []
            for key in keys:
                vector = self._entries.get(key)
                if vector is not None:
                    self._entries.move_to_end(key)
                found.append(vector)
            hits = sum(v is not None for v in found)
            self.hits += hits
            self.misses += len(found) - hits
            return found

    def _put(self, items: dict) -> None:
        with self._lock:
            for key, vector in items.items():
                self._entries[key] = vector
                self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                self.evictions += 1

    def vectors(self, texts: Sequence, encode: Callable) -> tuple:
        """-> (vectors [B, D] float32 of `texts` [B], hits, misses).

        encode(texts [M] object array) -> [M, D]: called once, on the first row
        of each distinct key that the cache misses (none when every row hits).
        """
        keys = [text_key(t) for t in texts]
        found = self._get(keys)
        first: dict = {}  # missed key -> its first row
        for row, (key, vector) in enumerate(zip(keys, found)):
            if vector is None:
                first.setdefault(key, row)
        misses = sum(v is None for v in found)
        if first:
            rows = list(first.values())
            encoded = np.asarray(encode(np.array([texts[r] for r in rows], dtype=object)), dtype=np.float32)
            if encoded.ndim != 2 or encoded.shape[0] != len(rows):
                raise RuntimeError(f"encode_text returned shape {encoded.shape} for {len(rows)} texts")
            fresh = {}
            for key, vector in zip(first, encoded):
                vector = np.array(vector, dtype=np.float32)  # a copy, not a view of the batch
                vector.flags.writeable = False
                fresh[key] = vector
            self._put(fresh)
            found = [fresh[key] if vector is None else vector for key, vector in zip(keys, found)]
        return np.stack(found), len(keys) - misses, misses


def recommend(call: Callable, cache: TextVectorCache, signature: str, inputs: dict,
              default_k: Optional[int] = None, default_beta: Optional[float] = None) -> tuple:
    """serving_default / recommend_defaults `inputs` (numpy, user_text [B]) -> (outputs, hits, misses)
    through encode_text (the cache's misses only) and serving_text_vector.

    call(signature, inputs) -> {output: numpy}: one call of the loaded model.
    recommend_defaults gets default_k / default_beta (the export's, from
    export.json) as serving_text_vector's k and beta.
    """
    texts = inputs[features.USER_TEXT]
    rows = len(texts)
    if rows == 0:
        return call(signature, inputs), 0, 0

    def encode(batch):
        return call(ENCODE_TEXT, {features.USER_TEXT: batch})[features.USER_TEXT_VECTOR]

    vectors, hits, misses = cache.vectors(texts, encode)
    split = {name: value for name, value in inputs.items() if name != features.USER_TEXT}
    split[features.USER_TEXT_VECTOR] = vectors
    if features.EXCLUDE_ITEM_IDS not in split:  # serving_default / recommend_defaults: nothing beyond the history
        split[features.EXCLUDE_ITEM_IDS] = np.zeros([rows, 0], object)
    if signature == RECOMMEND_DEFAULTS:
        split[features.K] = np.full([rows], default_k, np.int32)
        split[features.BETA] = np.full([rows], default_beta, np.float32)
    return call(SERVING_TEXT_VECTOR, split), hits, misses
