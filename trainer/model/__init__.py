"""The model and its persistence.

    text_encoder     the user-text encoder (keras-hub BERT, mean pooling) and its TextCache
    padding          length-aware padding: each batch to its longest row's bucket
    token_ids        client-side tokenisation for token-id exports (the encoder's own)
    towers           ItemTower (id, categories, title words) and UserTower (text, history, id)
    segment_head     K centroids, p = softmax(u . C^T / tau), the segment-aware query, k-means
    segrec_model     SegRecModel: both towers + segment head, TFRS retrieval loss, train step
    run_dir          the run dir `segrec train` writes: config, weights, text cache, load_run
    batched_outputs  a trained model's user-side outputs over a split, in batches
"""
