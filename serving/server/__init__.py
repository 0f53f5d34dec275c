"""`segrec serve`: TF Serving's gRPC API (+ REST) over exported versions, batching, validation, metrics."""
