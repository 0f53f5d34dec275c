"""Which ops a server needs to load an export, read from the SavedModel itself.

A model server loads the whole MetaGraphDef (every function of every
signature), so it needs a kernel for every op in it. `non_core_ops(dir)`
walks saved_model.pb (graph nodes and the function library) and keeps the
op names a plain `import tensorflow` does not register: core TF's op names
are those of `tf.raw_ops` (generated from the op registry of TF's own
build; a custom-op library loaded later, tensorflow_text's or ScaNN's,
adds ops to the registry but never to tf.raw_ops).

`check(ops, target)` compares them with what a serving target is known to
carry (ALLOWED, data below; k8s/README.md says which TF Serving release
carries which):

  tf-serving-stock   the stock tensorflow/serving image (>= 2.10, or 2.7.3/4):
                     core TF plus tensorflow_text's ops_lib, which holds the
                     three text ops of the in-graph BERT tokenizer. Releases
                     2.8.x / 2.9.x and <= 2.7.0 pin tensorflow_text 2.6, which
                     lacks FastWordpieceTokenizeWithOffsets: export with
                     `--text-input token_ids` there (no text ops at all).
  tf-serving-scann   a TF Serving build with ScaNN's ops linked in
                     (k8s/images/): the stock set plus ScaNN's.
  segrec-serve       `segrec serve` / batch scoring: the Python process
                     registers tensorflow_text and ScaNN (layout.load_exported).

Ops TF registers but no model server runs (Python callbacks) are never allowed.
"""

from __future__ import annotations

import os

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow)
from trainer.contracts import SAVED_MODEL

TF_TEXT_OPS = frozenset({"CaseFoldUTF8", "FastWordpieceTokenizeWithOffsets", "RegexSplitWithOffsets"})
SCANN_OPS = frozenset({
    "Scann>ScannCreateSearcher", "Scann>ScannSearch", "Scann>ScannSearchBatched", "Scann>ScannToTensors",
    "Scann>TensorsToScann",
})
PYTHON_ONLY_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})

TF_SERVING_STOCK, TF_SERVING_SCANN, SEGREC_SERVE = "tf-serving-stock", "tf-serving-scann", "segrec-serve"
TARGETS = (SEGREC_SERVE, TF_SERVING_STOCK, TF_SERVING_SCANN)
# Non-core ops each target registers (beyond core TensorFlow).
ALLOWED = {
    TF_SERVING_STOCK: TF_TEXT_OPS,
    TF_SERVING_SCANN: TF_TEXT_OPS | SCANN_OPS,
    SEGREC_SERVE: TF_TEXT_OPS | SCANN_OPS,
}
PROVIDERS = ((TF_TEXT_OPS, "tensorflow_text"), (SCANN_OPS, "ScaNN"), (PYTHON_ONLY_OPS, "Python runtime"))


class MissingOps(ValueError):
    """The export holds ops the chosen serving target does not register."""


def graph_op_names(saved_model_dir: str) -> set:
    """Every op name in saved_model.pb: each meta graph's nodes and its function library's."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(os.path.join(saved_model_dir, SAVED_MODEL), "rb") as f:
        proto.ParseFromString(f.read())
    names = set()
    for meta in proto.meta_graphs:
        names.update(node.op for node in meta.graph_def.node)
        for fn in meta.graph_def.library.function:
            names.update(node.op for node in fn.node_def)
    return names


def core_op_names() -> frozenset:
    """Ops core TensorFlow registers (tf.raw_ops; custom-op libraries never add to it)."""
    import tensorflow as tf

    return frozenset(n for n in dir(tf.raw_ops) if not n.startswith("_"))


def non_core_ops(saved_model_dir: str) -> list:
    """Sorted op names of the export that core TensorFlow lacks (plus Python-only ones)."""
    core = core_op_names()
    return sorted(op for op in graph_op_names(saved_model_dir)
                  if (op not in core and not op.startswith("_")) or op in PYTHON_ONLY_OPS)


def provider(op: str) -> str:
    return next((name for ops, name in PROVIDERS if op in ops), "unknown library")


def missing_for(ops: list, target: str) -> list:
    if target not in ALLOWED:
        raise ValueError(f"--target must be one of {TARGETS}, got {target!r}")
    return [op for op in ops if op not in ALLOWED[target] or op in PYTHON_ONLY_OPS]


def check(ops: list, target: str) -> None:
    """Raises MissingOps naming every op of `ops` that `target` does not register."""
    missing = missing_for(ops, target)
    if missing:
        named = ", ".join(f"{op} ({provider(op)})" for op in missing)
        hint = []
        if any(op in SCANN_OPS for op in missing):
            hint.append("--index brute_force")
        if any(op in TF_TEXT_OPS for op in missing):
            hint.append("--text-input token_ids")
        raise MissingOps(
            f"--target {target} does not register {named}; nothing was published"
            + (f" (export with {' and '.join(hint)}, or pick another --target)" if hint else "")
        )


def describe(ops: list, target: str) -> list:
    """Model card lines: the non-core ops, who provides them, the target checked."""
    lines = [f"- Checked against --target {target}: "
             + ("passed" if not missing_for(ops, target) else "FAILED")]
    if not ops:
        return lines + ["- Non-core ops: none (core TensorFlow only)"]
    lines.append("- Non-core ops (computed from the SavedModel's graph):")
    lines += [f"  - `{op}` ({provider(op)})" for op in ops]
    fits = [t for t in TARGETS if not missing_for(ops, t)]
    lines.append(f"- Targets that register them all: {', '.join(fits) or 'none'}")
    return lines
