"""The one error type of `segrec serve`, and how failures become it.

`ServeError(code, message)` carries a gRPC status code name (INVALID_ARGUMENT,
NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, UNAVAILABLE,
DEADLINE_EXCEEDED, UNAUTHENTICATED, INTERNAL) and a message that names the
field at fault. The Predictor raises it; the gRPC adapter (grpc_api.py) aborts
with that code and the REST adapter (rest_api.py) answers the matching HTTP
status. `from_model_error` maps an exception out of the SavedModel call.
"""

from __future__ import annotations

import logging

_LOG = logging.getLogger("segrec.serve")


class ServeError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code  # grpc.StatusCode member name


def from_model_error(err: Exception) -> ServeError:
    """A failed model call: TensorFlow's InvalidArgumentError is the caller's
    INVALID_ARGUMENT (first line of its message); anything else is logged and INTERNAL."""
    import tensorflow as tf

    if isinstance(err, tf.errors.InvalidArgumentError):
        return ServeError("INVALID_ARGUMENT", err.message.split("\n")[0])
    _LOG.exception("the model failed", exc_info=err)
    return ServeError("INTERNAL", f"the model failed: {type(err).__name__}")
