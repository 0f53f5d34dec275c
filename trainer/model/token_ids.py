"""Client-side tokenisation for token-id exports (`segrec export --text-input token_ids`).

Such an export's signatures take `input_ids` / `padding_mask` [B, T] int32
instead of `user_text` [B] string, so the model server needs no
tensorflow_text ops (some TF Serving builds lack them; see
serving/export/graph_ops.py). The client must then produce exactly the ids
the in-graph encoder would have: `TokenIds` is built from the same pieces as
`TextEncoder.tokenize` (keras-hub's BertTokenizer over the export's
vocabulary, StartEndPacker with [CLS]/[SEP]/[PAD], length-aware padding to
a bucket) from what the export records: `assets.extra/vocab.txt` and
export.json's "tokenizer" (lowercase, sequence_length, bucket widths).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from trainer.contracts import EXPORT_INFO, VOCAB_FILE
from trainer.model import padding


def tokenizer_info(encoder, text_input: str) -> dict:
    """What export.json records about a TextEncoder's tokenisation."""
    return {
        "vocabulary": VOCAB_FILE if text_input == "token_ids" else None,
        "lowercase": bool(encoder.tokenizer.lowercase),
        "sequence_length": int(encoder.sequence_length),
        "bucket_widths": [int(w) for w in encoder.bucket_widths],
    }


def write_vocabulary(encoder, version_dir: str) -> None:
    """The encoder's WordPiece vocabulary, one token a line, at VOCAB_FILE."""
    import tensorflow as tf

    path = os.path.join(version_dir, VOCAB_FILE)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "w") as f:
        f.write("\n".join(encoder.tokenizer.get_vocabulary()) + "\n")


class TokenIds:
    """texts -> (input_ids [B, W] int32, padding_mask [B, W] int32), as the exported encoder tokenises.

    Args:
      vocabulary: the WordPiece tokens (list) or a vocab file path.
      lowercase, sequence_length: as the encoder's.
      bucket_widths: the padded widths (None: padding.bucket_widths(sequence_length)).
      fixed_width: pad every request to sequence_length (W = S). TF Serving's
        batching concatenates only requests of one width, and the export
        trims each batch to its longest row's bucket anyway; False pads to
        the bucket here (W = the bucket of the longest text).
    """

    def __init__(self, vocabulary, lowercase: bool, sequence_length: int, bucket_widths: Sequence[int] = None,
                 fixed_width: bool = True):
        import keras_hub

        self.tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=lowercase)
        self.packer = keras_hub.layers.StartEndPacker(
            sequence_length=int(sequence_length),
            start_value=self.tokenizer.cls_token_id,
            end_value=self.tokenizer.sep_token_id,
            pad_value=self.tokenizer.pad_token_id,
            return_padding_mask=True,
        )
        self.widths = tuple(bucket_widths or padding.bucket_widths(int(sequence_length)))
        self.fixed_width = bool(fixed_width)

    @classmethod
    def from_export(cls, version_dir: str, fixed_width: bool = True) -> "TokenIds":
        """Reads export.json's "tokenizer" and the vocabulary file of a token-id export."""
        with open(os.path.join(version_dir, EXPORT_INFO), encoding="utf-8") as f:
            info = json.load(f).get("tokenizer") or {}
        if not info.get("vocabulary"):
            raise ValueError(f"{version_dir}: not a token-id export (export.json has no tokenizer vocabulary)")
        return cls(os.path.join(version_dir, info["vocabulary"]), info["lowercase"], info["sequence_length"],
                   info.get("bucket_widths"), fixed_width)

    def __call__(self, texts: Sequence[str]) -> tuple:
        import tensorflow as tf

        ids, mask = self.packer(self.tokenizer(tf.constant(list(texts), tf.string)))
        if not self.fixed_width:
            ids, mask = padding.trim(ids, mask, self.widths)
        return ids.numpy().astype(np.int32), mask.numpy().astype(np.int32)
