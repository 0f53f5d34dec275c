"""Checks of a PredictRequest before it reaches the model.

Every failure is a `RequestError` carrying a gRPC status code name and a
message that names the field, so a wrong request gets INVALID_ARGUMENT (or
NOT_FOUND / FAILED_PRECONDITION) and never an INTERNAL from deep inside
TensorFlow. The checks read only the request proto and the version's
signature specs; decoding a tensor is guarded so that a malformed
TensorProto (content that does not match its shape) is also a bad request.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from trainer import features

# tensorflow/core/framework/types.proto DataType values, the ones a request may carry.
_DT_NAMES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "object",
             9: "int64", 10: "bool", 19: "float16"}
_DT_FIELDS = {"float32": "float_val", "float64": "double_val", "int32": "int_val", "int64": "int64_val",
              "object": "string_val", "bool": "bool_val"}
_DT_SHOWN = {"object": "DT_STRING", "float32": "DT_FLOAT", "int32": "DT_INT32", "int64": "DT_INT64",
             "float64": "DT_DOUBLE", "bool": "DT_BOOL"}


class RequestError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code  # grpc.StatusCode member name


@dataclasses.dataclass(frozen=True)
class Limits:
    """max_batch: rows of one request; max_history: columns of history_item_ids;
    max_exclude: columns of exclude_item_ids (serving_exclude);
    max_string_bytes: one string element; max_elements: elements of one tensor."""

    max_batch: int = 64
    max_history: int = 1000
    max_exclude: int = 100_000
    max_string_bytes: int = 10 * 1024 * 1024
    max_elements: int = 1_000_000


def bad(message: str) -> RequestError:
    return RequestError("INVALID_ARGUMENT", message)


def check_signature(name: str, loaded) -> str:
    name = name or "serving_default"
    if name not in loaded.inputs:
        raise bad(f"model_spec.signature_name: unknown signature {name!r}; "
                  f"the model has {sorted(loaded.inputs)}")
    return name


def decode_inputs(request, signature: str, loaded, limits: Limits) -> dict:
    """request.inputs -> {name: numpy array}, checked against the signature and limits."""
    specs = loaded.inputs[signature]
    got, want = set(request.inputs), set(specs)
    if want - got:
        missing = sorted(want - got)[0]
        raise bad(f"inputs.{missing}: missing; signature {signature!r} takes {sorted(want)}")
    if got - want:
        extra = sorted(got - want)[0]
        raise bad(f"inputs.{extra}: not an input of signature {signature!r}, which takes {sorted(want)}")
    arrays = {}
    for name in sorted(specs):
        arrays[name] = _decode(name, request.inputs[name], specs[name], limits)
    _check_values(arrays, loaded, limits)
    return arrays


def _decode(name: str, proto, spec, limits: Limits) -> np.ndarray:
    dtype = _DT_NAMES.get(proto.dtype)
    if dtype != spec.dtype:
        shown = _DT_SHOWN.get(dtype, f"enum {proto.dtype}") if dtype else f"DataType enum {proto.dtype}"
        raise bad(f"inputs.{name}: dtype {shown}, expected {_DT_SHOWN.get(spec.dtype, spec.dtype)}")
    if proto.tensor_shape.unknown_rank:
        raise bad(f"inputs.{name}: unknown rank; expected rank {spec.rank}")
    dims = [d.size for d in proto.tensor_shape.dim]
    if spec.rank == 1 and not dims and name in (features.K, features.BETA):
        raise bad(f"inputs.{name}: a scalar; this model takes one {name} per row of the batch (shape [B], "
                  f"e.g. [{name}] for one user)")
    if spec.rank >= 0 and len(dims) != spec.rank:
        raise bad(f"inputs.{name}: rank {len(dims)} (shape {dims}), expected rank {spec.rank}")
    if any(d < 0 for d in dims):
        raise bad(f"inputs.{name}: negative dimension in shape {dims}")
    _check_static_dims(name, dims, spec)
    size = math.prod(dims)
    if size > limits.max_elements:
        raise bad(f"inputs.{name}: {size} elements, more than the limit {limits.max_elements}")
    if dtype == "object":
        for value in proto.string_val:
            if len(value) > limits.max_string_bytes:
                raise bad(f"inputs.{name}: a string of {len(value)} bytes, more than the limit "
                          f"{limits.max_string_bytes}")
        n = len(proto.string_val)
        if n != size:
            raise bad(f"inputs.{name}: {n} string values for shape {dims} ({size} elements)")
        arr = np.empty(size, dtype=object)
        arr[:] = list(proto.string_val)
        return arr.reshape(dims)
    try:
        import tensorflow as tf

        arr = tf.make_ndarray(proto)
    except Exception as err:  # noqa: BLE001  (malformed content is the caller's mistake)
        raise bad(f"inputs.{name}: cannot decode the tensor ({err})") from err
    if list(arr.shape) != dims:
        raise bad(f"inputs.{name}: values do not fill shape {dims}")
    return arr


def _check_static_dims(name: str, dims: list, spec) -> None:
    """Axes after the batch axis that the signature fixes (user_text_vector's D) must match."""
    fixed = getattr(spec, "dims", ())
    for axis, (got, want) in enumerate(zip(dims, fixed)):
        if axis and want is not None and got != want:
            shown = ", ".join(["B"] + [str(d) if d is not None else "?" for d in fixed[1:]])
            raise bad(f"inputs.{name}: shape {dims}, expected [{shown}]")


def _check_values(arrays: dict, loaded, limits: Limits) -> None:
    text = arrays.get(features.USER_TEXT)
    hist = arrays.get(features.HISTORY_ITEM_IDS)
    examples = arrays.get(features.EXAMPLES)
    batch_of = [(n, a.shape[0]) for n, a in arrays.items() if a.ndim >= 1]
    for name, rows in batch_of:
        if rows > limits.max_batch:
            raise bad(f"inputs.{name}: batch of {rows} rows, more than the limit {limits.max_batch}")
        if rows == 0:
            raise bad(f"inputs.{name}: empty batch")
    users = [(n, r) for n, r in batch_of if n not in (features.K, features.BETA)]
    if len({rows for _, rows in users}) > 1:
        raise bad("inputs: batch sizes differ: " + ", ".join(f"{n} has {r}" for n, r in users))
    _check_knob_rows(arrays)
    if len({rows for _, rows in batch_of}) > 1:
        raise bad("inputs: batch sizes differ: " + ", ".join(f"{n} has {r}" for n, r in batch_of))
    if hist is not None:
        if hist.shape[1] > limits.max_history:
            raise bad(f"inputs.{features.HISTORY_ITEM_IDS}: {hist.shape[1]} columns, more than the limit "
                      f"{limits.max_history}")
        if hist.shape[1] == 0:
            raise bad(f"inputs.{features.HISTORY_ITEM_IDS}: no columns; pad a cold user's history with \"\"")
    exclude = arrays.get(features.EXCLUDE_ITEM_IDS)
    if exclude is not None and exclude.shape[1] > limits.max_exclude:
        # Rank, dtype and the batch dimension are checked above like every input's; E = 0 is allowed.
        raise bad(f"inputs.{features.EXCLUDE_ITEM_IDS}: {exclude.shape[1]} columns, more than the limit "
                  f"{limits.max_exclude}")
    vectors = arrays.get(features.USER_TEXT_VECTOR)
    if vectors is not None and not np.isfinite(vectors).all():
        raise bad(f"inputs.{features.USER_TEXT_VECTOR}: must be finite (what encode_text returns)")
    if (text is None and examples is None and vectors is None
            and features.USER_TEXT in _all_inputs(loaded)):
        raise bad(f"inputs.{features.USER_TEXT}: missing")
    if features.K in arrays:
        k = arrays[features.K].reshape(-1)
        k_max = loaded.k_max
        out = np.flatnonzero((k < 1) | (k > k_max)) if k_max is not None else np.flatnonzero(k < 1)
        if out.size:
            raise bad(f"inputs.{features.K}: {int(k[out[0]])}{_row(arrays[features.K], out[0])} is out of range; "
                      f"k must be in [1, {k_max or 'k_max'}]")
    if features.BETA in arrays:
        beta = arrays[features.BETA].reshape(-1).astype(np.float64)
        out = np.flatnonzero(~np.isfinite(beta))
        if out.size:
            raise bad(f"inputs.{features.BETA}: must be finite, got {beta[out[0]]}"
                      f"{_row(arrays[features.BETA], out[0])}")


def _check_knob_rows(arrays: dict) -> None:
    """k and beta [B]: one value per row of user_text (or of history_item_ids)."""
    ref = next(((n, arrays[n]) for n in (features.USER_TEXT, features.HISTORY_ITEM_IDS) if n in arrays), None)
    if ref is None:
        return
    ref_name, ref_value = ref
    for name in (features.K, features.BETA):
        value = arrays.get(name)
        if value is not None and value.ndim == 1 and value.shape[0] != ref_value.shape[0]:
            raise bad(f"inputs.{name}: {value.shape[0]} values for {ref_value.shape[0]} rows of "
                      f"inputs.{ref_name}; give one {name} per row (shape [B])")


def _row(value: np.ndarray, index: int) -> str:
    return f" (row {index})" if value.ndim == 1 else ""


def _all_inputs(loaded) -> set:
    return {name for specs in loaded.inputs.values() for name in specs}


def check_output_filter(output_filter, signature: str, loaded) -> Optional[list]:
    if not output_filter:
        return None
    outputs = loaded.outputs[signature]
    for name in output_filter:
        if name not in outputs:
            raise bad(f"output_filter: {name!r} is not an output of {signature!r}, which has {sorted(outputs)}")
    return list(output_filter)
