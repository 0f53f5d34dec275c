"""Rewrites ScaNN's Bazel BUILD files so TF Serving can link its ops.

Usage: python3 patch_scann_for_serving.py SCANN_DIR   (the scann/ directory
of the google-research repo). Used by Dockerfile.tf-serving-scann; NOT run
or tested in this repository. What it does mirrors the patch ScaNN's own
tf_serving/ directory applied for older releases:

  * scann/oss_wrappers/BUILD.bazel: the TensorFlow dependency becomes TF
    Serving's @org_tensorflow//tensorflow/core:tensorflow_opensource instead
    of the pip TensorFlow's @local_config_tf headers and .so;
  * scann/scann_ops/cc/BUILD.bazel: the pybind11 target (and its load) is
    dropped, and `scann_ops_static` (alwayslink cc_library of :scann_ops and
    :scann_ops_kernels) is added;
  * a WORKSPACE file is created if missing, so local_repository accepts it.

Each rewrite must match, or the script fails: a ScaNN release whose BUILD
files moved on needs this script updated, not a silent no-op.
"""

import re
import sys
from pathlib import Path


def _sub(path: Path, pattern: str, repl: str, flags: int = 0) -> None:
    text = path.read_text()
    new, n = re.subn(pattern, repl, text, flags=flags)
    if n == 0:
        sys.exit(f"{path}: pattern not found: {pattern!r}")
    path.write_text(new)


def main(scann_dir: str) -> None:
    root = Path(scann_dir)
    wrappers = root / "scann" / "oss_wrappers" / "BUILD.bazel"
    _sub(wrappers, r'\s*"@local_config_tf//:libtensorflow_framework",\n\s*"@local_config_tf//:tf_header_lib",',
         '\n        "@org_tensorflow//tensorflow/core:tensorflow_opensource",')

    ops = root / "scann" / "scann_ops" / "cc" / "BUILD.bazel"
    _sub(ops, r'load\("@pybind11_bazel//:build_defs.bzl", "pybind_library"\)\n', "")
    _sub(ops, r"\npybind_library\(\n.*?\n\)\n", "\n", flags=re.S)
    ops.write_text(ops.read_text() + (
        "\ncc_library(\n"
        '    name = "scann_ops_static",\n'
        "    alwayslink = 1,\n"
        '    deps = [":scann_ops", ":scann_ops_kernels"],\n'
        ")\n"))

    if not any((root / f).exists() for f in ("WORKSPACE", "WORKSPACE.bazel", "MODULE.bazel")):
        (root / "WORKSPACE").write_text('workspace(name = "com_google_scann")\n')


if __name__ == "__main__":
    main(sys.argv[1])
