"""The segrec model in a Beam pipeline, shared by `segrec score` and `segrec segments refresh`.

    interactions, items, users --user_queries.BuildUserQueries--> UserQuery per user
    (or) dataset dir --user_queries.QueriesFromDataset--------/       \\--> dead letters, counts
    UserQuery --model_handler.RunSegRec(model_dir, signature, k, beta)--> (UserQuery, {output: numpy})
                                                                 \\--> dead letters (model, inference_error)

Modules:
    user_queries   UserQuery, and the queries built from raw logs (BuildUserQueries)
                   or read back from a dataset dir (QueriesFromDataset)
    model_handler  SegRecModelHandler (Beam's TF model handler for an export),
                   SignatureCall / batch_inputs, RunSegRec
    retrying       RunInferenceRetrying: a failed batch retried one element at a time;
                   the dead letters (and the all-rejected check) of what fails alone

NAMESPACE is the Beam metrics namespace (and logger name) of all three.
"""

NAMESPACE = "segrec.inference"
