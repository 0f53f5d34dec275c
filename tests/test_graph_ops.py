"""serving/export/graph_ops.py: non-core ops read from a SavedModel, checked per serving target."""

from __future__ import annotations

import pytest
import tensorflow as tf

import trainer  # noqa: F401
from serving.export import graph_ops


def _save(tmp_path, fn, spec) -> str:
    module = tf.Module()
    module.f = tf.function(fn, input_signature=[spec])
    path = str(tmp_path / "m")
    tf.saved_model.save(module, path, signatures={"serving_default": module.f})
    return path


def test_core_ops_come_from_tf_raw_ops_not_from_loaded_libraries():
    import tensorflow_text  # noqa: F401  (registers its ops: they must still not count as core)

    core = graph_ops.core_op_names()
    assert {"MatMul", "StatefulPartitionedCall", "ReadVariableOp", "BatchMatMulV3", "Einsum"} <= core
    assert not core & (graph_ops.TF_TEXT_OPS | graph_ops.SCANN_OPS)


def test_a_plain_graph_needs_core_ops_only(tmp_path):
    path = _save(tmp_path, lambda x: tf.matmul(x, x, transpose_b=True), tf.TensorSpec([None, 3], tf.float32))
    assert graph_ops.non_core_ops(path) == []
    for target in graph_ops.TARGETS:
        graph_ops.check([], target)


def test_text_ops_are_found_and_checked_per_target(tmp_path):
    import tensorflow_text as text

    path = _save(tmp_path, lambda s: text.case_fold_utf8(s), tf.TensorSpec([None], tf.string))
    ops = graph_ops.non_core_ops(path)
    assert ops == ["CaseFoldUTF8"]
    for target in graph_ops.TARGETS:  # every target registers tensorflow_text's ops
        graph_ops.check(ops, target)
    assert graph_ops.describe(ops, "tf-serving-stock")[0].endswith("passed")


def test_python_callbacks_and_unknown_ops_fail_every_target(tmp_path):
    path = _save(tmp_path, lambda x: tf.numpy_function(lambda a: a * 2, [x], tf.float32),
                 tf.TensorSpec([None], tf.float32))
    ops = graph_ops.non_core_ops(path)
    assert ops and set(ops) <= graph_ops.PYTHON_ONLY_OPS
    for target in graph_ops.TARGETS:
        with pytest.raises(graph_ops.MissingOps, match="Python runtime"):
            graph_ops.check(ops, target)


def test_missing_scann_ops_are_named_with_a_way_out():
    ops = ["CaseFoldUTF8", "Scann>ScannSearchBatched", "Scann>TensorsToScann"]
    graph_ops.check(ops, "tf-serving-scann")
    graph_ops.check(ops, "segrec-serve")
    with pytest.raises(graph_ops.MissingOps) as err:
        graph_ops.check(ops, "tf-serving-stock")
    msg = str(err.value)
    assert "Scann>ScannSearchBatched (ScaNN)" in msg and "CaseFoldUTF8" not in msg and "--index brute_force" in msg
    with pytest.raises(ValueError, match="--target must be one of"):
        graph_ops.check(ops, "tf-serving-nightly")
