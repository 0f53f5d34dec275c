"""The export layout `<base>/segrec/<version>/`: the one module that owns it.

    <base>/segrec/<version>/
        saved_model.pb, variables/       the SavedModel (signatures: trainer/contracts.py)
        assets.extra/tf_serving_warmup_requests
        export.json                      the export's defaults, machine-readable (this module;
                                         its "repeats" field: the repeat rule the model was trained
                                         with, see repeat_rule)
        segments.json                    the segments served (trainer/segments/document.py)
        model_card.md                    for people; never parsed back

Versions are positive integers; a version dir is published (renamed into
place) only once complete, so readers never see a half-written one. The
exporter, `segrec serve`'s model manager, batch scoring and the segment
refresh all find versions, resolve paths and load models through here.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from trainer.contracts import EXPORT_INFO, MODEL_NAME, SAVED_MODEL
from trainer.data import examples as ex

# export.json keys read back by other modules (card.export_info writes them).
REPEATS = "repeats"  # the repeat rule of the training data: ex.REPEATS_EXCLUDE | ex.REPEATS_ALLOW
SIGNATURES_KEY = "signatures"  # the SavedModel's signature names


class NoExportError(ValueError):
    """A path holds no exported model (a user error: run `segrec export` first)."""


def join(a: str, b: str) -> str:
    """os.path.join that keeps gs:// URIs intact."""
    return os.path.join(a, b) if "://" not in a else a.rstrip("/") + "/" + b


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def model_dir(base_path: str) -> str:
    """`<base>/segrec`: the dir TF Serving's --model_base_path names."""
    return join(base_path, MODEL_NAME)


def version_dir(base_path: str, version: int) -> str:
    return join(model_dir(base_path), str(int(version)))


def existing_versions(base_path: str) -> list:
    """Sorted version numbers under `<base>/segrec/` (numeric dirs only; skips the exporter's .tmp-*)."""
    root = model_dir(base_path)
    gfile = _gfile()
    if not gfile.isdir(root):
        return []
    return sorted(int(n.rstrip("/")) for n in gfile.listdir(root) if n.rstrip("/").isdigit())


def next_version(base_path: str) -> int:
    versions = existing_versions(base_path)
    return (versions[-1] + 1) if versions else 1


def is_version_dir(path: str) -> bool:
    return _gfile().exists(join(path, SAVED_MODEL))


def resolve_version_dir(path: str, flag: str = "--model-dir") -> str:
    """An export version dir from a version dir, `<base>/segrec` or `<base>` (its latest version).

    Resolved once, where a pipeline is built, so every worker loads the same
    version even if a newer one is published while the job runs.
    """
    path = path.rstrip("/")
    if is_version_dir(path):
        return path
    base = os.path.dirname(path) if os.path.basename(path) == MODEL_NAME else path
    versions = existing_versions(base or ".")
    if versions:
        return version_dir(base or ".", versions[-1])
    raise NoExportError(
        f"{flag} {path}: no exported model there (expected a version dir holding {SAVED_MODEL}, "
        f"or a model base path holding {MODEL_NAME}/<version>/; run `segrec export` first)"
    )


def model_version(path: str) -> int:
    """The version number of a version dir (0 when its name is not a number)."""
    name = os.path.basename(path.rstrip("/"))
    return int(name) if name.isdigit() else 0


def write_export_info(path: str, info: dict) -> None:
    """Writes export.json into the (not yet published) version dir `path`."""
    with _gfile().GFile(join(path, EXPORT_INFO), "w") as f:
        f.write(json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_export_info(path: str) -> dict:
    """The export's defaults: {"k", "beta", "k_max", "index", ...}; {} for an export without export.json."""
    file_path = join(path, EXPORT_INFO)
    gfile = _gfile()
    if not gfile.exists(file_path):
        return {}
    with gfile.GFile(file_path) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ValueError(f"{file_path}: not JSON ({e})") from e


def repeat_rule(info: dict) -> Optional[str]:
    """The repeat rule an export was trained with ("exclude" | "allow"), from its
    export.json (read_export_info); None for an export written before it was recorded."""
    rule = info.get(REPEATS)
    if rule is None:
        return None
    if rule not in ex.REPEAT_RULES:
        raise ValueError(f"export.json names repeat rule {rule!r}; expected one of {ex.REPEAT_RULES}")
    return rule


def has_signature(path: str, info: dict, name: str) -> bool:
    """Whether the export at `path` has signature `name`: export.json's list, else the
    saved graph's signature_defs (read without loading the model)."""
    if SIGNATURES_KEY in info:
        return name in info[SIGNATURES_KEY]
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with _gfile().GFile(join(path, SAVED_MODEL), "rb") as f:
        saved.ParseFromString(f.read())
    return any(name in graph.signature_def for graph in saved.meta_graphs)


def register_custom_ops() -> None:
    """Registers the non-core ops an export may hold (tensorflow_text's tokenizer, ScaNN)."""
    import tensorflow_text  # noqa: F401  (WordPiece ops of the tokenizer)

    try:
        from scann.scann_ops.py import scann_ops  # noqa: F401
    except ImportError:  # a brute_force export loads without ScaNN
        pass


def load_exported(path: str, tags: Optional[list] = None):
    """tf.saved_model.load with the custom ops an export may hold registered."""
    import tensorflow as tf

    register_custom_ops()
    return tf.saved_model.load(path, tags=tags)
