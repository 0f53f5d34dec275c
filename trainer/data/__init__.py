"""The dataset dir contract, read and built: what preprocessing writes and training reads.

    examples     query features and (query, positive) examples, one rule set for
                 preprocess, batch scoring, the segment refresh and the frontend
    tf_dataset   tf.data input: the item catalog and batches of examples
    arrays       a split as plain numpy arrays (evaluation, profiles, reports), the event
                 log, and the ranked queries of a split (load_queries)
    candidates   the repeat rule per query in catalog indices, and the target's rank:
                 the one ranking rule of train-time recall and `segrec evaluate`
"""
