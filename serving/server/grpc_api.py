"""The gRPC face of `segrec serve`: TF Serving's services over the Predictor,
plus the standard health and reflection services.

    tensorflow.serving.PredictionService  Predict, GetModelMetadata;
                                          Classify, Regress, MultiInference -> UNIMPLEMENTED
    tensorflow.serving.ModelService       GetModelStatus; HandleReloadConfigRequest -> UNIMPLEMENTED
    grpc.health.v1.Health                 Check, Watch (grpcio-health-checking): SERVING for "" and
                                          both services above once a version is loaded,
                                          NOT_SERVING before that and for good once draining
    grpc.reflection.v1alpha.ServerReflection  (grpcio-reflection) lists the four, so
                                          `grpcurl -plaintext HOST:PORT list` works

A servicer turns a `ServeError` into its status code and counts every call in
the metrics. With a bearer token, every call but health checks (reflection
included) must carry `authorization: Bearer <token>` (TokenInterceptor).
"""

from __future__ import annotations

import logging
import time

import grpc

from serving.server.errors import ServeError

_LOG = logging.getLogger("segrec.serve")
MODEL_SERVICES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")
HEALTH_SERVICE = "grpc.health.v1.Health"
# What Health answers for: the server as a whole ("") and each model service.
HEALTH_SERVICES = ("",) + MODEL_SERVICES


