"""`segrec serve`: a development server speaking TF Serving's gRPC API (+ REST) over exported versions.

    config         ServeConfig (the settings of one server) and the --version-labels parser
    errors         ServeError (a gRPC code name + a message naming the field) and model-error mapping
    model_manager  versions under <base>/<model>/<N>/: load, poll, swap, labels, load errors
    validation     checks of a PredictRequest before the model (RequestError naming the field)
    batching       the bounded, adaptive batching queue in front of the model
    text_cache     the per-version LRU of user_text -> encoder vector (encode_text + serving_text_vector)
    predictor      Predictor: spec -> version -> validation -> batching -> model; shared by both APIs
    grpc_api       PredictionService + ModelService servicers, health (grpc.health.v1), reflection, token auth
    rest_api       TF Serving's REST subset: a FastAPI app over the Predictor, run by uvicorn in a thread
    prometheus     the metrics registry and its HTTP port
    app            Server (start, health follows versions, SIGTERM drain, stop) and serve(): the process
    launch         ServerProcess: `segrec serve` in a subprocess on a free port (demo, notebooks, tests)
"""
