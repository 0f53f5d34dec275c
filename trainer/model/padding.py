"""Length-aware padding of packed token batches.

The encoder packs every text as [CLS] ... [SEP] [PAD]... to its
`sequence_length` S, but a batch only needs as many columns as its longest
row: the BERT backbone masks padded keys out of attention and the mean pool
masks them out of the average, so cutting all-padding columns changes nothing
but the cost (the transformer's work grows with the number of columns, its
attention with their square). A MovieLens profile with five recent titles is
~50 tokens, so a batch of them needs 64 columns, not 128.

The width is rounded up to a bucket rather than the exact longest row, so
the backbone sees only a few distinct shapes: oneDNN and XLA cache their
kernels per shape, and a traced function with static widths (a TF Serving
warm-up, a `tf.function` keyed on shapes) stays bounded. The buckets are the
powers of two from 8 and, from 16 on, the half-octave between each pair
(8, 16, 24, 32, 48, 64, 96, 128, ..., S): two shapes per doubling, and a
batch pays for at most a third more columns than its longest row needs
(plain powers of two waste up to half: a batch whose longest row is 69
tokens would run 128 columns instead of 96).

`bucket_widths(S)` lists the widths; `trim(token_ids, padding_mask, widths)`
cuts a packed [B, S] batch to [B, W] in the graph (one trace for every W: W is
a tensor, the column dim is None).
"""

from __future__ import annotations

import tensorflow as tf

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)

MIN_BUCKET = 8


def bucket_widths(sequence_length: int, min_bucket: int = MIN_BUCKET) -> tuple:
    """Padded widths a batch may take, ascending: the powers of two from
    `min_bucket` and 1.5x each power from 16, those below `sequence_length`,
    then `sequence_length` itself (128 -> 8, 16, 24, 32, 48, 64, 96, 128)."""
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
    widths, w = [], min_bucket
    while w < sequence_length:
        widths += [w] + ([w + w // 2] if w >= 2 * min_bucket else [])
        w *= 2
    return tuple(x for x in widths if x < sequence_length) + (int(sequence_length),)


def bucket_for(length: int, widths: tuple) -> int:
    """The smallest width >= `length` (the last width when none is): the
    Python twin of `trim`'s rule, for clients that pad token ids themselves."""
    return next((w for w in widths if w >= length), widths[-1])


def trim(token_ids: tf.Tensor, padding_mask: tf.Tensor, widths: tuple) -> tuple:
    """Packed token_ids [B, S] int32 and padding_mask [B, S] (bool or 0/1) ->
    token_ids [B, W], padding_mask [B, W] bool, W = the smallest of `widths`
    that holds the batch's longest row (at most S: a narrower batch stays as is).

    Columns W..S-1 hold padding in every row, so the cut never drops a token.
    """
    # An empty batch's max is INT_MIN, which picks the smallest width.
    padding_mask = tf.cast(padding_mask, tf.bool)
    longest = tf.reduce_max(tf.reduce_sum(tf.cast(padding_mask, tf.int32), axis=1))
    table = tf.constant(widths, tf.int32)
    # Index of the first width >= longest (clamped to the last: packing already truncated rows to S).
    slot = tf.minimum(tf.reduce_sum(tf.cast(table < longest, tf.int32)), len(widths) - 1)
    width = table[slot]
    return token_ids[:, :width], padding_mask[:, :width]