def add_services(server: grpc.Server, predictor, metrics, health: "Health") -> None:
    """Registers PredictionService, ModelService, Health and ServerReflection on `server`."""
    from grpc_health.v1 import health_pb2_grpc
    from grpc_reflection.v1alpha import reflection
    from tensorflow_serving.apis import (
        model_service_pb2_grpc,
        prediction_service_pb2_grpc,
    )

    prediction, model = _servicers()
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(prediction(predictor, metrics), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(model(predictor, metrics), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    _register_service_descriptors()
    reflection.enable_server_reflection(MODEL_SERVICES + (HEALTH_SERVICE, reflection.SERVICE_NAME), server)


# --- TF Serving's services --------------------------------------------------------------------------
def _servicers():
    from tensorflow_serving.apis import (
        model_service_pb2_grpc,
        prediction_service_pb2_grpc,
    )

    class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def __init__(self, predictor, metrics):
            self.predictor, self.metrics = predictor, metrics

        def Predict(self, request, context):
            return _call(self.metrics, "Predict", context,
                         lambda: self.predictor.predict(request, context.time_remaining()))

        def GetModelMetadata(self, request, context):
            return _call(self.metrics, "GetModelMetadata", context, lambda: self.predictor.metadata(request))

        def Classify(self, request, context):
            return _unimplemented(self.metrics, "Classify", context)

        def Regress(self, request, context):
            return _unimplemented(self.metrics, "Regress", context)

        def MultiInference(self, request, context):
            return _unimplemented(self.metrics, "MultiInference", context)

    class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
        def __init__(self, predictor, metrics):
            self.predictor, self.metrics = predictor, metrics

        def GetModelStatus(self, request, context):
            return _call(self.metrics, "GetModelStatus", context, lambda: self.predictor.status(request))

        def HandleReloadConfigRequest(self, request, context):
            return _unimplemented(self.metrics, "HandleReloadConfigRequest", context)

    return PredictionServicer, ModelServicer


def _call(metrics, method: str, context, fn):
    start = time.perf_counter()
    code = "OK"
    try:
        return fn()
    except ServeError as err:
        code = err.code
        context.abort(getattr(grpc.StatusCode, err.code), str(err))
    except Exception as err:  # noqa: BLE001  (a server bug: INTERNAL, logged, the server keeps serving)
        code = "INTERNAL"
        _LOG.exception("%s failed", method)
        context.abort(grpc.StatusCode.INTERNAL, f"{method} failed: {type(err).__name__}")
    finally:
        if metrics is not None:
            metrics.observe_request(method, code, time.perf_counter() - start)


def _unimplemented(metrics, method: str, context):
    if metrics is not None:
        metrics.observe_request(method, "UNIMPLEMENTED", 0.0)
    context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by segrec serve; use Predict")


# --- reflection ------------------------------------------------------------------------------------------
def _register_service_descriptors() -> None:
    """Adds PredictionService and ModelService to the default descriptor pool (which reflection reads),
    as tensorflow_serving/apis/{prediction,model}_service.proto declare them.

    tensorflow-serving-api 2.20 ships their *_pb2.py as legacy generated code that protobuf's upb
    backend no longer imports (`has_options` is read-only), so only the messages are in the pool.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool
    from tensorflow_serving.apis import (
        classification_pb2,
        get_model_metadata_pb2,
        get_model_status_pb2,
        inference_pb2,
        model_management_pb2,
        predict_pb2,
        regression_pb2,
    )

    services = {
        "PredictionService": ("tensorflow_serving/apis/prediction_service.proto", [
            ("Classify", classification_pb2.ClassificationRequest, classification_pb2.ClassificationResponse),
            ("Regress", regression_pb2.RegressionRequest, regression_pb2.RegressionResponse),
            ("Predict", predict_pb2.PredictRequest, predict_pb2.PredictResponse),
            ("MultiInference", inference_pb2.MultiInferenceRequest, inference_pb2.MultiInferenceResponse),
            ("GetModelMetadata", get_model_metadata_pb2.GetModelMetadataRequest,
             get_model_metadata_pb2.GetModelMetadataResponse)]),
        "ModelService": ("tensorflow_serving/apis/model_service.proto", [
            ("GetModelStatus", get_model_status_pb2.GetModelStatusRequest, get_model_status_pb2.GetModelStatusResponse),
            ("HandleReloadConfigRequest", model_management_pb2.ReloadConfigRequest,
             model_management_pb2.ReloadConfigResponse)]),
    }
    pool = descriptor_pool.Default()
    for service, (file_name, methods) in services.items():
        try:
            pool.FindServiceByName(f"tensorflow.serving.{service}")
            continue  # already there (a newer tensorflow-serving-api, or an earlier server in this process)
        except KeyError:
            pass
        proto = descriptor_pb2.FileDescriptorProto(name=file_name, package="tensorflow.serving", syntax="proto3")
        proto.dependency.extend(sorted({m.DESCRIPTOR.file.name for _, *types in methods for m in types}))
        proto.options.cc_enable_arenas = True
        rpcs = proto.service.add(name=service)
        for name, request, response in methods:
            rpcs.method.add(name=name, input_type=f".{request.DESCRIPTOR.full_name}",
                            output_type=f".{response.DESCRIPTOR.full_name}")
        pool.AddSerializedFile(proto.SerializeToString())


# --- grpc.health.v1 -------------------------------------------------------------------------------------
class Health:
    """grpcio-health-checking's HealthServicer, NOT_SERVING until `set_serving(True)`."""

    def __init__(self):
        from grpc_health.v1 import health

        self.servicer = health.HealthServicer()
        self.set_serving(False)

    def set_serving(self, serving: bool) -> None:
        """SERVING or NOT_SERVING for "" and each model service (ignored once draining)."""
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in HEALTH_SERVICES:
            self.servicer.set(service, status)

    def drain(self) -> None:
        """NOT_SERVING for every service, for good (later set_serving calls are ignored)."""
        self.servicer.enter_graceful_shutdown()


# --- auth -----------------------------------------------------------------------------------------------
class TokenInterceptor(grpc.ServerInterceptor):
    """Every call but health checks must carry `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}"

    def intercept_service(self, continuation, details):
        if details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return continuation(details)
        if dict(details.invocation_metadata or ()).get("authorization") == self._expected:
            return continuation(details)
        return _deny_like(continuation(details))


def _deny_like(handler):
    """A handler of the same streaming kind as `handler` that answers UNAUTHENTICATED."""

    def deny(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata authorization)")

    if handler is None or not (handler.request_streaming or handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(deny)
    make = {(False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
